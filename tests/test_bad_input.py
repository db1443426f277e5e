"""Bad input raises a clear Python exception naming the problem, never a crash.

The CPU/CUDA mix is in test_cuda.py."""
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_python
from pymeta import ops

pd, cp, sgd, sgd_ = ops.pairwise_distances, ops.class_prototypes, ops.sgd_step, ops.sgd_step_
f = torch.randn
d = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
L = torch.tensor([0, 1, 0])

CASES = {
    # pairwise_distances
    "pd rank": (lambda: pd(f(3), f(4, 3)), ValueError, r"need shape \[\.\.\., rows, features\], got x \[3\]"),
    "pd task dims": (lambda: pd(f(2, 3, 4), f(3, 3, 4)), ValueError, r"leading \(task\) dims differ: x \[2, 3, 4\] vs y \[3, 3, 4\]"),
    "pd task rank": (lambda: pd(f(2, 3, 4), f(3, 4)), ValueError, "leading .task. dims differ"),
    "pd features": (lambda: pd(f(3, 4), f(3, 5)), ValueError, "feature dims differ: x has 4, y has 5"),
    "pd metric": (lambda: pd(f(3, 4), f(3, 4), "manhattan"), ValueError, "unknown metric 'manhattan'"),
    "pd integer": (lambda: pd(torch.ones(3, 4, dtype=torch.long), f(3, 4)), TypeError, "x must be a floating tensor, got torch.int64"),
    "pd complex": (lambda: pd(f(3, 4, dtype=torch.complex64), f(3, 4, dtype=torch.complex64)), TypeError, "floating tensor"),
    "pd mixed dtypes": (lambda: pd(f(3, 4), d(3, 4)), TypeError, "x is torch.float32 but y is torch.float64"),
    "pd float16": (lambda: pd(f(3, 4).half(), f(3, 4).half()), TypeError, "float32 and float64, got torch.float16"),
    "pd bfloat16": (lambda: pd(f(3, 4).bfloat16(), f(3, 4).bfloat16()), TypeError, "got torch.bfloat16"),
    "pd numpy+torch": (lambda: pd(np.ones((3, 4)), f(3, 4)), TypeError, "must both be numpy arrays or both torch tensors"),
    "pd torch+numpy": (lambda: pd(f(3, 4), np.ones((3, 4))), TypeError, "must both be numpy arrays or both torch tensors"),
    "pd list": (lambda: pd([[1.0]], f(1, 1)), TypeError, "x must be a torch.Tensor or numpy array, got list"),
    "pd numpy int": (lambda: pd(np.ones((3, 4), int), np.ones((3, 4))), TypeError, "x must be a float32 or float64 array, got int64"),
    "pd numpy float16": (lambda: pd(np.ones((3, 4), np.float16), np.ones((3, 4), np.float16)), TypeError, "got float16"),
    "pd numpy mixed": (lambda: pd(np.ones((3, 4), np.float32), np.ones((3, 4))), TypeError, "share one dtype"),
    "pd numpy rank": (lambda: pd(np.ones(3), np.ones((3, 3))), ValueError, "rows, features"),
    "pd metric list": (lambda: pd(f(3, 4), f(3, 4), ["cosine"]), TypeError, "metric must be a string, got list"),
    "pd sparse": (lambda: pd(f(3, 4).to_sparse(), f(3, 4)), TypeError, "x is a torch.sparse_coo tensor; pass a dense one"),
    "pd meta device": (lambda: pd(f(3, 4, device="meta"), f(3, 4, device="meta")), ValueError, "unsupported device meta"),
    # class_prototypes
    "cp rank": (lambda: cp(f(3), L, 2), ValueError, r"z needs shape \[\.\.\., samples, features\], got \[3\]"),
    "cp label shape": (lambda: cp(f(3, 4), torch.tensor([0, 1]), 2), ValueError, r"labels must have shape \[3\] .*got \[2\]"),
    "cp label task dims": (lambda: cp(f(2, 3, 4), L, 2), ValueError, r"labels must have shape \[2, 3\]"),
    "cp float labels": (lambda: cp(f(3, 4), L.float(), 2), TypeError, "labels must be an integer .*float32"),
    "cp bool labels": (lambda: cp(f(3, 4), L.bool(), 2), TypeError, "labels must be an integer .*bool"),
    "cp list labels": (lambda: cp(f(3, 4), [0, 1, 0], 2), TypeError, "labels must be a torch.Tensor, got list"),
    "cp negative C": (lambda: cp(f(3, 4), L, -1), ValueError, "num_classes must be >= 0, got -1"),
    "cp float C": (lambda: cp(f(3, 4), L, 2.0), TypeError, "num_classes must be an int, got float"),
    "cp bool C": (lambda: cp(f(3, 4), L, True), TypeError, "num_classes must be an int, got bool"),
    "cp huge C": (lambda: cp(f(3, 4), L, 2**62), ValueError, r"num_classes 4611686018427387904 is too large"),
    # more classes than samples: named without allocating per-class counts (2**31 - 1 of them)
    "cp huge C no features": (lambda: cp(f(3, 0), L, 2**31 - 1), ValueError, "class 2 has no example in the task"),
    "cp more classes than samples": (lambda: cp(f(2, 3, 4), torch.tensor([[0, 4, 1], [0, 1, 2]]), 4), ValueError, r"label 4 at sample 1 of task 0 is outside \[0, 4\)"),
    "cp validate str": (lambda: cp(f(3, 4), L, 2, validate="yes"), TypeError, "validate must be True or False, got 'yes'"),
    "cp validate None": (lambda: cp(f(3, 4), L, 2, validate=None), TypeError, "validate must be True or False"),
    "cp numpy validate": (lambda: cp(np.ones((3, 4)), L.numpy(), 2, validate=1), TypeError, "validate must be True or False"),
    "cp tensor C": (lambda: cp(f(3, 4), L, torch.tensor(2)), TypeError, "num_classes must be an int"),
    "cp integer z": (lambda: cp(torch.ones(3, 4, dtype=torch.long), L, 2), TypeError, "z must be a floating tensor"),
    "cp float16": (lambda: cp(f(3, 4).half(), L, 2), TypeError, "got torch.float16"),
    "cp numpy+torch": (lambda: cp(np.ones((3, 4)), L, 2), TypeError, "must both be numpy arrays or both torch tensors"),
    "cp torch+numpy": (lambda: cp(f(3, 4), L.numpy(), 2), TypeError, "must both be numpy arrays or both torch tensors"),
    "cp numpy float labels": (lambda: cp(np.ones((3, 4)), np.zeros(3), 2), TypeError, "labels must be an integer"),
    "cp numpy int z": (lambda: cp(np.ones((3, 4), int), np.zeros(3, int), 2), TypeError, "z must be a float32 or float64 array"),
    "cp numpy label shape": (lambda: cp(np.ones((3, 4)), np.zeros(2, int), 2), ValueError, "labels must have shape"),
    "cp negative label": (lambda: cp(f(3, 4), torch.tensor([0, -1, 1]), 2), ValueError, r"label -1 at sample 1 of the task is outside \[0, 2\)"),
    "cp large label": (lambda: cp(f(3, 4), torch.tensor([0, 2, 1]), 2), ValueError, r"label 2 at sample 1 .* outside \[0, 2\)"),
    "cp uint64 label": (lambda: cp(f(3, 4), torch.tensor([0, 2**63 + 5, 1], dtype=torch.uint64), 2), ValueError, r"label 9223372036854775813 at sample 1 .* outside \[0, 2\)"),
    "cp numpy uint64 label": (lambda: cp(np.ones((3, 4)), np.array([0, 1, 2**64 - 1], np.uint64), 5), ValueError, r"label 18446744073709551615 at sample 2 .* outside \[0, 5\)"),
    "cp sparse labels": (lambda: cp(f(3, 4), L.to_sparse(), 2), TypeError, "labels is a torch.sparse_coo tensor; pass a dense one"),
    "cp empty class": (lambda: cp(f(2, 3, 4), torch.tensor([[0, 1, 0], [0, 0, 0]]), 2), ValueError, "class 1 has no example in task 1"),
    # sgd_step
    "sgd list lengths": (lambda: sgd([f(3)], [f(3), f(3)], 0.1), ValueError, "got 1 params but 2 grads"),
    "sgd lr length": (lambda: sgd([f(3)], [f(3)], [f(()), f(())]), ValueError, "got 2 learning rates for 1 params"),
    "sgd broadcast": (lambda: sgd([f(3)], [f(4)], 0.1), ValueError, r"tensor 0: shapes do not broadcast: param \[3\], grad \[4\]"),
    "sgd broadcast lr": (lambda: sgd([f(3), f(3)], [f(3), f(3)], [f(3), f(2)]), ValueError, r"tensor 1: .*lr \[2\]"),
    "sgd broadcast task": (lambda: sgd([f(2, 3)], [f(4, 3)], 0.1), ValueError, "do not broadcast"),
    "sgd integer param": (lambda: sgd([torch.ones(3, dtype=torch.long)], [f(3)], 0.1), TypeError, r"params\[0\] must be a floating tensor"),
    "sgd integer grad": (lambda: sgd([f(3)], [torch.ones(3, dtype=torch.long)], 0.1), TypeError, r"grads\[0\] must be a floating tensor"),
    "sgd mixed in tensor": (lambda: sgd([f(3)], [d(3)], 0.1), TypeError, "float64.*float32|float32.*float64"),
    "sgd mixed across": (lambda: sgd([f(3), d(3)], [f(3), d(3)], 0.1), TypeError, r"\[1\].*float64|float64.*\[1\]"),
    "sgd mixed lr": (lambda: sgd([f(3)], [f(3)], [d(3)]), TypeError, r"lr\[0\] is torch.float64"),
    "sgd float16": (lambda: sgd([f(3).half()], [f(3).half()], 0.1), TypeError, "got torch.float16"),
    "sgd numpy+torch": (lambda: sgd([np.ones(3)], [f(3)], 0.1), TypeError, "mix of numpy arrays and other types"),
    "sgd lr str": (lambda: sgd([f(3)], [f(3)], "0.1"), TypeError, "lr must be a float, a tensor or a list of tensors, got str"),
    "sgd lr tensor shape": (lambda: sgd([f(3), f(2)], [f(3), f(2)], f(3)), ValueError, r"tensor 1: .*lr \[3\]"),
    "sgd lr bool": (lambda: sgd([f(3)], [f(3)], True), TypeError, "got bool"),
    "sgd lr list of floats": (lambda: sgd([f(3)], [f(3)], [0.1]), TypeError, r"lr\[0\] must be a tensor .*got float"),
    "sgd lr list with None": (lambda: sgd([f(3)], [f(3)], [None]), TypeError, r"lr\[0\] must be a tensor .*got NoneType"),
    "sgd_ lr list with None": (lambda: sgd_([f(3)], [f(3)], [None]), TypeError, r"lr\[0\] must be a tensor"),
    "sgd numpy lr list with None": (lambda: sgd([np.ones(3)], [np.ones(3)], [None]), TypeError, r"lr\[0\] must be a tensor"),
    "sgd None lists": (lambda: sgd(None, None, 0.1), TypeError, "params and grads must be lists of tensors, got NoneType"),
    "sgd_ None lists": (lambda: sgd_(None, None, 0.1), TypeError, "params and grads must be lists of tensors"),
    "sgd 0-d tensors": (lambda: sgd(f(()), f(()), 0.1), TypeError, "must be lists of tensors, got Tensor"),
    "sgd sparse grad": (lambda: sgd([f(3)], [f(3).to_sparse()], 0.1), TypeError, r"grads\[0\] is a torch.sparse_coo tensor"),
    "sgd None grad": (lambda: sgd([f(3)], [None], 0.1), TypeError, r"grads\[0\] must be a torch.Tensor"),
    # every position is checked, not only the first
    "sgd None later grad": (lambda: sgd([f(3), f(3)], [f(3), None], 0.1), TypeError, r"grads\[1\] must be a torch.Tensor .*got NoneType"),
    "sgd_ None later grad": (lambda: sgd_([f(3), f(3)], [f(3), None], 0.1), TypeError, r"grads\[1\] must be a torch.Tensor"),
    "sgd float later param": (lambda: sgd([f(3), 1.0], [f(3), f(3)], 0.1), TypeError, r"params\[1\] must be a torch.Tensor .*got float"),
    "sgd sparse later grad": (lambda: sgd([f(3), f(3)], [f(3), f(3).to_sparse()], 0.1), TypeError, r"grads\[1\] is a torch.sparse_coo tensor"),
    "sgd sparse param": (lambda: sgd([f(3).to_sparse()], [f(3)], 0.1), TypeError, r"params\[0\] is a torch.sparse_coo tensor"),
    "sgd CSR param": (lambda: sgd([f(3, 3).to_sparse_csr()], [f(3, 3)], 0.1), TypeError, r"params\[0\] is a torch.sparse_csr tensor"),
    "sgd sparse lr": (lambda: sgd([f(3)], [f(3)], [f(3).to_sparse()]), TypeError, r"lr\[0\] is a torch.sparse_coo tensor"),
    "sgd_ sparse param": (lambda: sgd_([f(3).to_sparse()], [f(3)], 0.1), TypeError, r"params\[0\] is a torch.sparse_coo tensor"),
    "sgd numpy lr, torch params": (lambda: sgd([f(3)], [f(3)], [np.ones((), np.float32)]), TypeError, "mix of numpy arrays and other types"),
    "sgd_ numpy lr, torch params": (lambda: sgd_([f(3)], [f(3)], np.ones((), np.float32)), TypeError, "mix of numpy arrays and other types"),
    "sgd numpy mixed": (lambda: sgd([np.ones(3, np.float32)], [np.ones(3)], 0.1), TypeError, "share one dtype"),
    "sgd numpy int": (lambda: sgd([np.ones(3, int)], [np.ones(3, int)], 0.1), TypeError, "float32 or float64 array, got int64"),
    "sgd numpy broadcast": (lambda: sgd([np.ones(3)], [np.ones(4)], 0.1), ValueError, "do not broadcast"),
    "sgd_ list lengths": (lambda: sgd_([f(3)], [f(3), f(3)], 0.1), ValueError, "got 1 params but 2 grads"),
    "sgd_ integer": (lambda: sgd_([torch.ones(3, dtype=torch.long)], [f(3)], 0.1), TypeError, "floating tensor"),
    "sgd_ broadcast": (lambda: sgd_([f(3)], [f(4)], 0.1), ValueError, "do not broadcast"),
}


