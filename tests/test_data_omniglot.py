"""Omniglot reader: real small archives (class counts, preprocessing, cache, zip vs folder) and
synthetic archives for the splits whose full archives the tests do not have."""
import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import reference_omniglot
from pymeta.data import (ImageClasses, extract_zip_atomic, load_omniglot, omniglot_urls,
                         preprocess_omniglot)
from pymeta.data import omniglot as omniglot_module

SMALL1 = {"Balinese": 24, "Early_Aramaic": 22, "Greek": 24, "Korean": 40, "Latin": 26}
SMALL2 = {"Greek": 24, "Japanese_(katakana)": 47, "Latin": 26, "Sanskrit": 42, "Tagalog": 17}
PREPROCESSING = {"dataset": "omniglot", "image_size": 28, "threshold": 128, "stroke": 1,
                 "resample": "lanczos"}

# The synthetic archives below hold 1-2 drawings per character; the warning about that is
# checked once, in test_background_evaluation_and_vinyals.
pytestmark = pytest.mark.filterwarnings("ignore:.*fewer than 20 drawings:UserWarning")


@pytest.fixture(scope="module")
def small1(omniglot_root):
    return load_omniglot("small1", omniglot_root, cache=False)


@pytest.fixture(scope="module")
def small1_zip(omniglot_root):
    return zipfile.ZipFile(omniglot_root / "omniglot" / "images_background_small1.zip")


@pytest.fixture(scope="module")
def mini_roots(tmp_path_factory, small1_zip):
    """Two data roots with a one-alphabet images_background_small1: as a zip and extracted."""
    zip_root, dir_root = tmp_path_factory.mktemp("zip_root"), tmp_path_factory.mktemp("dir_root")
    path = zip_root / "omniglot" / "images_background_small1.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as out:
        for name in small1_zip.namelist():
            if "/Early_Aramaic/" in name and not name.endswith("/"):
                out.writestr(name, small1_zip.read(name))
    extract_zip_atomic(path, dir_root / "omniglot")
    return zip_root, dir_root


def alphabet_counts(classes):
    counts = {}
    for name in classes.names:
        alphabet = name.split("/")[0]
        counts[alphabet] = counts.get(alphabet, 0) + 1
    return counts


def test_small1_classes(small1):
    assert alphabet_counts(small1) == SMALL1
    assert small1.num_classes == 136 and small1.counts.tolist() == [20] * 136
    assert small1.names == sorted(small1.names) and small1.names[0] == "Balinese/character01"
    assert small1.image_shape == (1, 28, 28) and small1.images.dtype == torch.uint8
    assert small1.preprocessing == PREPROCESSING


def test_small2_only_is_small2_minus_small1(omniglot_root, small1_zip):
    s2 = zipfile.ZipFile(omniglot_root / "omniglot" / "images_background_small2.zip")
    alphabets = lambda z: {n.split("/")[1] for n in z.namelist() if n.count("/") >= 2}
    expected = alphabets(s2) - alphabets(small1_zip)
    only = load_omniglot("small2-only", omniglot_root, alphabets=["Tagalog"], cache=False)
    assert only.num_classes == 17 and set(alphabet_counts(only)) == {"Tagalog"}
    # The full split is computed from the listings (no decode needed to check its classes).
    with pytest.raises(ValueError) as err:
        load_omniglot("small2-only", omniglot_root, alphabets=["Greek"], cache=False)
    assert all(a in str(err.value) for a in expected) and expected == {
        "Japanese_(katakana)", "Sanskrit", "Tagalog"}
    assert sum(SMALL2[a] for a in expected) == 106


def test_small2_only_full(omniglot_root):
    only = load_omniglot("small2-only", omniglot_root, cache=False)
    assert only.num_classes == 106 and only.counts.tolist() == [20] * 106
    assert set(alphabet_counts(only)) == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}


def test_preprocessing_matches_reference(small1, small1_zip):
    for c, d in [(0, 0), (37, 5), (135, 19)]:
        alphabet, character = small1.names[c].split("/")
        members = sorted(n for n in small1_zip.namelist()
                         if n.startswith(f"images_background_small1/{alphabet}/{character}/")
                         and n.endswith(".png"))
        assert len(members) == 20
        expected = reference_omniglot(small1_zip.read(members[d]), 28)
        got = small1.images[int(small1.offsets[c]) + d, 0].numpy()
        np.testing.assert_array_equal(got, expected)


