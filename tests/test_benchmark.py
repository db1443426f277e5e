"""The benchmark harness (pymeta.benchmark): every alternative it times computes what pymeta
does, and bad arguments are refused before any timing."""
import pytest
import torch

from pymeta import benchmark
from pymeta.cli import _check_writable_file


def _cases_to_check():
    yield from benchmark.TARGETS
    yield from (("batch_norm_relu_pool", key, mode)  # the smallest of the full suite's shapes
                for key, mode in benchmark._full_cases("batch_norm_relu_pool") if key[2] == 7)


@pytest.mark.parametrize("op,key,mode", list(_cases_to_check()))
def test_every_alternative_computes_what_pymeta_does(op, key, mode):
    """build_case runs each implementation once and compares outputs (and input gradients)
    with pymeta's before handing out the callables to time."""
    torch.manual_seed(benchmark.SEED)
    with torch.set_grad_enabled(mode != "fwd"):
        impls, _ = benchmark.build_case(op, key, mode, "cpu")
    assert "pymeta" in impls and len(impls) >= 3


def test_an_alternative_that_computes_something_else_is_refused():
    x = torch.randn(4, 3)
    case = benchmark.Case({"pymeta": torch.exp, "close": lambda t: torch.exp(t) * (1 + 1e-6),
                           "off": lambda t: torch.exp(t) * 1.01}, (x,))
    with pytest.raises(RuntimeError, match="case demo: off does not compute what pymeta does"):
        benchmark._verify(case, None, "demo")
    # reshape-mean reads sorted labels while pymeta gets shuffled ones: without its own
    # reference, its prototypes are those of other samples
    with torch.no_grad():
        case = benchmark._prototypes_case((2, 5, 3, 8), "fwd", "cpu")
        benchmark._verify(case, None, "prototypes")
        with pytest.raises(RuntimeError, match="reshape_mean does not compute"):
            benchmark._verify(case._replace(same_as={}), None, "prototypes")


@pytest.mark.parametrize("kwargs,message", [
    ({"min_time": float("inf")}, "min_time must be a finite number > 0, got inf"),
    ({"min_time": float("nan")}, "min_time must be a finite number > 0, got nan"),
    ({"ops": ["batch_norm_relu_pool"], "suite": "full", "device": "cuda"},
     "batch_norm_relu_pool has no cuda kernel to time"),
])
def test_bad_arguments_are_refused_before_timing(kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark.run(**{"progress": False, **kwargs})


def test_json_path_is_checked_where_it_will_be_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _check_writable_file("--json", "~/r.json") == str(tmp_path / "r.json")
    with pytest.raises(ValueError, match="/proc is not a writable directory"):
        _check_writable_file("--json", "/proc/r.json")  # os.access says yes to root here
