"""A tiny offline few-shot dataset: scikit-learn's bundled 8x8 handwritten digits.

Digits 0-4 are the training classes and 5-9 the test classes, so an episode's classes are
never seen in training; useful for smoke tests and examples that must run without downloads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_count
from .classes import ImageClasses

_SPLITS = {"train": range(0, 5), "test": range(5, 10), "all": range(0, 10)}


def load_digits(split: str = "train", image_size: int = 28) -> ImageClasses:
    """The 1797 sklearn digits as classes ``"digit0"``.. ``"digit9"``, uint8 ``[N, 1, S, S]``.

    ``split`` is ``"train"`` (digits 0-4), ``"test"`` (5-9) or ``"all"``. The 8x8 images
    (values 0..16) are upsampled once to ``image_size`` with bilinear interpolation
    (``align_corners=False``) and scaled so that 16 becomes 255.

    Example:
        >>> from pymeta.data import load_digits
        >>> train = load_digits("train", image_size=28)
        >>> train.names, train.image_shape
        (['digit0', 'digit1', 'digit2', 'digit3', 'digit4'], (1, 28, 28))
        >>> int(train.images.max()) <= 255 and int(train.counts.sum()) == len(train)
        True
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose one of {list(_SPLITS)}")
    image_size = check_count("load_digits", "image_size", image_size)
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from e
    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)   # [N, 8, 8], 0..16
    target = torch.as_tensor(bunch.target, dtype=torch.int64)
    digits = list(_SPLITS[split])
    # Stable sort by digit keeps sklearn's order within each class and makes classes contiguous.
    keep = torch.isin(target, torch.tensor(digits))
    order = torch.sort(target[keep], stable=True).indices
    images, target = images[keep][order], target[keep][order]
    counts = torch.stack([(target == d).sum() for d in digits])
    return ImageClasses.from_counts(_to_uint8(images, image_size), counts,
                                    [f"digit{d}" for d in digits],
                                    {"dataset": "digits", "image_size": image_size})


def _to_uint8(images: torch.Tensor, image_size: int) -> torch.Tensor:
    x = images.unsqueeze(1) / 16.0
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x * 255).round_().clamp_(0, 255).to(torch.uint8)
