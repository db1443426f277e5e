"""The pymeta command line: --help everywhere, one-line errors, never a traceback."""
import subprocess
import tempfile
import sys

import pytest

from pymeta.cli import build_parser

COMMANDS = ["demo", "train", "eval", "eval-runs", "bench", "info"]


def pymeta(*args, cwd=None):
    # Never the repo root: its source tree (without the built _C) would shadow the install.
    return subprocess.run([sys.executable, "-m", "pymeta", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd or tempfile.gettempdir())


def test_every_command_has_help(capsys):
    parser = build_parser()
    for command in COMMANDS:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([command, "--help"])
        assert e.value.code == 0
        assert f"usage: pymeta {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize("args,message", [
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--algo", "nope"], "invalid choice: 'nope'"),
    (["train", "--ways", "x"], "invalid int value: 'x'"),
    (["train", "--lr-step", "0"], "argument --lr-step: must be >= 1, got 0"),
    (["train", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["eval", "--checkpoint", "x.pt", "--episodes", "0"], "argument --episodes: must be >= 1"),
    (["eval", "--checkpoint", "x.pt", "--steps", "1", "-1"], "argument --steps: must be >= 0"),
    (["eval"], "the following arguments are required: --checkpoint"),
    (["nonsense"], "invalid choice: 'nonsense'"),
])
def test_bad_options_give_one_line(args, message):
    res = pymeta(*args)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and message in res.stderr and "--help" in res.stderr


