"""The logit softcap and scale fused into the row kernel: z = softcap(a * x), softcap(u) = c * tanh(u / c).

Both backends against the float64 oracle. The Triton cases run the softcap and scale of the Triton kernel itself
(kernels/sga_kernels/smoothed_ga_triton.py), under the interpreter without a GPU; they are never skipped.
"""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from kernel_oracle import BACKENDS, assert_low_precision_rule, loss_and_grad, make_inputs, truth
from sga.kernels import SmoothedGALoss, ops, smoothed_ga_loss, smoothed_ga_torch

FP32_TOL = dict(atol=2e-5, rtol=2e-5)
# (softcap c, logit_scale a): Gemma 2's cap (little saturation at logits of scale 3), a tight cap (most
# logits saturated), the scale alone, and both
TRANSFORMS = [(30.0, 1.0), (2.0, 1.0), (None, 0.5), (4.0, 2.5)]


def run(backend, logits, labels, grad_output=None, **kwargs):
    return loss_and_grad(smoothed_ga_loss, logits, labels, grad_output, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap, logit_scale", TRANSFORMS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, -0.4, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_transform_grid_matches_float64_oracle(backend, softcap, logit_scale, smoothing, reduction):
    logits, labels = make_inputs((3, 5), 131, seed=1)
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    grad_output = torch.randn(3, 5) if reduction == "none" else torch.tensor(0.7)
    options = dict(
        smoothing=smoothing, token_weights=weights, reduction=reduction, softcap=softcap, logit_scale=logit_scale
    )
    loss, grad = run(backend, logits, labels, grad_output, **options)
    exact_loss, exact_grad = truth(logits, labels, grad_output, **options)
    assert loss.shape == exact_loss.shape
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
    torch.testing.assert_close(grad.double(), exact_grad, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, vocab_size", [((1,), 1), ((1,), 2), ((5,), 3), ((2, 3), 17), ((3,), 4099)])
def test_odd_shapes_with_softcap(backend, shape, vocab_size):
    logits, labels = make_inputs(shape, vocab_size, seed=vocab_size)
    options = dict(smoothing=0.1, reduction="sum", softcap=5.0, logit_scale=1.3, ascent=False)
    loss, grad = run(backend, logits, labels, **options)
    exact_loss, exact_grad = truth(logits, labels, **options)
    torch.testing.assert_close(loss.double(), exact_loss, atol=1e-4, rtol=2e-5)
    torch.testing.assert_close(grad.double(), exact_grad, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap, logit_scale", [(30.0, 1.0), (2.0, 1.5)])
def test_low_precision_no_worse_than_fp32_arithmetic(backend, dtype, reduction, softcap, logit_scale):
    logits, labels = make_inputs((4, 7), 1031, dtype=dtype, seed=6)
    weights = torch.randn(4, 7, generator=torch.Generator().manual_seed(7))
    options = dict(
        smoothing=-0.4, token_weights=weights, reduction=reduction, softcap=softcap, logit_scale=logit_scale
    )
    loss, grad = run(backend, logits, labels, **options)
    assert_low_precision_rule(loss, grad, logits, labels, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_ignored_rows_give_zero_loss_and_gradient(backend, ignore_index):
    logits, labels = make_inputs((4, 6), 50, ignore_index=ignore_index, ignore_fraction=0.4, seed=4)
    assert (labels == ignore_index).any()
    options = dict(ignore_index=ignore_index, reduction="none", softcap=3.0, smoothing=0.1)
    loss, grad = run(backend, logits, labels, **options)
    exact_loss, exact_grad = truth(logits, labels, **options)
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
    torch.testing.assert_close(grad.double(), exact_grad, **FP32_TOL)
    ignored = labels == ignore_index
    assert torch.all(loss[ignored] == 0) and torch.all(grad[ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_external_normalizer(backend):
    logits, labels = make_inputs((3, 4), 33, seed=11)
    loss, grad = run(backend, logits, torch.full_like(labels, -100), softcap=4.0)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    options = dict(softcap=4.0, logit_scale=0.8, normalizer=torch.tensor(37.0), smoothing=0.2)
    loss, grad = run(backend, logits, labels, **options)
    exact_loss, exact_grad = truth(logits, labels, **options)
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
    torch.testing.assert_close(grad.double(), exact_grad, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_and_infinite_logits_stay_finite(backend):
    """|a x / c| >> 1: tanh saturates at +-1, the chain-rule factor 1 - t^2 is 0 in float32 and in the truth's
    float64 for |x| = inf, and nothing turns into NaN (a row of -inf becomes a row of -c)."""
    logits, labels = make_inputs((4,), 300, ignore_fraction=0.0, seed=12)
    logits[0] *= 1e4
    logits[1] = float("-inf")
    logits[2, :200] = float("-inf")
    labels[2] = 250
    options = dict(softcap=10.0, smoothing=0.1, reduction="none")
    loss, grad = run(backend, logits, labels, **options)
    exact_loss, exact_grad = truth(logits, labels, **options)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
    torch.testing.assert_close(grad.double(), exact_grad, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_with_softcap(backend, dtype):
    logits, labels = make_inputs((3, 4), 70, dtype=dtype, seed=13)
    options = dict(softcap=5.0, logit_scale=1.5, smoothing=0.1)
    expected_loss, expected_grad = run(backend, logits, labels, **options)
    storage = logits.clone().requires_grad_(True)
    working = storage * 1  # a non-leaf whose storage the gradient may overwrite
    loss = smoothed_ga_loss(working, labels, inplace_backward=True, backend=backend, **options)
    loss.backward()
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(storage.grad, expected_grad, rtol=0, atol=0)


def test_descent_drop_in_for_capped_cross_entropy():
    """Gemma-2 style: the raw logits through SmoothedGALoss(softcap=c, ascent=False) give what
    F.cross_entropy gives on the capped logits, loss and gradient with respect to the raw logits."""
    logits, labels = make_inputs((6, 5), 300, seed=5)
    for eps in (0.0, 0.1):
        module = SmoothedGALoss(softcap=30.0, logit_scale=2.0, smoothing=eps, ascent=False, backend="torch")
        assert "softcap=30.0" in repr(module) and "logit_scale=2.0" in repr(module)
        ours, ours_grad = loss_and_grad(module, logits, labels)

        def capped_cross_entropy(x, y):
            capped = 30.0 * torch.tanh(2.0 * x / 30.0)
            return F.cross_entropy(capped.flatten(0, -2), y.flatten(), label_smoothing=eps)  # noqa: B023  called at once

        expected, expected_grad = loss_and_grad(capped_cross_entropy, logits, labels)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_grad, expected_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("softcap, logit_scale", TRANSFORMS)
def test_torch_backend_chunks_change_nothing(softcap, logit_scale):
    logits, labels = make_inputs((11,), 37, dtype=torch.bfloat16, seed=22)
    grad_norm = torch.tensor(0.5)
    weights = torch.randn(11)
    buffers = [torch.empty_like(logits) for _ in range(2)]
    losses = [
        smoothed_ga_torch.rows_forward(
            logits, labels, weights, grad_norm, buffer, 0.1, -1.0, -100, softcap, logit_scale, chunk_rows=rows
        )
        for buffer, rows in zip(buffers, (11, 4))
    ]
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    torch.testing.assert_close(buffers[1], buffers[0], rtol=0, atol=0)


@pytest.mark.parametrize("softcap, logit_scale", [(None, 1.0), (5.0, 1.5)])
def test_row_op_schema_fake_and_mutation(softcap, logit_scale):
    """torch.library.opcheck: schema, fake (meta) implementation and the declared mutation of grad_buffer."""
    logits, labels = make_inputs((3,), 20, seed=14)
    args = (logits, labels, torch.randn(3), torch.tensor(0.5), torch.empty_like(logits), 0.1, -1.0, -100, "torch")
    torch.library.opcheck(ops.smoothed_ga_rows, args, dict(softcap=softcap, logit_scale=logit_scale))


def test_torch_compile_of_a_caller_with_softcap():
    logits, labels = make_inputs((2, 5), 90, seed=20)

    def caller(z, y):
        return smoothed_ga_loss(z, y, smoothing=0.1, softcap=3.0, logit_scale=1.5, backend="torch", validate=False)

    eager_loss, eager_grad = loss_and_grad(caller, logits, labels)
    compiled_loss, compiled_grad = loss_and_grad(torch.compile(caller, fullgraph=True), logits, labels)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(softcap=0.0), ValueError, "softcap must be finite and > 0"),
        (dict(softcap=-30.0), ValueError, "softcap must be finite and > 0"),
        (dict(softcap=float("inf")), ValueError, "softcap must be finite and > 0"),
        (dict(softcap=True), TypeError, "softcap must be a real number or None"),
        (dict(softcap="30"), TypeError, "softcap must be a real number or None"),
        (dict(logit_scale=0.0), ValueError, "logit_scale must be finite and > 0"),
        (dict(logit_scale=-1.0), ValueError, "logit_scale must be finite and > 0"),
        (dict(logit_scale=float("nan")), ValueError, "logit_scale must be finite and > 0"),
        (dict(logit_scale=None), TypeError, "logit_scale must be a real number"),
    ],
)
def test_bad_transform_arguments_raise_before_any_kernel(change, error, message):
    logits, labels = make_inputs((2, 3), 10, seed=15)
    with mock.patch.object(ops, "smoothed_ga_rows", side_effect=AssertionError("kernel ran")):
        with pytest.raises(error, match=message):
            smoothed_ga_loss(logits, labels, **change)
        with pytest.raises(error, match=message):
            SmoothedGALoss(**change)