def test_tensor_instead_of_list():
    with pytest.raises(TypeError, match="params and grads must be lists"):
        sgd(f(3), f(3), 0.1)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises(case):
    fn, exc, match = CASES[case]
    with pytest.raises(exc, match=match):
        fn()


def test_numpy_expanded_param_is_refused_in_place():
    """Stride 0: its rows share memory and cannot take the rows' different updates."""
    a = np.lib.stride_tricks.as_strided(np.zeros(3), (4, 3), (0, 8))
    with pytest.raises(ValueError, match=r"params\[0\] is an expanded view"):
        sgd_([a], [np.arange(12.).reshape(4, 3)], 0.5)
    assert not a.any()


def test_in_place_params_overlapping_across_storages_are_refused():
    """Two tensors from one numpy buffer have separate torch storages but share memory."""
    a = np.zeros(8, np.float32)
    p1, p2 = torch.from_numpy(a[:6]), torch.from_numpy(a[3:])
    with pytest.raises(ValueError, match=r"params\[0\] shares memory with params\[1\]"):
        sgd_([p1, p2], [torch.ones(6), torch.full((5,), 10.)], 1.0)
    assert not a.any()


@pytest.mark.parametrize("op", ["pairwise_distances", "class_prototypes", "sgd_step"])
def test_traced_graphs_check_new_inputs(op):
    """A traced graph replays the registered op on whatever it is given: the op checks its
    inputs itself (mismatched sizes once read far out of bounds and crashed the process)."""
    fns = {"pairwise_distances": (lambda x, y: pd(x, y, "dot"), (f(3, 4), f(2, 4)),
                                  (f(1, 1 << 20), f(1, 3)), "feature dims differ"),
           "class_prototypes": (lambda z, l: cp(z, l, 2), (f(4, 3), torch.tensor([0, 1, 0, 1])),
                                (f(1 << 16, 1), torch.tensor([0, 1])), "labels must have shape"),
           "sgd_step": (lambda p, g: sgd([p], [g], 0.1)[0], (f(3), f(3)), (f(1 << 16), f(3)),
                        "do not broadcast")}
    fn, example, bad, match = fns[op]
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(fn, example, check_trace=False)
    with pytest.raises(RuntimeError, match=match):  # TorchScript wraps the ValueError
        traced(*bad)


