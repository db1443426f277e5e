"""The pymeta command line: --help everywhere, one-line errors, never a traceback."""
import subprocess
import sys

import pytest

from pymeta.cli import build_parser

COMMANDS = ["demo", "train", "eval", "eval-runs", "bench", "info"]


def pymeta(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pymeta", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


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
    (["train", "--ways", "7", "--steps", "1"], "7-way episodes need at least 7 classes"),
    (["train", "--ways", "0"], "ways must be >= 1"),
])
def test_bad_inputs_give_one_line_errors(args, message, tmp_path):
    res = pymeta(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and message in res.stderr
    assert res.stderr.strip().count("\n") <= 1, res.stderr


def test_corrupt_checkpoint_one_line(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    res = pymeta("eval", "--checkpoint", "bad.pt", cwd=tmp_path)
    assert res.returncode == 2 and "not a readable pymeta checkpoint" in res.stderr
    assert "Traceback" not in res.stderr
