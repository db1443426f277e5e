"""Real learning on real data: a short ProtoNet run on Omniglot small1 must beat chance by a
wide margin on held-out characters and on one-shot runs drawn from small2-only alphabets.

Skips cleanly when the Omniglot small archives are absent (see conftest.omniglot_root).
"""
import json
import subprocess
import sys

import pytest

from pymeta.data import load_runs, write_runs

STEPS = 300


@pytest.fixture(scope="module")
def trained(omniglot_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("omniglot") / "run"
    cmd = [sys.executable, "-m", "pymeta", "train", "--data", "omniglot", "--root",
           str(omniglot_root), "--ways", "5", "--shots", "1", "--queries", "5", "--steps",
           str(STEPS), "--val-every", "150", "--val-episodes", "50", "--test-episodes", "100",
           "--eval-queries", "5", "--no-progress", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=out.parent)
    assert res.returncode == 0, res.stderr
    return out


def test_held_out_characters_far_above_chance(trained):
    results = json.loads((trained / "results.json").read_text())
    test = results["tests"][0]
    assert (test["ways"], test["shots"], test["episodes"]) == (5, 1, 100)
    assert test["acc"] > 0.7, test          # chance is 0.2
    assert results["best_acc"] > 0.7        # validation: held-out small1 characters


def test_one_shot_runs_far_below_chance_error(trained, omniglot_root, tmp_path):
    runs_dir = tmp_path / "runs"
    write_runs(omniglot_root / "omniglot" / "images_background_small2.zip", runs_dir, n_runs=4,
               seed=1, alphabets=["Japanese_(katakana)", "Sanskrit", "Tagalog"])
    assert len(load_runs(runs_dir)) == 4
    res = subprocess.run([sys.executable, "-m", "pymeta", "eval-runs", "--runs", str(runs_dir),
                          "--checkpoint", str(trained / "best.pt"), "--json",
                          str(tmp_path / "runs.json")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    errors = json.loads((tmp_path / "runs.json").read_text())
    assert len(errors["runs"]) == 4
    assert errors["error"] < 60.0, errors   # chance is 95% error on 20-way runs
    assert f"mean error over 4 runs: {errors['error']:.2f}%" in res.stdout