KERNEL_SCRATCH_OOM = """
import resource, torch, pymeta.ops as ops
D = 4 << 20  # y is 128 MiB; pairwise_distances' scratch, y transposed, 128 MiB per thread
x, y = torch.ones(1, 1, D), torch.ones(1, 8, D)
ops.pairwise_distances(x[..., :4096].contiguous(), y[..., :4096].contiguous())  # threads up
size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, ((size << 10) + (64 << 20), resource.RLIM_INFINITY))
try:
    ops.pairwise_distances(x, y)
except MemoryError as e:
    print("MemoryError:", e)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_kernel_scratch_out_of_memory_raises_memory_error():
    """Scratch that cannot be allocated inside a parallel region used to abort the process
    (an uncaught std::bad_alloc); it is allocated before the region and raises instead."""
    result = run_python("-c", KERNEL_SCRATCH_OOM)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MemoryError: out of memory for" in result.stdout
    assert "MiB of kernel scratch" in result.stdout


@pytest.mark.parametrize("lib", ["torch", "numpy"])
def test_in_place_views_interleaved_in_one_buffer_are_accepted(lib):
    """Two columns of one matrix span overlapping address ranges but share no element: they
    were refused as "sharing memory"; elements are now compared where ranges meet."""
    m = np.random.default_rng(0).standard_normal((4, 3))
    a = torch.from_numpy(m.copy()) if lib == "torch" else m.copy()
    want = [m[:, 0] - 0.5 * m[:, 1], m[:, 2] - 0.5 * m[:, 1]]
    sgd_([a[:, 0], a[:, 2]], [a[:, 1], a[:, 1]], 0.5)
    np.testing.assert_allclose(np.asarray(a)[:, [0, 2]], np.stack(want, 1), rtol=1e-15)
    with pytest.raises(ValueError, match=r"params\[0\] shares memory with a grad or rate"):
        sgd_([a[:3, 0]], [a.reshape(-1)[1:4]], 0.5)  # a[1, 0] is in both
