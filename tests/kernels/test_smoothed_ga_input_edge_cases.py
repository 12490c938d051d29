"""Edge cases of the smoothed-GA losses' inputs that must give the right number or a clear error, never a crash:
ignore_index outside the labels' dtype, in-place backward over overlapping logits, a normalizer tensor that
requires grad."""
import pytest
import torch

from sga.kernels import linear_smoothed_ga_loss, smoothed_ga_loss

BACKENDS = ["torch", "triton"]


def _inputs(n=6, v=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=generator)
    labels = torch.randint(0, v, (n,), generator=generator)
    labels[0] = 0  # a label that an ignore_index of 2**32 wraps onto in int32
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels_with_an_ignore_index_outside_int32_ignore_nothing(backend):
    """2**32 wraps to 0 in int32: an int32 comparison would take label 0 as ignored and divide the mean by the
    wrong count."""
    logits, labels = _inputs()
    expected = smoothed_ga_loss(logits, labels, backend=backend)  # int64, nothing ignored
    ours = smoothed_ga_loss(logits, labels.int(), ignore_index=2**32, backend=backend)
    torch.testing.assert_close(ours, expected)
    per_token = smoothed_ga_loss(logits, labels.int(), ignore_index=2**32, reduction="none", backend=backend)
    assert bool((per_token != 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_loss_int32_labels_with_an_ignore_index_outside_int32(backend):
    logits, labels = _inputs()
    hidden = torch.randn(6, 4)
    weight = torch.randn(11, 4)
    expected = linear_smoothed_ga_loss(hidden, weight, labels, backend=backend)
    ours = linear_smoothed_ga_loss(hidden, weight, labels.int(), ignore_index=2**32, backend=backend)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_int32_label_equal_to_a_wrapped_ignore_index_is_out_of_range_not_a_crash(backend):
    """ignore_index = 2**32 - 2**30 wraps to -2**30 in int32: compared in int32, the label -2**30 would pass the
    range check as 'ignored' and the Triton kernel would read far outside the row."""
    logits, labels = _inputs()
    labels = labels.int()
    labels[3] = -(2**30)
    with pytest.raises(IndexError, match="labels must lie in"):
        smoothed_ga_loss(logits, labels, ignore_index=2**32 - 2**30, backend=backend)
    with pytest.raises(IndexError, match="labels must lie in"):
        linear_smoothed_ga_loss(torch.randn(6, 4), torch.randn(11, 4), labels, ignore_index=2**32 - 2**30, backend=backend)


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1])
def test_an_ignore_index_outside_int64_is_a_clear_error(ignore_index):
    logits, labels = _inputs()
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        smoothed_ga_loss(logits, labels, ignore_index=ignore_index)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        linear_smoothed_ga_loss(torch.randn(6, 4), torch.randn(11, 4), labels, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", ["expand", "as_strided"])
def test_inplace_backward_refuses_overlapping_logits(backend, make):
    """In-place writes over rows that share memory would give the Triton backend a wrong loss and gradient and the
    torch backend torch's internal error: both refuse such logits up front."""
    if make == "expand":
        base = torch.randn(11, requires_grad=True)
        logits = base.unsqueeze(0).expand(6, 11)  # rows share memory (stride 0)
    else:
        base = torch.randn(21, requires_grad=True)
        logits = base.as_strided((6, 11), (2, 1))  # rows overlap by 9 elements
    labels = torch.randint(0, 11, (6,))
    with pytest.raises(ValueError, match="inplace_backward=True needs logits whose rows do not overlap"):
        smoothed_ga_loss(logits, labels, inplace_backward=True, backend=backend)
    # without in-place writes the same logits work and match a copy's result
    loss = smoothed_ga_loss(logits, labels, backend=backend)
    torch.testing.assert_close(loss, smoothed_ga_loss(logits.detach().contiguous(), labels, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_normalizer_that_requires_grad_is_a_constant(backend):
    logits, labels = _inputs()
    normalizer = torch.tensor(4.0, requires_grad=True)
    # logits without grad: no gradient buffer exists, and none is scaled
    loss = smoothed_ga_loss(logits, labels, normalizer=normalizer, backend=backend)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, smoothed_ga_loss(logits, labels, normalizer=4.0, backend=backend))
    # logits with grad: the gradient is that of a constant D = 4, and D gets none (documented)
    ours = logits.clone().requires_grad_(True)
    smoothed_ga_loss(ours, labels, normalizer=normalizer, backend=backend).backward()
    plain = logits.clone().requires_grad_(True)
    smoothed_ga_loss(plain, labels, normalizer=4.0, backend=backend).backward()
    torch.testing.assert_close(ours.grad, plain.grad)
    assert normalizer.grad is None


def test_linear_loss_normalizer_that_requires_grad_is_a_constant():
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(11, 4)
    _, labels = _inputs()
    normalizer = torch.tensor(4.0, requires_grad=True)
    loss = linear_smoothed_ga_loss(hidden, weight, labels, normalizer=normalizer, backend="torch")
    loss.backward()
    expected = hidden.detach().clone().requires_grad_(True)
    linear_smoothed_ga_loss(expected, weight, labels, normalizer=4.0, backend="torch").backward()
    torch.testing.assert_close(hidden.grad, expected.grad)
    assert normalizer.grad is None
    frozen = linear_smoothed_ga_loss(hidden.detach(), weight, labels, normalizer=normalizer, backend="torch")
    assert not frozen.requires_grad
