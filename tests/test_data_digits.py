"""load_digits: sklearn's 8x8 digits as train (0-4) / test (5-9) classes."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pymeta.data import load_digits

sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def raw():
    bunch = sklearn_datasets.load_digits()
    return bunch.images, bunch.target


@pytest.mark.parametrize("split,digits", [("train", range(5)), ("test", range(5, 10)),
                                          ("all", range(10))])
def test_splits_shapes_and_counts(raw, split, digits):
    _, target = raw
    ic = load_digits(split)
    assert ic.names == [f"digit{d}" for d in digits]
    assert ic.counts.tolist() == [int((target == d).sum()) for d in digits]
    assert ic.image_shape == (1, 28, 28) and ic.images.dtype == torch.uint8
    assert ic.preprocessing == {"dataset": "digits", "image_size": 28}


def test_native_size_values_are_scaled_exactly(raw):
    images, target = raw
    ic = load_digits("test", image_size=8)
    for c, d in enumerate(range(5, 10)):
        src = images[target == d]                         # sklearn order within a class
        got = ic.images[int(ic.offsets[c]):int(ic.offsets[c + 1]), 0].numpy()
        np.testing.assert_array_equal(got, np.round(src * 255 / 16).astype(np.uint8))
    assert int(ic.images.max()) == 255                    # 16 -> 255


def test_upsampling_is_bilinear(raw):
    images, target = raw
    ic = load_digits("train", image_size=20)
    src = torch.tensor(images[target == 3][:4], dtype=torch.float32)[:, None] / 16
    ref = F.interpolate(src, size=(20, 20), mode="bilinear", align_corners=False)
    ref = (ref * 255).round().to(torch.uint8)
    start = int(ic.offsets[3])
    assert torch.equal(ic.images[start:start + 4], ref)


def test_bad_arguments():
    with pytest.raises(ValueError, match="train"):
        load_digits("validation")
    for bad in (0, True, 8.0):
        with pytest.raises(ValueError, match="image_size must be a positive int"):
            load_digits("train", image_size=bad)
    assert load_digits("train", image_size=np.int64(8)).image_shape == (1, 8, 8)