def test_full_size_is_exact_stroke_map(small1_zip):
    name = next(n for n in small1_zip.namelist() if n.endswith(".png"))
    img = Image.open(io.BytesIO(small1_zip.read(name)))
    out = preprocess_omniglot(img, 105)
    ink = np.asarray(img.convert("L")) < 128
    np.testing.assert_array_equal(out, np.where(ink, 255, 0))
    assert 0 < ink.mean() < 0.5      # black strokes on white: ink is the minority
    assert ImageClasses.to_float(torch.from_numpy(out)).max() == 1.0   # strokes read as 1


def test_transparent_drawings_read_as_ink_on_white():
    """Strokes opaque on a transparent (black) background: transparency is white paper, as
    for the official drawings, not ink everywhere."""
    from pymeta.data._util import open_image
    rgba = Image.new("RGBA", (105, 105), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (0, 0, 105, 53))                # the top half is opaque ink
    paper = Image.new("L", (105, 105), 255)
    paper.paste(0, (0, 0, 105, 53))
    for img in (rgba, rgba.convert("LA")):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        decoded = open_image(buf.getvalue(), "drawing.png")
        assert (preprocess_omniglot(decoded, 28) == preprocess_omniglot(paper, 28)).all()


def test_explicit_alphabets_and_rotations(omniglot_root, small1):
    two = load_omniglot("small1", omniglot_root, alphabets=["Latin", "Early_Aramaic"],
                        cache=False)
    expected = [i for i, n in enumerate(small1.names) if n.split("/")[0] in
                ("Early_Aramaic", "Latin")]
    ref = small1.subset(expected)
    assert two.names == ref.names and torch.equal(two.images, ref.images)
    rot = two.with_rotations()
    assert rot.num_classes == 4 * two.num_classes
    k = two.num_classes   # first rotated block is 90 degrees
    assert rot.names[k] == two.names[0] + "/rot90"
    assert torch.equal(rot.images[int(rot.offsets[k])], torch.rot90(two.images[0], 1, (1, 2)))


def test_unknown_alphabet_lists_available(omniglot_root):
    with pytest.raises(ValueError, match="Klingon") as err:
        load_omniglot("small1", omniglot_root, alphabets=["Greek", "Klingon"], cache=False)
    assert all(a in str(err.value) for a in SMALL1)


def test_unknown_split():
    with pytest.raises(ValueError, match="vinyals-train"):
        load_omniglot("training")


