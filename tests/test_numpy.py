"""numpy arrays in, numpy arrays out: same kernels as the torch path, checked against both."""
import numpy as np
import pytest
import torch

from conftest import METRICS, TOL, ref_sgd
from pymeta import ops
from pymeta.ops import reference

NP_DTYPES = [np.float32, np.float64]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _check(out, expected_torch, dtype):
    """numpy result: right type and dtype, identical to the torch path's result."""
    assert isinstance(out, np.ndarray) and out.dtype == dtype
    np.testing.assert_array_equal(out, expected_torch.numpy())


@pytest.mark.parametrize("dtype", NP_DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_distances(dtype, metric):
    r = _rng()
    x, y = r.standard_normal((3, 7, 20)).astype(dtype), r.standard_normal((3, 4, 20)).astype(dtype)
    out = ops.pairwise_distances(x, y, metric)
    _check(out, ops.pairwise_distances(torch.from_numpy(x), torch.from_numpy(y), metric), dtype)
    ref = reference.pairwise_distances(torch.from_numpy(x), torch.from_numpy(y), metric)
    torch.testing.assert_close(torch.from_numpy(out), ref, **TOL[torch.from_numpy(x).dtype])
    # non-contiguous arrays: Fortran order, strided slices, broadcast (zero-stride) views
    xs = [np.asfortranarray(x), np.repeat(x, 2, axis=1)[:, ::2], x]
    ys = [y, y, np.broadcast_to(y[:1], y.shape)]
    for xv, yv in zip(xs, ys):
        expected = ops.pairwise_distances(np.ascontiguousarray(xv), np.ascontiguousarray(yv), metric)
        np.testing.assert_array_equal(ops.pairwise_distances(xv, yv, metric), expected)


@pytest.mark.parametrize("shape", [((2,), 0, 3, 4), ((2,), 3, 0, 4), ((2,), 3, 4, 0), ((0,), 3, 4, 5)])
def test_pairwise_distances_empty(shape):
    lead, Q, N, D = shape
    x, y = np.ones((*lead, Q, D)), np.ones((*lead, N, D))
    out = ops.pairwise_distances(x, y, "cosine")
    ref = reference.pairwise_distances(torch.from_numpy(x), torch.from_numpy(y), "cosine")
    assert out.shape == (*lead, Q, N)
    np.testing.assert_array_equal(out, ref.numpy())


@pytest.mark.parametrize("dtype", NP_DTYPES)
@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.uint8])
def test_class_prototypes(dtype, label_dtype):
    r = _rng(1)
    z = r.standard_normal((4, 9, 600)).astype(dtype)
    labels = np.stack([r.permutation(np.arange(9) % 3) for _ in range(4)]).astype(label_dtype)
    out = ops.class_prototypes(z, labels, 3)
    tz, tl = torch.from_numpy(z), torch.from_numpy(labels.astype(np.int64))
    _check(out, ops.class_prototypes(tz, tl, 3), dtype)
    torch.testing.assert_close(torch.from_numpy(out), reference.class_prototypes(tz, tl, 3),
                               **TOL[tz.dtype])
    zt = np.asfortranarray(z)  # non-contiguous
    np.testing.assert_array_equal(ops.class_prototypes(zt, labels[:, ::-1].copy()[:, ::-1], 3), out)


def test_class_prototypes_validation_and_unvalidated():
    z = np.arange(12.0).reshape(2, 3, 2)
    labels = np.array([[0, 0, 5], [1, 0, 0]])
    with pytest.raises(ValueError, match=r"label 5 at sample 2 of task 0 is outside \[0, 2\)"):
        ops.class_prototypes(z, labels, 2)
    with pytest.raises(ValueError, match="class 1 has no example in task 0"):
        ops.class_prototypes(z, np.array([[0, 0, 0], [1, 0, 0]]), 2)
    out = ops.class_prototypes(z, labels, 2, validate=False)
    ref = reference.class_prototypes(torch.from_numpy(z), torch.from_numpy(labels), 2)
    np.testing.assert_allclose(out, ref.numpy())
    assert np.isnan(out[0, 1]).all()
    assert ops.class_prototypes(np.ones((0, 3, 2)), np.zeros((0, 3), np.int64), 2).shape == (0, 2, 2)


