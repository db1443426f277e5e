"""Checkpoints, metric files and confidence intervals."""
import json
import math

import numpy as np
import pytest
import torch

from pymeta.engine import MetricsLog, load_checkpoint, mean_ci95, save_checkpoint
from pymeta.engine import checkpoint as checkpoint_module


def test_mean_ci95_matches_the_normal_formula():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=1000)
    mean, ci = mean_ci95(torch.from_numpy(x))
    assert mean == pytest.approx(x.mean())
    assert ci == pytest.approx(1.96 * x.std(ddof=1) / math.sqrt(x.size))
    assert math.isnan(mean_ci95([0.5])[1])
    with pytest.raises(ValueError):
        mean_ci95([])


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7,
             "config": {"algo": "protonet", "lr": 1e-3}, "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path / "c.pt", state)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)   # plain torch can read it safely
    assert raw["format"] == "pymeta-checkpoint" and raw["version"] == 1
    back = load_checkpoint(tmp_path / "c.pt")
    assert back["step"] == 7 and torch.equal(back["model"]["weight"], model.weight)
    assert back["optimizer"]["state"][0]["exp_avg"].shape == (2, 3)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(IsADirectoryError, match="is a run directory, not a checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable pymeta checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a pymeta checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format": "pymeta-checkpoint", "version": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="upgrade pymeta"):
        load_checkpoint(tmp_path / "future.pt")
    save_checkpoint(tmp_path / "ok.pt", {"step": 1})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"format": "pymeta-checkpoint", "version": "2"}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="malformed: its format version is '2'"):
        load_checkpoint(tmp_path / "odd.pt")


def test_a_flipped_bit_in_a_weight_is_caught(tmp_path):
    # torch.load checks no checksum: without the digest this loads a weight of ~1e35
    weight = torch.linspace(-1, 1, 64)
    save_checkpoint(tmp_path / "c.pt", {"model": {"weight": weight}})
    data = bytearray((tmp_path / "c.pt").read_bytes())
    at = bytes(data).index(weight.numpy().tobytes())  # stored raw, uncompressed
    data[at + 4 * 10 + 3] ^= 0x40  # an exponent bit of weight[10]
    (tmp_path / "c.pt").write_bytes(bytes(data))
    assert torch.load(tmp_path / "c.pt", weights_only=True)["model"]["weight"][10].abs() > 1e30
    with pytest.raises(ValueError, match="is corrupt: its contents no longer match"):
        load_checkpoint(tmp_path / "c.pt")


def test_load_refuses_malformed_fields(tmp_path):
    import pymeta
    good = {"config": {}, "preprocessing": {"input_shape": [1, 8, 8]},
            "learner_config": {"algo": "protonet", "kwargs": {}}, "model": {}}
    for field, value, message in (("preprocessing", [1], r"\['preprocessing'\] must be dicts"),
                                  ("learner_config", {"algo": "protonet"}, "learner_config"),
                                  ("preprocessing", {"input_shape": "abc"}, "input shape is 'abc'")):
        save_checkpoint(tmp_path / "c.pt", {**good, field: value})
        with pytest.raises(ValueError, match=f"malformed: .*{message}"):
            pymeta.load(tmp_path / "c.pt")
    with pytest.raises(TypeError, match="map_location must be a device .*got dict"):
        pymeta.load(tmp_path / "c.pt", {"cuda:0": "cpu"})


def test_nan_logits_score_nan_not_chance():
    from pymeta.engine.evaluate import task_scores
    logits = torch.zeros(3, 4, 2)
    logits[1, 2, 0] = float("nan")
    labels = torch.zeros(3, 4, dtype=torch.long)
    scores = task_scores(logits, labels, "acc")
    assert scores[0] == 1 and scores[1].isnan() and scores[2] == 1


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Not mkstemp's 0600: a dataset downloaded into a shared data root stays readable."""
    import importlib
    import os
    import pymeta._atomic as atomic
    old = os.umask(0o022)
    try:
        importlib.reload(atomic)  # it reads the umask once, at import
        with atomic.atomic_open(tmp_path / "f.bin") as f:
            f.write(b"x")
    finally:
        os.umask(old)
        importlib.reload(atomic)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


def test_atomic_writes_remove_temps_that_dead_writers_left(tmp_path):
    """A kill -9 mid-download leaves .<name>.<random>.tmp; the next write of that file removes
    it once it has been untouched for STALE_TEMP_S, and leaves a live writer's alone."""
    import os
    from pymeta._atomic import STALE_TEMP_S, atomic_open
    dead, live = tmp_path / ".data.zip.abc123.tmp", tmp_path / ".data.zip.def456.tmp"
    for t in (dead, live):
        t.write_bytes(b"partial")
    old = dead.stat().st_mtime - STALE_TEMP_S - 1
    os.utime(dead, (old, old))
    with atomic_open(tmp_path / "data.zip") as f:
        f.write(b"whole")
    assert not dead.exists() and live.exists()
    assert (tmp_path / "data.zip").read_bytes() == b"whole"


def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint_module.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]   # no temp file left behind


def test_metrics_log_files_and_plot(tmp_path):
    log = MetricsLog(tmp_path)
    for s in range(1, 4):
        log.append({"step": s, "split": "train", "loss": 1.0 / s, "acc": 0.5, "ci95": None,
                    "lr": 1e-3, "tasks_per_s": 10.0, "elapsed_s": s})
    log.append({"step": 3, "split": "val", "loss": None, "acc": 0.6, "ci95": 0.01,
                "lr": 1e-3, "tasks_per_s": None, "elapsed_s": 3})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == log.rows
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,split,loss,acc") and len(csv_lines) == 5
    png = log.plot()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A resumed run restarts from the checkpoint's rows: later rows disappear from the files.
    MetricsLog(tmp_path, rows[:2])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3


def test_one_shot_runs_of_different_sizes_are_scored_together():
    from pymeta.data import OneShotRun
    from pymeta.engine.evaluate import evaluate_runs
    from pymeta.learners import ProtoNet
    from pymeta.nn import Conv4
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    learner = ProtoNet(Conv4(hidden=8, out_channels=8))

    def run(name, ways, answers):  # queries are the support drawings themselves: no error
        support = torch.randint(0, 256, (ways, 1, 28, 28), generator=g, dtype=torch.uint8)
        answers = torch.tensor(answers)
        return OneShotRun(name, support, support[answers], answers)

    runs = [run("run01", 4, [2, 0, 3, 1]), run("run02", 3, [1, 2, 0]), run("run03", 4, [0, 1, 2, 3])]
    res = evaluate_runs(learner, runs)
    assert res == {"error": 0.0, "runs": {"run01": 0.0, "run02": 0.0, "run03": 0.0}}
    wrong = OneShotRun("run04", runs[1].support, runs[1].query, torch.tensor([0, 1, 2]))
    res = evaluate_runs(learner, runs + [wrong])
    assert res["runs"]["run04"] == 100.0 and res["error"] == 25.0
