import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import (DTYPES, SETTINGS, assert_close, covering_labels, gen, lead_shapes, rand,
                      seeds, sizes, vjp)
from pymeta import ops
from pymeta.ops import reference

cp = ops.class_prototypes


def _labels_valid(labels, C):
    in_range = ((labels >= 0) & (labels < C)).all()
    counts = torch.nn.functional.one_hot(labels.clamp(0, max(C - 1, 0)), max(C, 1))[..., :C].sum(-2)
    return bool(in_range) and bool((counts > 0).all())


@SETTINGS
@given(lead=lead_shapes, S=st.integers(0, 9), C=sizes, D=st.sampled_from([0, 1, 3, 17, 600]),
       dtype=st.sampled_from(DTYPES), seed=seeds)
def test_random_labels_match_reference(lead, S, C, D, dtype, seed):
    """Any labels, including out-of-range ones and empty classes."""
    g = gen(seed)
    z = rand(*lead, S, D, dtype=dtype, gen=g)
    labels = torch.randint(-1, C + 1, (*lead, S), generator=g)
    ref = reference.class_prototypes(z, labels, C)
    out = cp(z, labels, C, validate=False)  # out-of-range ignored, empty classes NaN
    assert out.shape == (*lead, C, D) and out.dtype == dtype
    assert_close(out, ref, dtype)
    if _labels_valid(labels, C):
        assert_close(cp(z, labels, C), ref, dtype)
    else:
        with pytest.raises(ValueError, match="outside|no example"):
            cp(z, labels, C)


@SETTINGS
@given(lead=lead_shapes, C=sizes, extra=st.integers(0, 6), D=st.sampled_from([0, 1, 5, 40, 530]),
       dtype=st.sampled_from(DTYPES), seed=seeds, strided=st.booleans())
def test_forward_and_backward_match_reference(lead, C, extra, D, dtype, seed, strided):
    """Valid, shuffled labels with unequal shots, embeddings dense or strided: values and
    gradients."""
    g = gen(seed)
    S = C + extra if C else 0  # with no class, no label can be valid
    z = rand(*lead, S, D, dtype=dtype, gen=g, requires_grad=True)
    if strided:  # the transpose of a [D, S] tensor
        z = z.detach().mT.contiguous().mT.requires_grad_()
    labels = covering_labels(lead, S, C, g)
    out, (gz,) = vjp(lambda a: cp(a, labels, C), (z,))
    ref, (ref_gz,) = vjp(lambda a: reference.class_prototypes(a, labels, C), (z,))
    assert_close(out, ref, dtype)
    assert_close(gz, ref_gz, dtype)
    with torch.no_grad():
        assert torch.equal(cp(z, labels, C), out)


def test_means_of_unsorted_labels_with_unequal_shots():
    z = rand(2, 7, 3)
    labels = torch.tensor([[2, 0, 2, 1, 2, 0, 2], [1, 1, 1, 1, 1, 1, 0]])
    out = cp(z, labels, 3, validate=False)
    for t in range(2):
        for c in range(3):
            if (labels[t] == c).any():
                assert_close(out[t, c], z[t][labels[t] == c].mean(0))
    assert out[1, 2].isnan().all()
    with pytest.raises(ValueError, match="class 2 has no example in task 1"):
        cp(z, labels, 3)


def test_gradcheck_and_gradgradcheck():
    z = rand(2, 6, 3, requires_grad=True)
    labels = torch.tensor([[0, 1, 0, 2, 0, 1], [2, 2, 1, 0, 1, 1]])
    fn = lambda a: cp(a, labels, 3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z,))
    assert torch.autograd.gradgradcheck(fn, (z,))


def test_error_names_label_class_and_task():
    labels = torch.tensor([0, 1, 2, 0, 1, 2]).repeat(2, 3, 1)
    z = rand(2, 3, 6, 4)
    bad = labels.clone()
    bad[1, 2, 4] = 7
    with pytest.raises(ValueError, match=r"label 7 at sample 4 of task \(1, 2\) is outside \[0, 3\)"):
        cp(z, bad, 3)
    bad = labels.clone()
    bad[0, 1, 3] = -1
    with pytest.raises(ValueError, match=r"label -1 at sample 3 of task \(0, 1\)"):
        cp(z, bad, 3)
    bad = labels.clone()
    bad[1, 0] = 0
    with pytest.raises(ValueError, match=r"class 1 has no example in task \(1, 0\)"):
        cp(z, bad, 3)
    with pytest.raises(ValueError, match="label 3 at sample 2 of the task"):
        cp(z[0, 0], torch.tensor([0, 1, 3, 0, 1, 2]), 3)
    with pytest.raises(ValueError, match=f"label {2**40} at sample 0 of task 0"):
        cp(z[0], torch.full((3, 6), 2**40), 3)


def test_unvalidated_out_of_range_labels_are_ignored():
    z = rand(2, 6, 5, requires_grad=True)
    labels = torch.tensor([[0, 1, 2**62, 1, -2**62, 0], [1, 0, -1, 3, 1, 0]])
    out, (gz,) = vjp(lambda a: cp(a, labels, 2, validate=False), (z,))
    assert_close(out, reference.class_prototypes(z, labels, 2))
    keep = (labels >= 0) & (labels < 2)
    assert not gz[~keep].any()  # ignored samples get no gradient
    assert torch.isfinite(gz).all()


