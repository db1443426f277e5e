"""FewShotImageFolder on generated images: class folders, CSV splits, errors and the cache."""
import csv
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pymeta.data import FewShotImageFolder, load_image_folder

COLORS = {"ant": (200, 10, 10), "bee": (10, 200, 10), "cow": (10, 10, 200)}
# class_folders holds an empty folder on purpose; test_class_folders asserts its warning
pytestmark = pytest.mark.filterwarnings("ignore:.*with no images:UserWarning")


def _save(path, color, size=(30, 20), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


@pytest.fixture
def class_folders(tmp_path):
    for label, color in COLORS.items():
        for i in range(3):
            ext = "jpg" if label == "cow" else "png"
            _save(tmp_path / label / f"{i}.{ext}", tuple(c + 10 * i for c in color))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    return tmp_path


def test_class_folders(class_folders):
    with pytest.warns(UserWarning, match="skipped 1 folder.s. with no images .*: empty_class"):
        ds = FewShotImageFolder(class_folders, image_size=12)
    ic = ds.classes
    assert ic.names == ["ant", "bee", "cow"] and ic.counts.tolist() == [3, 3, 3]
    assert ic.image_shape == (3, 12, 12) and ic.images.dtype == torch.uint8
    # uniform PNGs keep their exact colour through the resize; JPEG approximately
    assert ic.images[1, :, 5, 5].tolist() == [210, 20, 20]
    assert np.allclose(ic.images[6, :, 5, 5].numpy(), COLORS["cow"], atol=4)
    assert ic.preprocessing == {"dataset": "image_folder", "image_size": 12, "mode": "RGB",
                                "resample": "lanczos"}
    assert [p.name for p in ds.files["ant"]] == ["0.png", "1.png", "2.png"]
    assert torch.equal(load_image_folder(class_folders, image_size=12).images, ic.images)


def test_split_subfolder(tmp_path):
    _save(tmp_path / "train" / "a" / "0.png", (1, 2, 3))
    _save(tmp_path / "test" / "b" / "0.png", (4, 5, 6))
    assert load_image_folder(tmp_path, split="train", image_size=4).names == ["a"]
    assert load_image_folder(tmp_path, split="test", image_size=4).names == ["b"]
    with pytest.raises(FileNotFoundError, match="val"):
        load_image_folder(tmp_path, split="val")


def _write_csv(path, rows, header=("filename", "label")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_ravi_csv_with_images_folder(tmp_path):
    rows = {"train": [("n2_0.jpg", "n2"), ("n2_1.jpg", "n2"), ("n1_0.jpg", "n1")],
            "test": [("n3_0.jpg", "n3")]}
    for split, split_rows in rows.items():
        _write_csv(tmp_path / f"{split}.csv", split_rows)
        for i, (name, _) in enumerate(split_rows):
            _save(tmp_path / "images" / name, (20 * i, 0, 0), size=(50, 40), fmt="JPEG")
    train = FewShotImageFolder(tmp_path, split="train", image_size=8)
    assert train.classes.names == ["n1", "n2"] and train.classes.counts.tolist() == [1, 2]
    assert [p.name for p in train.files["n2"]] == ["n2_0.jpg", "n2_1.jpg"]   # row order
    assert load_image_folder(tmp_path, split="test", image_size=8).names == ["n3"]
    explicit = load_image_folder(tmp_path, tmp_path / "train.csv", image_size=8)
    assert torch.equal(explicit.images, train.classes.images)
    # split files of one folder keep a cache each (a cache sweeps older ones of its name)
    cache = tmp_path / "cache"
    for csv_name in ("train.csv", "test.csv"):
        load_image_folder(tmp_path, tmp_path / csv_name, image_size=8, cache=cache)
    assert len(list(cache.glob("*.pt"))) == 2


def test_ravi_csv_with_label_folders(tmp_path):
    _save(tmp_path / "x" / "x0.png", (1, 1, 1))
    _save(tmp_path / "y" / "y0.png", (2, 2, 2))
    _write_csv(tmp_path / "split.csv", [("y0.png", "y"), ("x0.png", "x")])
    ic = load_image_folder(tmp_path, "split.csv", image_size=4)      # relative to root
    assert ic.names == ["x", "y"] and ic.images[1, :, 0, 0].tolist() == [2, 2, 2]


def test_csv_errors(tmp_path):
    _save(tmp_path / "images" / "a.png", (0, 0, 0))
    _write_csv(tmp_path / "bad.csv", [("a.png", "a")], header=("file", "class"))
    with pytest.raises(ValueError, match="bad.csv:1"):
        load_image_folder(tmp_path, "bad.csv")
    _write_csv(tmp_path / "missing.csv", [("a.png", "a"), ("gone.png", "a")])
    with pytest.raises(FileNotFoundError, match="missing.csv:3.*gone.png"):
        load_image_folder(tmp_path, "missing.csv")
    _write_csv(tmp_path / "twice.csv", [("a.png", "a"), ("a.png", "a")])
    with pytest.raises(ValueError, match="twice.csv:3: image a.png is listed again .first on line 2"):
        load_image_folder(tmp_path, "twice.csv")
    (tmp_path / "a").mkdir()  # the same file by another path: a/../images/a.png
    _write_csv(tmp_path / "alias.csv", [("a.png", "a"), ("../images/a.png", "a")])
    with pytest.raises(ValueError, match="alias.csv:3: image ../images/a.png is listed again"):
        load_image_folder(tmp_path, "alias.csv")


def test_symlinked_copy_of_an_image_is_refused(class_folders):
    (class_folders / "ant" / "copy.png").symlink_to(class_folders / "bee" / "0.png")
    with pytest.raises(ValueError, match="bee/0.png is the same image as .*ant/copy.png"):
        load_image_folder(class_folders, image_size=4)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    for name, level in (("deep", 32768), ("flat", 128)):  # 16-bit mid-grey, 8-bit mid-grey
        (tmp_path / name).mkdir()
        dtype = np.uint16 if name == "deep" else np.uint8
        Image.fromarray(np.full((6, 6), level, dtype)).save(tmp_path / name / "0.png")
    images = load_image_folder(tmp_path, image_size=6).images
    assert images[0].unique().tolist() == [128] and torch.equal(images[0], images[1])


def test_csv_saved_with_a_byte_order_mark(tmp_path):
    _save(tmp_path / "images" / "a.png", (0, 0, 0))
    (tmp_path / "bom.csv").write_bytes("\ufefffilename,label\r\na.png,a\r\n".encode("utf-8"))
    assert load_image_folder(tmp_path, "bom.csv", image_size=4).names == ["a"]


def test_corrupt_image_names_file(class_folders):
    bad = class_folders / "bee" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=str(bad)):
        load_image_folder(class_folders, image_size=8)


def test_broken_links_warn_at_the_callers_line_and_too_few_classes_to_split(class_folders):
    (class_folders / "bee" / "3.png").symlink_to(class_folders / "gone.png")
    with pytest.warns(UserWarning) as caught:
        ds = FewShotImageFolder(class_folders, image_size=12, cache=False)
    assert ds.classes.counts.tolist() == [3, 3, 3]
    broken = [w for w in caught if "skipped 1 broken symbolic link(s)" in str(w.message)]
    assert len(broken) == 1 and broken[0].filename == __file__
    assert "bee/3.png" in str(broken[0].message)
    from pymeta.engine import RunConfig, build_splits
    (class_folders / "bee" / "3.png").unlink()
    for name in ("cow", "empty_class"):  # two classes: no random train/val/test split
        shutil.rmtree(class_folders / name)
    with pytest.raises(ValueError, match="holds 2 class folder.s.; a random train/val/test "
                                         "split needs at least 3"):
        build_splits(RunConfig(data="folder", root=str(class_folders), image_size=12))


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        load_image_folder(tmp_path / "empty")


def test_cache_round_trip_and_invalidation(class_folders, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    fresh = load_image_folder(class_folders, image_size=10)
    cached = load_image_folder(class_folders, image_size=10, cache=cache)
    (path,) = cache.glob("*.pt")
    again = load_image_folder(class_folders, image_size=10, cache=cache)
    assert torch.equal(cached.images, fresh.images) and torch.equal(again.images, fresh.images)
    assert again.names == fresh.names and again.preprocessing == fresh.preprocessing
    _save(class_folders / "ant" / "0.png", (0, 0, 0), size=(31, 20))    # edit one image
    changed = load_image_folder(class_folders, image_size=10, cache=cache)
    assert changed.images[0].sum() == 0 and len(list(cache.glob("*.pt"))) == 1
    # another dataset's split folder of the same name keeps its own cache beside this one
    other = tmp_path_factory.mktemp("other") / class_folders.name
    _save(other / "yak" / "0.png", (5, 5, 5))
    load_image_folder(other, image_size=10, cache=cache)
    assert len(list(cache.glob("*.pt"))) == 2


def test_other_image_formats_pil_reads(tmp_path):
    for fmt, ext in (("BMP", "bmp"), ("GIF", "gif"), ("TIFF", "tif")):
        _save(tmp_path / ext / f"0.{ext}", (0, 0, 0), fmt=fmt)
    assert load_image_folder(tmp_path, image_size=4).names == ["bmp", "gif", "tif"]


def test_cache_beside_read_only_data_goes_to_the_user_cache(class_folders, tmp_path, monkeypatch):
    """A shared, read-only data root (PYMETA_DATA) must not stop caching, nor warn each load."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o555)
    monkeypatch.setenv("PYMETA_DATA", str(shared))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*not writing cache")
            warnings.filterwarnings("ignore", message=".*with no images")
            for _ in range(2):
                load_image_folder(class_folders, image_size=8, cache=True)
    finally:
        shared.chmod(0o755)
    assert len(list((tmp_path / "xdg" / "pymeta" / "image_folder").glob("*.pt"))) == 1
