"""In-memory labelled images grouped by class: what every few-shot dataset decodes into."""
from __future__ import annotations

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
        """The classes at the given indices, in that order."""
        idx = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_classes):
            raise IndexError(f"class index out of range [0, {self.num_classes})")
        return self._take([torch.arange(int(self.offsets[c]), int(self.offsets[c + 1]))
                           for c in idx.tolist()], [self.names[c] for c in idx.tolist()])

    def split(self, fraction: float, seed: int = 0) -> tuple["ImageClasses", "ImageClasses"]:
        """Split classes at random into (rest, held-out ``fraction``), e.g. for validation."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        perm = torch.randperm(self.num_classes, generator=torch.Generator().manual_seed(seed))
        n_held = max(1, round(self.num_classes * fraction))
        held, rest = perm[:n_held].sort().values, perm[n_held:].sort().values
        return self.subset(rest), self.subset(held)

    def split_examples(self, fraction: float, seed: int = 0) -> tuple["ImageClasses", "ImageClasses"]:
        """Split each class's images at random into (rest, held-out ``fraction``); same classes."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        g = torch.Generator().manual_seed(seed)
        rest, held = [], []
        for c in range(self.num_classes):  # setup-time only: a loop over classes is fine here
            start, n = int(self.offsets[c]), int(self.counts[c])
            perm = torch.randperm(n, generator=g) + start
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
        parts = [self]
        for angle in angles:
            if angle % 90:
                raise ValueError(f"rotation angles must be multiples of 90, got {angle}")
            k = (angle // 90) % 4
            parts.append(ImageClasses(torch.rot90(self.images, k, dims=(2, 3)).contiguous(),
                                      self.offsets, [f"{n}/rot{angle}" for n in self.names]))
        return concat(parts, preprocessing={**self.preprocessing, "rotations": list(angles)})


def concat(parts, preprocessing=None) -> ImageClasses:
    """Classes of several :class:`ImageClasses` side by side (same image shape)."""
    shapes = {p.image_shape for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"cannot concatenate classes with different image shapes {shapes}")
    return ImageClasses.from_counts(
        torch.cat([p.images for p in parts]), torch.cat([p.counts for p in parts]),
        [n for p in parts for n in p.names],
        preprocessing if preprocessing is not None else parts[0].preprocessing)