@pytest.mark.parametrize("args,message", [
    (["eval", "--checkpoint", "missing.pt"], "checkpoint not found: missing.pt"),
    (["eval-runs", "--checkpoint", "missing.pt", "--runs", "x"], "checkpoint not found"),
    (["train", "--data", "folder", "--root", "/no/such/dir", "--steps", "1"], "/no/such/dir"),
    (["train", "--data", "omniglot", "--root", "/no/such/dir", "--steps", "1"], "/no/such/dir"),
    (["train", "--ways", "7", "--steps", "1"], "val split: 7-way episodes need at least 7"),
    (["train", "--ways", "7", "--eval-ways", "2", "--steps", "1"],
     "train split: 7-way episodes need at least 7 classes, but the dataset has 5"),
    (["train", "--learner-opt", "learn_scale=maybe", "--algo", "matching", "--steps", "1"],
     "learn_scale must be True or False, got 'maybe'"),
    (["train", "--data", "sinusoid", "--backbone-opt", "hidden=8", "--steps", "1"],
     "hidden must be a list of layer widths"),
    (["train", "--data", "sinusoid", "--ways", "7", "--steps", "1"],
     "sinusoid is a regression task: --ways/--eval-ways do not apply"),
    (["train", "--data", "sinusoid", "--image-size", "20", "--augment", "--steps", "1"],
     "--image-size, --augment do not apply to --data sinusoid"),
    (["train", "--data", "digits", "--no-rotations", "--steps", "1"],
     "--no-rotations does not apply to --data digits"),
    (["train", "--data", "sinusoid", "--backbone", "conv4", "--steps", "1"],
     "sinusoid inputs are single numbers: the backbone must be mlp, got 'conv4'"),
    (["train", "--algo", "anil", "--learner-opt", 'head=["body.blocks.3"]', "--steps", "1"],
     "fixed_init parameters adapt from a fixed value, so they must lie in the head"),
    (["train", "--data", "digits", "--root", "/not/here", "--steps", "1"],
     "--root does not apply to --data digits"),
    (["train", "--backbone", "resnet12", "--backbone-opt", "drop_rate=abc", "--steps", "1"],
     "ResNet12: drop_rate must be a probability in [0, 1), got 'abc'"),
    (["train", "--backbone-opt", "channels_last=maybe", "--steps", "1"],
     "Conv4: channels_last must be True or False, got 'maybe'"),
    (["train", "--data", "sinusoid", "--optimizer", "sgd", "--lr", "1e30", "--steps", "2",
      "--val-every", "2", "--val-episodes", "4", "--test-episodes", "2", "--no-progress"],
     "every validation scored NaN, so there is no best checkpoint: the run diverged"),
    # classification too: NaN logits score NaN, not the chance that argmax's class 0 gets
    (["train", "--optimizer", "sgd", "--lr", "1e30", "--steps", "2", "--val-every", "2",
      "--val-episodes", "2", "--test-episodes", "2", "--no-progress"],
     "every validation scored NaN"),
    (["train", "--lr", "inf", "--steps", "1"], "lr must be a positive finite number, got inf"),
    # options the schedule would ignore, given or set by a preset
    (["train", "--schedule", "none", "--lr-step", "1", "--steps", "1"],
     "--lr-step/--lr-gamma apply to --schedule step only; this run's schedule is none"),
    (["train", "--preset", "omniglot", "--algo", "maml", "--lr-gamma", "0.1", "--steps", "1"],
     "this run's schedule is cosine (the preset's)"),
    (["train", "--seed", str(2 ** 64), "--steps", "1"], "seed must be in [0, 2**63), got "),
    (["train", "--lr-gamma", "0", "--steps", "1"], "lr_gamma must be a positive finite number"),
    (["train", "--weight-decay", "-1", "--steps", "1"],
     "weight_decay must be a finite number >= 0, got -1.0"),
    (["eval-runs", "--checkpoint", "missing.pt", "--runs", "x", "--json", "/no/dir/r.json"],
     "--json /no/dir/r.json: /no/dir is not a writable directory"),
    (["eval-runs", "--checkpoint", "missing.pt", "--runs", "x", "--json", "."],
     "--json . is a directory; name a file"),
    (["bench", "--json", "."], "--json . is a directory; name a file"),  # before the timings
    (["bench", "--json", "/proc/r.json"], "/proc is not a writable directory"),
    (["bench", "--min-time", "inf"], "min_time must be a finite number > 0, got inf"),
    (["train", "--out", "/dev/null", "--steps", "1"], "--out /dev/null is a file, not a run "
                                                      "directory"),
    (["demo", "--out", "/dev/null"], "--out /dev/null is a file, not a run directory"),
    (["bench", "--ops", "batch_norm_relu_pool"],
     "the targets suite has no case for batch_norm_relu_pool; time it with --suite full"),
])
def test_bad_inputs_give_one_line_errors(args, message, tmp_path):
    res = pymeta(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and message in res.stderr
    assert res.stderr.strip().count("\n") <= 1, res.stderr


@pytest.mark.parametrize("text,value", [("fce=False", False), ("fce=no", False),
                                        ("fce=TRUE", True), ("task_chunk=None", None),
                                        ("steps=3", 3), ("hidden=[8, 8]", [8, 8]),
                                        ("metric=cosine", "cosine")])
def test_option_values(text, value):
    from pymeta.cli import _key_value
    assert _key_value(text) == (text.partition("=")[0], value)


def test_mlp_backbone_on_images_and_the_sinusoid_preset(tmp_path):
    """An MLP sees flat pixels; the sinusoid preset needs no --algo (MAML's)."""
    tiny = ["--steps", "2", "--val-every", "2", "--val-episodes", "2", "--test-episodes", "2",
            "--no-progress"]
    for args in (["--backbone", "mlp", "--algo", "maml", "--ways", "2", "--shots", "1",
                  "--queries", "1", "--out", "mlp"], ["--preset", "sinusoid", "--out", "sine"]):
        res = pymeta("train", *args, *tiny, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
    import pymeta as pm
    assert type(pm.load(tmp_path / "sine" / "best.pt")).__name__ == "MAML"


def test_scores_read_naturally():
    from pymeta.cli import _score
    one = {"shots": 5, "queries": 1, "steps": 1, "mse": 1.0, "ci95": float("nan"), "episodes": 1}
    assert _score(one) == "5-shot (1 query, 1 inner step): MSE 1.000 (1 task)"
    two = {"ways": 5, "shots": 1, "queries": 15, "acc": 0.5, "ci95": 0.01, "episodes": 2}
    assert _score(two) == "5-way 1-shot (15 queries): accuracy 50.00% ± 1.00% (95% CI, 2 episodes)"


def test_corrupt_checkpoint_one_line(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    res = pymeta("eval", "--checkpoint", "bad.pt", cwd=tmp_path)
    assert res.returncode == 2 and "not a readable pymeta checkpoint" in res.stderr
    assert "Traceback" not in res.stderr


def test_learner_and_backbone_options_reach_the_checkpoint(tmp_path):
    res = pymeta("train", "--algo", "matching", "--learner-opt", "fce=true", "--learner-opt",
                 "fce_steps=2", "--backbone-opt", "hidden=8", "--ways", "2", "--shots", "1",
                 "--queries", "1", "--steps", "2", "--val-every", "2", "--val-episodes", "2",
                 "--test-episodes", "2", "--no-progress", "--out", "run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    import pymeta as pm
    learner = pm.load(tmp_path / "run" / "best.pt")
    assert learner.extra_config()["fce"] is True and learner.extra_config()["fce_steps"] == 2
    assert learner.backbone.blocks[0][0].out_channels == 8
    for bad, message in ((["--learner-opt", "nokey"], "expected KEY=VALUE"),
                         (["--learner-opt", "foo=1"], "invalid options for learner 'protonet'")):
        res = pymeta("train", *bad, "--steps", "1", cwd=tmp_path)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_corrupt_image_in_a_folder_dataset_one_line(tmp_path):
    from PIL import Image
    for c in range(6):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (c * 40, i, 0)).save(tmp_path / "data" / f"class{c}" / f"{i}.png")
    (tmp_path / "data" / "class3" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    res = pymeta("train", "--data", "folder", "--root", "data", "--steps", "1", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "1.png" in res.stderr and "class3" in res.stderr


def test_resume_from_moved_data_needs_only_the_new_root(tmp_path):
    """``train --out DIR --resume --root NEW`` continues a folder run whose data moved: the
    run's own options apply, so --root is judged against its data, not the default's."""
    import shutil
    from PIL import Image
    for c in range(12):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (12, 12), (c * 20, i * 90, 0)).save(
                tmp_path / "data" / f"class{c}" / f"{i}.png")
    tiny = ["--ways", "2", "--shots", "1", "--queries", "1", "--eval-queries", "1",
            "--image-size", "16", "--val-episodes", "2", "--test-episodes", "2",
            "--no-progress", "--threads", "1"]
    res = pymeta("train", "--data", "folder", "--root", "data", "--steps", "2", "--val-every",
                 "1", *tiny, "--out", "run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    shutil.move(tmp_path / "data", tmp_path / "moved")
    res = pymeta("train", "--out", "run", "--resume", "--root", "moved", "--no-progress",
                 cwd=tmp_path)
    assert res.returncode == 0, res.stderr


TINY = ["--ways", "2", "--shots", "1", "--queries", "1", "--steps", "2", "--val-every", "2",
        "--val-episodes", "2", "--test-episodes", "2", "--no-progress", "--threads", "1"]


def test_a_run_directory_takes_one_run_at_a_time(tmp_path):
    """A second train into a directory in use refuses at once, instead of both writing
    their checkpoints and metrics into it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pymeta._atomic import directory_lock\n"
         "with directory_lock(sys.argv[1], 'test'):\n print('held', flush=True); time.sleep(60)",
         str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = pymeta("train", *TINY, "--out", "run", cwd=tmp_path)
        assert res.returncode == 2 and "is in use by another process" in res.stderr
        assert not (tmp_path / "run" / "metrics.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    res = pymeta("train", *TINY, "--out", "run", cwd=tmp_path)  # the lock died with its holder
    assert res.returncode == 0, res.stderr


def test_demo_never_overwrites_a_best_checkpoint(tmp_path):
    """A directory holding only another run's best.pt: demo resumes rather than starts over,
    so the other run's config is refused and its files stay as they were."""
    res = pymeta("train", "--algo", "matching", *TINY, "--out", "run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (tmp_path / "run" / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    res = pymeta("demo", "--out", "run", "--no-progress", cwd=tmp_path)
    assert res.returncode == 2 and "cannot resume: the checkpoint's run config differs" in res.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()
            if p.is_file() and p.name in before} == before
    res = pymeta("eval", "--checkpoint", "run", cwd=tmp_path)
    assert res.returncode == 2 and "is a run directory, not a checkpoint: pass run/best.pt" in res.stderr
    res = pymeta("eval", "--checkpoint", "run/best.pt", "--root", "x", cwd=tmp_path)
    assert res.returncode == 2 and "--root does not apply" in res.stderr


def test_a_folder_that_changed_is_refused_by_eval_and_resume(tmp_path):
    """A class added to an image folder re-draws its random split, so the test split would
    hold training classes: eval and resume compare the run's class digests and refuse."""
    from PIL import Image
    for c in range(12):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (12, 12), (c * 20, i * 90, 0)).save(
                tmp_path / "data" / f"class{c}" / f"{i}.png")
    folder = ["--data", "folder", "--root", "data", "--image-size", "16", "--eval-queries", "1"]
    res = pymeta("train", *folder, *TINY, "--out", "run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = pymeta("eval", "--checkpoint", "run/best.pt", "--episodes", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr  # unchanged data: accepted
    import shutil
    shutil.copytree(tmp_path / "data" / "class0", tmp_path / "data" / "class12")
    res = pymeta("eval", "--checkpoint", "run/best.pt", "--episodes", "2", cwd=tmp_path)
    assert res.returncode == 2 and "the data's test classes differ from the run's" in res.stderr
    res = pymeta("train", "--out", "run", "--resume", "--no-progress",
                 cwd=tmp_path)
    assert res.returncode == 2 and "cannot resume: the data's train/val/test classes differ" \
        in res.stderr


def test_an_interrupted_train_says_how_to_resume(monkeypatch, capsys, tmp_path):
    """--resume is suggested once a checkpoint exists; before that it would start a run
    with default options, not the interrupted one's."""
    import pymeta.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_train", interrupted)
    out = tmp_path / "x"
    assert cli.main(["train", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted; no checkpoint in {out} yet, so nothing to resume: run the command again")
    out.mkdir()
    (out / "last.pt").touch()
    assert cli.main(["train", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted; continue from its last checkpoint with: pymeta train --out {out} --resume")
