"""One-shot runs: write_runs from real Omniglot drawings, load_runs back (folder and zip),
answers against class_labels.txt, and errors for malformed runs."""
import shutil
import zipfile

import numpy as np
import pytest
import torch

from conftest import reference_omniglot
from pymeta.data import load_runs, write_runs

N_RUNS = 3


@pytest.fixture(scope="module")
def source(omniglot_root):
    return omniglot_root / "omniglot" / "images_background_small2.zip"


@pytest.fixture(scope="module")
def small2_only_alphabets(omniglot_root, source):
    def alphabets(path):
        with zipfile.ZipFile(path) as z:
            return {n.split("/")[1] for n in z.namelist() if n.count("/") >= 2}
    return sorted(alphabets(source)
                  - alphabets(omniglot_root / "omniglot" / "images_background_small1.zip"))


@pytest.fixture(scope="module")
def written(tmp_path_factory, source, small2_only_alphabets):
    out = tmp_path_factory.mktemp("runs") / "all_runs"
    manifest = write_runs(source, out, n_runs=N_RUNS, seed=1, alphabets=small2_only_alphabets)
    return out, manifest, load_runs(out)


def _parse_labels(path):
    answers = {}
    for line in path.read_text().splitlines():
        test, train = line.split()
        item = int(test.split("/")[-1][len("item"):-len(".png")])
        cls = int(train.split("/")[-1][len("class"):-len(".png")])
        answers[item - 1] = cls - 1
    return [answers[i] for i in range(len(answers))]


def test_layout_and_answers(written):
    out, manifest, runs = written
    assert [r.name for r in runs] == ["run01", "run02", "run03"]
    assert sorted(p.name for p in out.iterdir()) == ["run01", "run02", "run03"]
    for run in runs:
        folder = out / run.name
        assert sorted(p.name for p in folder.iterdir()) == ["class_labels.txt", "test", "training"]
        assert len(list((folder / "training").glob("class*.png"))) == 20
        assert run.support.shape == run.query.shape == (20, 1, 28, 28)
        assert run.answers.dtype == torch.int64
        assert run.answers.tolist() == _parse_labels(folder / "class_labels.txt")
        assert sorted(run.answers.tolist()) == list(range(20))
    assert any(r.answers.tolist() != list(range(20)) for r in runs)   # test items shuffled


def test_runs_are_within_alphabet_and_match_sources(written, source, small2_only_alphabets):
    _, manifest, runs = written
    with zipfile.ZipFile(source) as z:
        for run, entry in zip(runs, manifest):
            assert entry["name"] == run.name
            # Tagalog has only 17 characters: too few for a 20-way run
            assert entry["alphabet"] in small2_only_alphabets and entry["alphabet"] != "Tagalog"
            chars = [p.split("/")[-2] for p in entry["training"]]
            assert len(set(chars)) == 20
            assert all(p.split("/")[1] == entry["alphabet"] for p in entry["training"])
            for k, member in enumerate(entry["test"]):
                truth = entry["training"][int(run.answers[k])]
                assert member.split("/")[-2] == truth.split("/")[-2] and member != truth
            for images, members in ((run.support, entry["training"]), (run.query, entry["test"])):
                for i in (0, 7, 19):
                    np.testing.assert_array_equal(images[i, 0].numpy(),
                                                  reference_omniglot(z.read(members[i]), 28))


def test_seeded_and_refuses_non_empty_target(written, source, small2_only_alphabets, tmp_path):
    out, manifest, _ = written
    again = write_runs(source, tmp_path / "again", n_runs=N_RUNS, seed=1,
                       alphabets=small2_only_alphabets)
    assert again == manifest
    assert (tmp_path / "again" / "run02" / "class_labels.txt").read_text() == \
        (out / "run02" / "class_labels.txt").read_text()
    with pytest.raises(FileExistsError):
        write_runs(source, out, n_runs=1)
    assert [p.name for p in tmp_path.iterdir()] == ["again"]      # no temp dirs left