@pytest.mark.parametrize("dtype", NP_DTYPES)
def test_sgd_step(dtype):
    r = _rng(2)
    a = lambda *s: r.standard_normal(s).astype(dtype)  # noqa: E731
    params = [a(5, 4), a(3), a(4, 6)[:, ::2], a(2, 2)]
    grads = [a(2, 5, 4), a(2, 3), a(4, 3), a(2, 2).T]
    lrs = [a(), a(3), a(4, 1), a(2, 2)]
    T = lambda arrs: [torch.from_numpy(np.ascontiguousarray(x)) for x in arrs]  # noqa: E731
    for lr in (0.3, lrs):
        out = ops.sgd_step(params, grads, lr)
        expected = ops.sgd_step(T(params), T(grads), lr if lr == 0.3 else T(lr))
        assert len(out) == len(params)
        for o, e in zip(out, expected):
            _check(o, e, dtype)
        ref = ref_sgd(T(params), T(grads), lr if lr == 0.3 else T(lr))
        for o, e in zip(out, ref):
            np.testing.assert_allclose(o, e.numpy(), rtol=1e-6)


def test_sgd_step_inplace_updates_the_arrays():
    base = np.arange(24.0).reshape(4, 6)
    params = [np.zeros((2, 3)), base[:, ::2]]  # the second is a strided view into base
    grads = [np.ones((2, 3)), np.ones((4, 3))]
    expected = ops.sgd_step(params, grads, 0.5)
    result = ops.sgd_step_(params, grads, 0.5)
    assert result[0] is params[0] and result[1] is params[1]
    np.testing.assert_array_equal(params[0], expected[0])
    np.testing.assert_array_equal(base[:, ::2], expected[1])
    np.testing.assert_array_equal(base[:, 1::2], np.arange(24.0).reshape(4, 6)[:, 1::2])
    with pytest.raises(ValueError, match="cannot hold the update"):
        ops.sgd_step_([np.zeros(3)], [np.ones((2, 3))], 0.1)


def test_sgd_step_keeps_0d_arrays_and_numpy_scalar_rates():
    """0-d arrays stay 0-d (as torch's 0-d tensors), and numpy's float scalars are rates."""
    out = ops.sgd_step([np.array(1.0)], [np.array(2.0)], np.float32(0.5))
    assert out[0].shape == () and out[0] == 0.0
    p = np.array(3.0)
    ops.sgd_step_([p], [np.array(2.0)], 0.5)
    assert p.shape == () and p == 2.0


def test_sgd_step_inplace_refuses_read_only_arrays_before_writing_any():
    a, b = np.zeros(3), np.zeros(3)
    b.setflags(write=False)
    with pytest.raises(ValueError, match=r"params\[1\] is a read-only array"):
        ops.sgd_step_([a, b], [np.ones(3), np.ones(3)], 0.5)
    np.testing.assert_array_equal(a, np.zeros(3))


def test_sgd_step_none_params_read_as_zero_as_for_tensors():
    g = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = ops.sgd_step([None, np.ones(3, np.float32)], [g, np.ones(3, np.float32)], 0.5)
    np.testing.assert_array_equal(out[0], -0.5 * g)
    assert out[0].dtype == np.float32
    ref = ops.sgd_step([None], [torch.from_numpy(g)], 0.5)[0]
    np.testing.assert_array_equal(out[0], ref.numpy())


def test_unaligned_buffers_reach_the_kernels_as_aligned_copies():
    """A view at an odd byte offset is C-contiguous but not element-aligned, which the
    kernels' vector code assumes; such arrays are copied first and give the same results."""
    from pymeta.ops._kernels import numpy_float
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 3, 8))
    odd = np.frombuffer(b"\0" + x.tobytes(), dtype=np.float64, offset=1).reshape(x.shape)
    assert odd.flags.c_contiguous and not odd.flags.aligned
    assert numpy_float("op", "x", odd).flags.aligned
    assert np.array_equal(ops.pairwise_distances(odd, y), ops.pairwise_distances(x, y))
    assert numpy_float("op", "x", np.float64(2.0).reshape(())).shape == ()


def test_big_endian_arrays_are_read_in_native_order():
    """Arrays stored big-endian ('>f8', from a file written elsewhere) were refused as "must be
    a float32 or float64 array"; they are converted like any other layout."""
    rng = np.random.default_rng(3)
    x, y, p, g = (rng.standard_normal(s) for s in ((5, 4), (3, 4), (4, 3), (4, 3)))
    big = lambda a: a.astype(a.dtype.newbyteorder(">"))  # noqa: E731
    assert not big(x).dtype.isnative
    np.testing.assert_array_equal(ops.pairwise_distances(big(x), big(y), "cosine"),
                                  ops.pairwise_distances(x, y, "cosine"))
    labels = np.array([0, 1, 2, 0, 1])
    np.testing.assert_array_equal(ops.class_prototypes(big(x), labels, 3),
                                  ops.class_prototypes(x, labels, 3))
    np.testing.assert_array_equal(ops.sgd_step([big(p)], [big(g)], 0.5)[0], p - 0.5 * g)
    q = big(p)
    ops.sgd_step_([q], [big(g)], 0.5)
    np.testing.assert_array_equal(q, p - 0.5 * g)
