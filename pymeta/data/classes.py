"""In-memory labelled images grouped by class: what every few-shot dataset decodes into."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class ImageClasses:
    """Images of ``num_classes`` classes as one uint8 tensor, each class contiguous.

    Decoded once; episodes are gathered from it with no per-image decode.

    Attributes:
        images: uint8 ``[M, C, H, W]``; class ``c`` is ``images[offsets[c]:offsets[c + 1]]``.
            Pixel 255 means ink/intensity 1.0 (see :meth:`to_float`).
        offsets: int64 ``[num_classes + 1]``, non-decreasing, ``offsets[0] == 0``.
        names: one name per class, e.g. ``"Greek/character01"``.
        preprocessing: a JSON-serialisable record of how images were made, stored in
            checkpoints so that evaluation preprocesses exactly as training did.

    Example:
        >>> import torch
        >>> from pymeta.data import ImageClasses
        >>> ic = ImageClasses(torch.zeros(6, 1, 8, 8, dtype=torch.uint8),
        ...                   torch.tensor([0, 2, 6]), ["a", "b"], {"dataset": "toy"})
        >>> ic.num_classes, ic.counts.tolist()
        (2, [2, 4])
    """

    images: torch.Tensor
    offsets: torch.Tensor
    names: list
    preprocessing: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [M, C, H, W], got {self.images.dtype} "
                             f"{list(self.images.shape)}")
        off = self.offsets
        if (off.dim() != 1 or off.numel() != len(self.names) + 1 or int(off[0]) != 0
                or int(off[-1]) != self.images.shape[0] or bool((off[1:] < off[:-1]).any())):
            raise ValueError("offsets must be non-decreasing [num_classes + 1] from 0 to the "
                             f"number of images ({self.images.shape[0]}), one class per name")
        twice = next((n for n, k in Counter(self.names).items() if k > 1), None)
        if twice is not None:  # one class could fill two task slots
            raise ValueError(f"class names must be unique, but {twice!r} appears more than "
                             f"once (the same class would be sampled under two labels)")

    @classmethod
    def from_counts(cls, images: torch.Tensor, counts, names: list,
                    preprocessing: dict | None = None) -> "ImageClasses":
        """The store whose class ``c`` is the next ``counts[c]`` rows of ``images``."""
        counts = torch.as_tensor(counts, dtype=torch.int64)
        return cls(images, torch.cat([counts.new_zeros(1), counts.cumsum(0)]), list(names),
                   dict(preprocessing or {}))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def counts(self) -> torch.Tensor:
        """Images per class, int64 ``[num_classes]``."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    @staticmethod
    def to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 pixels to floats in [0, 1]."""
        return images.to(dtype).div_(255)

    def subset(self, classes) -> "ImageClasses":
        """The classes at the given indices, in that order (each at most once)."""
        given = torch.as_tensor(classes)
        if not given.numel():  # [] makes a float tensor
            given = given.to(torch.int64)
        if given.dtype == torch.bool or given.is_floating_point():
            raise TypeError(f"subset takes class indices, got a {given.dtype} tensor (for a "
                            f"mask, pass mask.nonzero().flatten())")
        idx = given.to(torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_classes):
            raise IndexError(f"class index out of range [0, {self.num_classes})")
        return self._take([torch.arange(int(self.offsets[c]), int(self.offsets[c + 1]))
                           for c in idx.tolist()], [self.names[c] for c in idx.tolist()])

    def split(self, fraction: float, seed: int = 0) -> tuple["ImageClasses", "ImageClasses"]:
        """Split classes at random into (rest, held-out ``fraction``), e.g. for validation."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        # Rotated copies of a class stay on its side: a held-out character must not be
        # trained on as another rotation.
        groups = self._base_classes()
        bases = list(dict.fromkeys(groups))
        perm = torch.randperm(len(bases), generator=torch.Generator().manual_seed(seed))
        n_held = max(1, round(len(bases) * fraction))
        if n_held >= len(bases):
            raise ValueError(f"cannot hold out {fraction:g} of {len(bases)} class(es) and keep "
                             f"any for the rest: too few classes")
        held_bases = {bases[i] for i in perm[:n_held].tolist()}
        held = [c for c, b in enumerate(groups) if b in held_bases]
        rest = [c for c, b in enumerate(groups) if b not in held_bases]
        return self.subset(rest), self.subset(held)

    def _base_classes(self) -> list:
        """Each class's name without the suffix :meth:`with_rotations` adds."""
        suffixes = tuple(f"/rot{a}" for a in self.preprocessing.get("rotations", ()))
        return [n[:n.rindex("/rot")] if suffixes and n.endswith(suffixes) else n
                for n in self.names]

    def split_examples(self, fraction: float, seed: int = 0) -> tuple["ImageClasses", "ImageClasses"]:
        """Split each class's images at random into (rest, held-out ``fraction``); same classes."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        g = torch.Generator().manual_seed(seed)
        rest, held, perms = [], [], {}
        for c, base in enumerate(self._base_classes()):  # setup-time only: a loop is fine
            start, n = int(self.offsets[c]), int(self.counts[c])
            # a rotated copy holds out the same drawings as its class
            if base not in perms:
                perms[base] = torch.randperm(n, generator=g)
            perm = perms[base] + start
            k = min(n - 1, max(1, round(n * fraction))) if n > 1 else 0
            held.append(perm[:k].sort().values)
            rest.append(perm[k:].sort().values)
        return self._take(rest, self.names), self._take(held, self.names)

    def _take(self, rows_per_class: list, names: list) -> "ImageClasses":
        rows = torch.cat(rows_per_class) if rows_per_class else torch.zeros(0, dtype=torch.int64)
        return ImageClasses.from_counts(self.images[rows], [len(r) for r in rows_per_class],
                                        names, self.preprocessing)

    def with_rotations(self, angles=(90, 180, 270)) -> "ImageClasses":
        """Add each class rotated by each angle as a new class (Omniglot's augmentation)."""
        if "rotations" in self.preprocessing:  # split() groups one set of rotated copies
            raise ValueError(f"these classes already hold rotated copies "
                             f"{self.preprocessing['rotations']}; call with_rotations once, "
                             f"with every angle")
        parts = [self]
        turns = [_quarter_turns(a) for a in angles]
        if len(set(turns)) != len(turns):
            raise ValueError(f"rotation angles must differ modulo 360, got {list(angles)}")
        for angle, k in zip(angles, turns):
            parts.append(ImageClasses(torch.rot90(self.images, k, dims=(2, 3)).contiguous(),
                                      self.offsets, [f"{n}/rot{angle}" for n in self.names]))
        return concat(parts, preprocessing={**self.preprocessing, "rotations": list(angles)})


def _quarter_turns(angle) -> int:
    """1, 2 or 3 for a multiple of 90 degrees that is not one of 360 (the class itself)."""
    if isinstance(angle, bool) or not isinstance(angle, (int, float)) or angle % 90:
        raise ValueError(f"rotation angles must be multiples of 90, got {angle!r}")
    k = int(angle // 90) % 4
    if k == 0:
        raise ValueError(f"rotation by {angle!r} gives the class itself; angles must not be "
                         f"multiples of 360")
    return k


def concat(parts, preprocessing=None) -> ImageClasses:
    """Classes of several :class:`ImageClasses` side by side (same image shape)."""
    shapes = {p.image_shape for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"cannot concatenate classes with different image shapes {shapes}")
    return ImageClasses.from_counts(
        torch.cat([p.images for p in parts]), torch.cat([p.counts for p in parts]),
        [n for p in parts for n in p.names],
        preprocessing if preprocessing is not None else parts[0].preprocessing)