def test_write_runs_alphabet_errors(source, tmp_path):
    with pytest.raises(ValueError, match="available"):
        write_runs(source, tmp_path / "a", alphabets=["Klingon"])
    with pytest.raises(ValueError, match="Tagalog"):
        write_runs(source, tmp_path / "b", alphabets=["Tagalog"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="n_runs must be a positive int, got 0"):
        write_runs(source, tmp_path / "c", n_runs=0)
    with pytest.raises(ValueError, match="n_way must be an int >= 2, got 0"):
        write_runs(source, tmp_path / "d", n_way=0)
    assert list(tmp_path.iterdir()) == []


def test_zip_form_equals_folder(written, tmp_path):
    out, _, runs = written
    archive = tmp_path / "all_runs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(out.rglob("*")):
            if path.is_file():
                z.write(path, f"all_runs/{path.relative_to(out).as_posix()}")
    from_zip = load_runs(archive)
    assert [r.name for r in from_zip] == [r.name for r in runs]
    for a, b in zip(from_zip, runs):
        assert torch.equal(a.support, b.support) and torch.equal(a.query, b.query)
        assert torch.equal(a.answers, b.answers)


def test_image_size(written):
    out, _, runs = written
    small = load_runs(out / "..", image_size=14)
    assert small[0].support.shape == (20, 1, 14, 14)
    for bad in (0, 28.0, True):
        with pytest.raises(ValueError, match=f"load_runs: image_size must be a positive int, "
                                             f"got {bad}"):
            load_runs(out / "..", image_size=bad)


@pytest.fixture
def one_run(written, tmp_path):
    out, _, _ = written
    shutil.copytree(out / "run01", tmp_path / "runs" / "run01")
    return tmp_path / "runs"


def test_malformed_runs(one_run):
    run = one_run / "run01"
    labels = run / "class_labels.txt"
    lines = labels.read_text().splitlines()

    labels.write_text("\n".join(lines[:2] + ["run01/test/item03.png"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"class_labels.txt line 3"):
        load_runs(one_run)

    missing_class = lines[0].split()[1].split("/")[-1]
    labels.write_text("\n".join(lines) + "\n")
    (run / "training" / missing_class).unlink()
    with pytest.raises(ValueError, match=f"line 1.*{missing_class}"):
        load_runs(one_run)


def test_label_files_must_pair_each_training_image_with_one_item(one_run):
    run = one_run / "run01"
    labels = run / "class_labels.txt"
    lines = labels.read_text().splitlines()
    first_class = lines[0].split()[1]
    same = [f"{line.split()[0]} {first_class}" for line in lines]      # all one answer
    labels.write_text("\n".join(same) + "\n")
    with pytest.raises(ValueError, match=r"class\d+.png is the answer to (0|20) test items"):
        load_runs(one_run)
    other_run = [lines[0].replace("run01/training", "run02/training"), *lines[1:]]
    labels.write_text("\n".join(other_run) + "\n")
    with pytest.raises(ValueError, match="class_labels.txt line 1"):
        load_runs(one_run)
    labels.write_text("\n".join(lines) + "\n")
    shutil.copytree(run, one_run / "copy" / "run01")
    with pytest.raises(ValueError, match="run run01 appears in more than one folder"):
        load_runs(one_run)


def test_corrupt_png_and_missing_labels(one_run):
    run = one_run / "run01"
    (run / "test" / "item05.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="item05.png"):
        load_runs(one_run)
    (run / "class_labels.txt").unlink()
    with pytest.raises(ValueError, match="class_labels.txt"):
        load_runs(one_run)


def test_unlabelled_item_and_no_runs(one_run, tmp_path):
    labels = one_run / "run01" / "class_labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[1:]) + "\n")
    with pytest.raises(ValueError, match="no label for .*item01.png"):
        load_runs(one_run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no runNN"):
        load_runs(tmp_path / "empty")