def test_missing_data_error_names_locations_and_urls(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_omniglot("small2-only", tmp_path, base_url="http://mirror.example/omni")
    msg = str(err.value)
    for url in omniglot_urls("small2-only", "http://mirror.example/omni"):
        assert url in msg
    assert str(tmp_path / "omniglot" / "images_background_small2.zip") in msg
    assert str(tmp_path / "images_background_small1") in msg and "download=True" in msg


def test_env_base_url(monkeypatch):
    monkeypatch.setenv("PYMETA_OMNIGLOT_URL", "http://127.0.0.1:9/x/")
    assert omniglot_urls("evaluation") == ["http://127.0.0.1:9/x/images_evaluation.zip"]
    monkeypatch.delenv("PYMETA_OMNIGLOT_URL")
    assert omniglot_urls("background")[0].startswith("https://github.com/brendenlake/omniglot")


def test_zip_and_extracted_folder_identical(mini_roots, small1):
    zip_root, dir_root = mini_roots
    assert (dir_root / "omniglot" / "images_background_small1" / "Early_Aramaic").is_dir()
    from_zip = load_omniglot("small1", zip_root, cache=False)
    from_dir = load_omniglot("small1", dir_root, cache=False)
    assert from_zip.names == from_dir.names and torch.equal(from_zip.images, from_dir.images)
    assert from_zip.num_classes == 22
    ref = small1.subset([i for i, n in enumerate(small1.names) if n.startswith("Early_Aramaic/")])
    assert torch.equal(from_zip.images, ref.images)
    # root may also point straight at the omniglot folder
    direct = load_omniglot("small1", zip_root / "omniglot", cache=False)
    assert torch.equal(direct.images, from_zip.images)


def test_cache_round_trip_and_corrupt_cache(mini_roots, tmp_path):
    zip_root, _ = mini_roots
    fresh = load_omniglot("small1", zip_root, cache=False)
    first = load_omniglot("small1", zip_root, cache=tmp_path)
    (cache_file,) = tmp_path.glob("images_background_small1-28px-*.pt")
    again = load_omniglot("small1", zip_root, cache=tmp_path)
    for got in (first, again):
        assert got.names == fresh.names and torch.equal(got.images, fresh.images)
        assert got.preprocessing == fresh.preprocessing
    for tamper in ("pixels", "class boundary", "not a torch file"):
        if tamper == "not a torch file":
            cache_file.write_bytes(b"not a torch file")
        else:  # a readable file whose data changed: must not load silently
            blob = torch.load(cache_file, weights_only=True)
            if tamper == "pixels":
                blob["images"].view(-1)[blob["images"].numel() // 2] ^= 0xFF
            else:
                blob["offsets"][1] += 1
            torch.save(blob, cache_file)
        with pytest.warns(RuntimeWarning, match="unreadable cache"):
            rebuilt = load_omniglot("small1", zip_root, cache=tmp_path)
        assert torch.equal(rebuilt.images, fresh.images)
        assert torch.equal(rebuilt.offsets, fresh.offsets)
    assert torch.load(cache_file, weights_only=True)["names"] == fresh.names   # rewritten
    # A subset of alphabets is served from the whole-archive cache.
    sub = load_omniglot("small1", zip_root, alphabets="Early_Aramaic", cache=tmp_path)
    assert torch.equal(sub.images, fresh.images)
    # Another copy of the archive (the extracted one) keeps its own cache beside this one.
    _, dir_root = mini_roots
    load_omniglot("small1", dir_root, cache=tmp_path)
    assert len(list(tmp_path.glob("images_background_small1-28px-*.pt"))) == 2


def test_default_cache_location_and_invalidation(mini_roots):
    zip_root, _ = mini_roots
    archive = zip_root / "omniglot" / "images_background_small1.zip"
    cache = zip_root / "omniglot" / "cache"
    a = load_omniglot("small1", zip_root, image_size=20)
    (first,) = cache.glob("images_background_small1-20px-*.pt")
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # "replaced" archive
    b = load_omniglot("small1", zip_root, image_size=20)
    (second,) = cache.glob("images_background_small1-20px-*.pt")      # stale one removed
    assert second != first and torch.equal(a.images, b.images)
    assert a.image_shape == (1, 20, 20) and a.preprocessing["image_size"] == 20


# --- synthetic archives: background/evaluation/vinyals splits and corrupt images -----------

def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.full((105, 105), 255, np.uint8)
    arr[rng.integers(0, 105, 300), rng.integers(0, 105, 300)] = 0
    buf = io.BytesIO()
    Image.fromarray(arr).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def _fake_archive(path: Path, layout: dict, corrupt: str = None) -> None:
    top = path.stem
    with zipfile.ZipFile(path, "w") as z:
        for alphabet, n_chars in layout.items():
            for c in range(1, n_chars + 1):
                for d in range(1, 3):
                    name = f"{top}/{alphabet}/character{c:02d}/{c:02d}_{d:02d}.png"
                    data = b"garbage" if name == corrupt else _png(zlib.crc32(name.encode()))
                    z.writestr(name, data)


@pytest.fixture
def fake_root(tmp_path):
    (tmp_path / "omniglot").mkdir()
    _fake_archive(tmp_path / "omniglot" / "images_background.zip", {"Beta": 2, "Zeta": 1})
    _fake_archive(tmp_path / "omniglot" / "images_evaluation.zip", {"Mu": 2})
    return tmp_path


def test_background_evaluation_and_vinyals(fake_root, monkeypatch):
    with pytest.warns(UserWarning, match=r"3 character\(s\) have fewer than 20 drawings "
                                         r"\(e.g. Beta/character01: 2\); the copy looks incomplete"):
        bg = load_omniglot("background", fake_root, cache=False)
    ev = load_omniglot("evaluation", fake_root, cache=False)
    assert bg.names == ["Beta/character01", "Beta/character02", "Zeta/character01"]
    assert ev.names == ["Mu/character01", "Mu/character02"] and ev.counts.tolist() == [2, 2]
    monkeypatch.setattr(omniglot_module, "VINYALS_TRAIN_CLASSES", 3)
    train = load_omniglot("vinyals-train", fake_root, cache=False)
    test = load_omniglot("vinyals-test", fake_root, cache=False)
    # all characters sorted by (alphabet, character): Beta, Beta, Mu | Mu, Zeta
    assert train.names == ["Beta/character01", "Beta/character02", "Mu/character01"]
    assert test.names == ["Mu/character02", "Zeta/character01"]
    assert torch.equal(test.images[2:], bg.images[4:])
    assert torch.equal(train.images[4:], ev.images[:2])
    only_mu = load_omniglot("vinyals-test", fake_root, alphabets=["Mu"], cache=False)
    assert only_mu.names == ["Mu/character02"]


def test_incomplete_copy_warns_once_at_the_callers_line(fake_root):
    with pytest.warns(UserWarning, match="fewer than 20 drawings") as caught:
        load_omniglot("background", fake_root, cache=False)
    assert len(caught) == 1 and caught[0].filename == __file__


def test_hidden_zip_members_are_skipped_as_in_folders(fake_root):
    """macOS's ._x.png resource forks and hidden folders are not drawings, in a zip as in
    an extracted folder (whose walk skips them)."""
    expected = load_omniglot("background", fake_root, cache=False)
    with zipfile.ZipFile(fake_root / "omniglot" / "images_background.zip", "a") as z:
        z.writestr("images_background/Beta/character01/._01_01.png", b"\0\5\x16\7")
        z.writestr("images_background/.Trash/character01/01_01.png", b"not a png")
    got = load_omniglot("background", fake_root, cache=False)
    assert got.names == expected.names and torch.equal(got.images, expected.images)
    with pytest.raises(ValueError, match="alphabets is empty: name at least one of"):
        load_omniglot("background", fake_root, alphabets=[], cache=False)


def test_corrupt_image_names_member(tmp_path):
    bad = "images_evaluation/Mu/character02/02_01.png"
    (tmp_path / "omniglot").mkdir()
    _fake_archive(tmp_path / "omniglot" / "images_evaluation.zip", {"Mu": 2}, corrupt=bad)
    with pytest.raises(ValueError, match="character02/02_01.png"):
        load_omniglot("evaluation", tmp_path, cache=False)


def test_extracted_folder_through_symlinks_and_without_fifos(fake_root, tmp_path):
    """A symlinked alphabet folder is read like a real one; a FIFO is skipped, not read."""
    extract_zip_atomic(fake_root / "omniglot" / "images_background.zip", tmp_path / "real")
    zipped = load_omniglot("background", fake_root, cache=False)
    root = tmp_path / "linked" / "omniglot" / "images_background"
    root.mkdir(parents=True)
    real = tmp_path / "real" / "images_background"
    (root / "Beta").symlink_to(real / "Beta", target_is_directory=True)
    (root / "Zeta").symlink_to(real / "Zeta", target_is_directory=True)
    os.mkfifo(real / "Beta" / "character01" / "zz_fifo.png")
    linked = load_omniglot("background", tmp_path / "linked", cache=False)
    assert linked.names == zipped.names and torch.equal(linked.images, zipped.images)


@pytest.mark.parametrize("layout", ["no_character_level", "two_copies"])
def test_archive_of_the_wrong_structure_is_refused(tmp_path, layout):
    path = tmp_path / "omniglot" / "images_evaluation.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as z:
        for d in range(21 if layout == "no_character_level" else 20):
            if layout == "no_character_level":  # .../<Alphabet>/*.png: alphabets read as classes
                z.writestr(f"images_evaluation/Mu/{d:02d}.png", _png(d))
            else:  # the same drawings under two top-level folders
                for top in ("images_evaluation", "backup"):
                    z.writestr(f"{top}/Mu/character01/{d:02d}.png", _png(d))
    with pytest.raises(ValueError, match="Omniglot has 20 per character"):
        load_omniglot("evaluation", tmp_path, cache=False)