def test_unvalidated_empty_class_is_nan_with_finite_gradient():
    z = rand(2, 4, 3, requires_grad=True)
    labels = torch.tensor([[0, 0, 2, 2], [1, 0, 1, 0]])  # class 1 empty in task 0, 2 in task 1
    out, (gz,) = vjp(lambda a: cp(a, labels, 3, validate=False), (z,), [torch.ones(2, 3, 3, dtype=torch.float64)])
    assert out[0, 1].isnan().all() and out[1, 2].isnan().all()
    assert_close(out, reference.class_prototypes(z, labels, 3))
    # d(sum of class means)/dz_s = 1 / (shots of the class of s); the empty class adds nothing
    assert_close(gz, torch.full_like(z, 0.5))


@pytest.mark.parametrize("shape", [  # (lead, S, C, D)
    ((0,), 4, 2, 3), ((2,), 4, 2, 0), ((2,), 0, 0, 3), ((2,), 3, 0, 3), ((3, 0), 2, 1, 2)])
def test_empty_dims(shape):
    lead, S, C, D = shape
    z = rand(*lead, S, D, requires_grad=True)
    labels = covering_labels(lead, S, C) if C else torch.zeros(*lead, S, dtype=torch.long)
    validate = C > 0 or S == 0
    out, (gz,) = vjp(lambda a: cp(a, labels, C, validate=validate), (z,))
    ref = reference.class_prototypes(z, labels, C)
    assert out.shape == ref.shape == (*lead, C, D)
    assert_close(out, ref)
    assert gz.shape == z.shape and not gz.any()


@pytest.mark.parametrize("S, C, D", [(3, 0, 4), (0, 3, 0)])
def test_validate_empty_outputs(S, C, D):
    # every label is outside [0, 0) / every class is empty: both raise for S, C, D > 0
    with pytest.raises(ValueError, match="outside|no example"):
        cp(torch.zeros(2, S, D), torch.zeros(2, S, dtype=torch.long), C)


def test_nan_and_inf_propagate_like_reference():
    z = rand(2, 6, 4)
    z[0, 1, 2] = float("nan")
    z[1, 3, 0] = float("inf")
    z[1, 4, 0] = -float("inf")
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 1, 0, 1, 1, 0]])
    out = cp(z, labels, 3)
    # a NaN or Inf stays in its own class (a one-hot matmul would leak it: 0 * nan)
    masked = torch.stack([torch.stack([z[t][labels[t] == c].mean(0) for c in range(3)])
                          for t in range(2)])
    assert_close(out, masked)
    assert_close(reference.class_prototypes(z, labels, 3), masked)
    assert out[0, 1, 2].isnan() and out[1, 1, 0].isnan() and torch.isfinite(out[0, 0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs_and_label_dtypes(dtype):
    labels = torch.tensor([3, 0, 1, 2, 4, 0, 1, 2, 3, 4])
    zc = rand(4, 10, 7, dtype=dtype)
    expected = cp(zc, labels.expand(4, 10), 5)
    variants = [
        (zc.transpose(-1, -2).contiguous().transpose(-1, -2), labels.expand(4, 10)),
        (torch.stack([zc, zc], -1)[..., 0], labels.repeat_interleave(2).repeat(4, 1)[:, ::2]),
        (zc[:1].expand(4, 10, 7), labels.to(torch.int32).expand(4, 10)),
        (zc, labels.to(torch.uint8).expand(4, 10).contiguous()),
        (zc, labels.to(torch.int16).expand(4, 10)),
    ]
    for i, (z, lab) in enumerate(variants):
        z = z.detach().requires_grad_()
        go = rand(4, 5, 7, dtype=dtype)
        out, (gz,) = vjp(lambda a: cp(a, lab, 5), (z,), [go])
        want = expected if i != 2 else cp(zc[:1], labels[None], 5).expand(4, 5, 7)
        assert torch.equal(out, want), i
        _, (gzc,) = vjp(lambda a: cp(a, lab.long(), 5), (z.detach().contiguous().requires_grad_(),), [go])
        assert torch.equal(gz, gzc), i


def test_num_classes_accepts_numpy_integer():
    import numpy as np
    z, labels = rand(5, 2), torch.tensor([0, 1, 0, 1, 2])
    assert torch.equal(cp(z, labels, np.int64(3)), cp(z, labels, 3))


def test_gradient_streamed_past_the_cache():
    """A gradient past the last-level cache (here 76 MB) is written with non-temporal stores:
    the same values as the reference's, for unequal shots."""
    g = gen(4)
    labels = covering_labels((2,), 53, 5, g)  # 11, 11, 11, 10, 10 shots
    z = rand(2, 53, 90_000, gen=g, requires_grad=True)
    go = rand(2, 5, 90_000, gen=g)
    got = torch.autograd.grad(cp(z, labels, 5), z, go)[0]
    want = torch.autograd.grad(reference.class_prototypes(z, labels, 5), z, go)[0]
    assert_close(got, want)
