"""Correctness of sga.kernels.smoothed_ga_loss against the float64 oracle, for both backends.

The Triton backend runs in the CPU interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).
"""
import pytest
import torch
import torch.nn.functional as F

from kernel_oracle import (
    BACKENDS,
    assert_low_precision_rule,
    assert_no_worse_than_fp32,
    fp32_eager,
    loss_and_grad,
    make_inputs,
    max_error,
    truth,
)
from sga.kernels import SmoothedGALoss, smoothed_ga_loss

FP32_TOL = dict(atol=2e-5, rtol=2e-5)


def run(backend, logits, labels, grad_output=None, **kwargs):
    return loss_and_grad(smoothed_ga_loss, logits, labels, grad_output, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, -0.4, 1.0])
@pytest.mark.parametrize("ascent", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_option_grid_matches_float64_oracle(backend, smoothing, ascent, weighted, reduction):
    logits, labels = make_inputs((3, 7), 131, seed=1)
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(2)) if weighted else None
    grad_output = torch.randn(3, 7) if reduction == "none" else torch.tensor(0.7)
    options = dict(smoothing=smoothing, ascent=ascent, token_weights=weights, reduction=reduction)
    loss, grad = run(backend, logits, labels, grad_output, **options)
    exact_loss, exact_grad = truth(logits, labels, grad_output, **options)
    assert loss.dtype == torch.float32
    assert loss.shape == exact_loss.shape
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
    torch.testing.assert_close(grad.double(), exact_grad, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape, vocab_size",
    [((1,), 1), ((1,), 2), ((5,), 3), ((2, 3), 17), ((4, 5), 1000), ((3,), 4099), ((2, 2, 3), 257)],
)
def test_odd_shapes_match_oracle(backend, shape, vocab_size):
    logits, labels = make_inputs(shape, vocab_size, seed=vocab_size)
    loss, grad = run(backend, logits, labels, smoothing=0.1, reduction="sum")
    exact_loss, exact_grad = truth(logits, labels, smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss.double(), exact_loss, atol=1e-4, rtol=2e-5)
    torch.testing.assert_close(grad.double(), exact_grad, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocabulary_row(backend):
    """V much larger than one block: the online max / sum-exp rescale over many blocks."""
    logits, labels = make_inputs((2,), 70001, seed=3)
    loss, grad = run(backend, logits, labels, smoothing=-0.4)
    exact_loss, exact_grad = truth(logits, labels, smoothing=-0.4)
    torch.testing.assert_close(loss.double(), exact_loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad.double(), exact_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_ignore_index_negative_and_in_range(backend, ignore_index):
    logits, labels = make_inputs((4, 6), 50, ignore_index=ignore_index, ignore_fraction=0.4, seed=4)
    assert (labels == ignore_index).any()
    loss, grad = run(backend, logits, labels, ignore_index=ignore_index, reduction="none")
    exact_loss, exact_grad = truth(logits, labels, ignore_index=ignore_index, reduction="none")
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
    torch.testing.assert_close(grad.double(), exact_grad, **FP32_TOL)
    ignored = labels == ignore_index
    assert torch.all(loss[ignored] == 0)
    assert torch.all(grad[ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_descent_equals_pytorch_label_smoothed_cross_entropy(backend):
    logits, labels = make_inputs((6, 5), 300, seed=5)
    for eps in (0.0, 0.1, 1.0):
        ours = smoothed_ga_loss(logits, labels, smoothing=eps, ascent=False, backend=backend)
        expected = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), label_smoothing=eps)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_low_precision_no_worse_than_fp32_arithmetic(backend, dtype, reduction):
    logits, labels = make_inputs((4, 9), 1031, dtype=dtype, seed=6)
    weights = torch.randn(4, 9, generator=torch.Generator().manual_seed(7))
    options = dict(smoothing=-0.4, token_weights=weights, reduction=reduction)
    loss, grad = run(backend, logits, labels, **options)
    assert_low_precision_rule(loss, grad, logits, labels, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_scaled_backward_rounds_at_most_twice(backend, reduction):
    """A grad_output other than 1 scales the gradient already stored in bf16: one extra rounding, no more.
    (Token weights and the normalizer carry scaling without it.)"""
    logits, labels = make_inputs((4, 9), 1031, dtype=torch.bfloat16, seed=6)
    grad_output = torch.randn(4, 9, generator=torch.Generator().manual_seed(23)) if reduction == "none" else torch.tensor(0.3)
    loss, grad = run(backend, logits, labels, grad_output, reduction=reduction, smoothing=0.1)
    exact_loss, exact_grad = truth(logits, labels, grad_output, reduction=reduction, smoothing=0.1)
    # each rounding to bf16 (8-bit significand) errs by at most half an ulp: 2**-8 relative; two of them 2**-7;
    # plus the fp32 arithmetic of c p_v - c eps / V before the first rounding, which dominates where p_v ~ eps / V
    # cancels. fp32 softmax has relative error ~ (4 + 2 |z_v - lse|) u, u = 2**-24: the rounded z_v - m and its
    # exp2 argument each shift p_v by |z_v - m| u relatively, exp2, the sum and the divide by a few u
    valid = labels != -100
    factor = grad_output.double() if reduction == "none" else grad_output.double() / valid.sum()
    z = logits.double()
    onehot = torch.nn.functional.one_hot(labels.clamp_min(0), logits.shape[-1]).double()
    operands = (factor * valid).abs()[..., None] * (torch.softmax(z, -1) + 0.1 / logits.shape[-1] + onehot)
    softmax_condition = 4 + 2 * (z - torch.logsumexp(z, -1, keepdim=True)).abs()
    bound = 2.0**-7 * exact_grad.abs() * (1 + 1e-3) + 2.0**-24 * softmax_condition * operands
    assert torch.all((grad.double() - exact_grad).abs() <= bound)
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_confident_logits_keep_target_gradient_precise(backend, dtype):
    """p_y ~ 1: the target column's p_y - 1 must be computed in fp32, not rounded to bf16 first."""
    logits, labels = make_inputs((8,), 513, dtype=torch.float32, ignore_fraction=0.0, seed=8)
    logits[torch.arange(8), labels] += 25.0
    logits = logits.to(dtype)
    loss, grad = run(backend, logits, labels, smoothing=0.1)
    exact_loss, exact_grad = truth(logits, labels, smoothing=0.1)
    base_loss, base_grad = fp32_eager(logits, labels, smoothing=0.1)
    assert_no_worse_than_fp32(loss, base_loss, exact_loss, what="loss")
    assert_no_worse_than_fp32(grad, base_grad, exact_grad, what="gradient")
    target_grad = grad[torch.arange(8), labels].double()
    exact_target = exact_grad[torch.arange(8), labels]
    assert torch.all((target_grad - exact_target).abs() <= exact_target.abs() * 1e-2 + 1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_blocks_do_not_make_nan(backend):
    """Whole blocks (and prefixes) of -inf, as with masked vocabularies, must not break the online rescale."""
    logits, labels = make_inputs((3,), 40000, ignore_fraction=0.0, seed=9)
    logits[:, :35000] = float("-inf")
    labels = torch.randint(35000, 40000, (3,))
    loss, grad = run(backend, logits, labels, smoothing=0.0)
    exact_loss, exact_grad = truth(logits, labels, smoothing=0.0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
    torch.testing.assert_close(grad.double(), exact_grad, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nan_or_inf_in_logits_is_not_hidden(backend, bad_value):
    logits, labels = make_inputs((3,), 64, ignore_fraction=0.0, seed=10)
    logits[1, 5] = bad_value
    loss = smoothed_ga_loss(logits, labels, smoothing=0.1, reduction="none", backend=backend)
    assert not torch.isfinite(loss[1])
    assert torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_ignored_gives_zero_loss_and_gradient(backend, reduction):
    logits, _ = make_inputs((2, 3), 20, seed=11)
    labels = torch.full((2, 3), -100)
    loss, grad = run(backend, logits, labels, reduction=reduction, smoothing=0.1)
    assert torch.all(loss == 0)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalizer_number_and_tensor(backend):
    logits, labels = make_inputs((3, 4), 33, seed=12)
    weights = torch.randn(3, 4)
    for normalizer in (37, torch.tensor(37.0)):
        loss, grad = run(backend, logits, labels, token_weights=weights, normalizer=normalizer)
        exact_loss, exact_grad = truth(logits, labels, token_weights=weights, normalizer=37.0)
        torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
        torch.testing.assert_close(grad.double(), exact_grad, **FP32_TOL)
    loss, grad = run(backend, logits, labels, normalizer=torch.tensor(0.0))
    assert loss.item() == 0 and torch.all(grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_microbatch_accumulation_with_normalizer_equals_full_batch(backend):
    logits, labels = make_inputs((4, 6), 50, seed=13)
    total_tokens = int((labels != -100).sum())
    full_loss, full_grad = run(backend, logits, labels, smoothing=0.1)
    parts = [run(backend, logits[i : i + 2], labels[i : i + 2], smoothing=0.1, normalizer=total_tokens) for i in (0, 2)]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full_loss, **FP32_TOL)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full_grad, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base, labels = make_inputs((5, 4), 2 * 97, seed=14)
    logits = base[..., ::2].transpose(0, 1)  # stride 2 along V, transposed leading dims
    labels = labels[:, :1].expand(5, 4).transpose(0, 1).clone()
    labels[labels >= 97] = 1
    weights = torch.randn(5, 4).transpose(0, 1)
    assert not logits.is_contiguous() and not weights.is_contiguous()
    loss, grad = run(backend, logits, labels, token_weights=weights, smoothing=-0.4, reduction="none",
                     grad_output=torch.randn(4, 5))
    torch.manual_seed(0)
    exact_loss, _ = truth(logits, labels, token_weights=weights, smoothing=-0.4, reduction="none")
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
    assert grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels(backend):
    logits, labels = make_inputs((3, 3), 77, seed=15)
    loss64 = smoothed_ga_loss(logits, labels, backend=backend)
    loss32 = smoothed_ga_loss(logits, labels.int(), backend=backend)
    torch.testing.assert_close(loss32, loss64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_overwrites_logits_only_when_asked(backend):
    logits, labels = make_inputs((3, 4), 61, seed=16)
    exact_loss, exact_grad = truth(logits, labels, smoothing=0.1)

    kept = logits.clone().requires_grad_(True)
    smoothed_ga_loss(kept, labels, smoothing=0.1, backend=backend).backward()
    torch.testing.assert_close(kept.detach(), logits)  # default: caller's logits intact

    overwritten = logits.clone().requires_grad_(True)
    loss = smoothed_ga_loss(overwritten, labels, smoothing=0.1, inplace_backward=True, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
    torch.testing.assert_close(overwritten.grad.double(), exact_grad, **FP32_TOL)
    assert overwritten.grad.data_ptr() == overwritten.data_ptr()  # the gradient lives in the logits' storage


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_buffer_when_logits_need_no_grad(backend):
    logits, labels = make_inputs((2, 2), 40, seed=17)
    with torch.no_grad():
        loss = smoothed_ga_loss(logits, labels, backend=backend)
    exact_loss, _ = truth(logits, labels)
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
    assert loss.grad_fn is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_is_refused(backend):
    logits, labels = make_inputs((2,), 10, seed=18)
    logits.requires_grad_(True)
    loss = smoothed_ga_loss(logits, labels, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_gradient_matches_central_differences(backend, reduction):
    """gradcheck in float64, by directional central differences. (torch.autograd.gradcheck itself calls
    backward twice on one graph, which the in-place scaled gradient buffer refuses by design.)"""
    logits, labels = make_inputs((2, 3), 11, dtype=torch.float64, seed=19)
    weights = torch.randn(2, 3, dtype=torch.float64)
    grad_output = torch.randn(2, 3, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)

    def scalar_loss(z):
        loss = smoothed_ga_loss(z, labels, smoothing=-0.4, token_weights=weights, reduction=reduction, backend=backend)
        return (loss * grad_output).sum()

    _, grad = loss_and_grad(lambda z, y: scalar_loss(z), logits, labels)
    generator = torch.Generator().manual_seed(0)
    directions = [torch.randn(logits.shape, generator=generator, dtype=torch.float64) for _ in range(6)]
    directions += [torch.zeros_like(logits).index_put_((torch.tensor(i),), torch.tensor(1.0, dtype=torch.float64))
                   for i in range(2)]
    step = 1e-6
    for direction in directions:
        numeric = (scalar_loss(logits + step * direction) - scalar_loss(logits - step * direction)) / (2 * step)
        analytic = (grad * direction).sum()
        assert abs(numeric.item() - analytic.item()) <= 1e-7 + 1e-6 * abs(analytic.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fullgraph", [False, True])
def test_torch_compile_of_a_caller(backend, fullgraph):
    logits, labels = make_inputs((2, 5), 90, seed=20)
    weights = torch.randn(2, 5)

    def caller(z, y, w):
        return smoothed_ga_loss(z * 1.5, y, smoothing=0.1, token_weights=w, backend=backend, validate=not fullgraph)

    compiled = torch.compile(caller, fullgraph=fullgraph, backend="aot_eager" if backend == "triton" else "inductor")
    eager_loss, eager_grad = loss_and_grad(caller, logits, labels, w=weights)
    compiled_loss, compiled_grad = loss_and_grad(compiled, logits, labels, w=weights)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_backends_agree_and_auto_picks_torch_on_cpu():
    logits, labels = make_inputs((3, 4), 129, seed=21)
    results = {b: run(b, logits, labels, smoothing=0.1) for b in ("auto", "torch", "triton")}
    torch.testing.assert_close(results["auto"][0], results["torch"][0], rtol=0, atol=0)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], **FP32_TOL)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], **FP32_TOL)


def test_torch_backend_chunks_rows():
    """The torch backend processes a bounded number of rows at a time: chunk boundaries change nothing."""
    from sga.kernels import smoothed_ga_torch

    logits, labels = make_inputs((11,), 37, seed=22)
    grad_norm = torch.tensor(1.0)
    full_buffer, chunked_buffer = torch.empty_like(logits), torch.empty_like(logits)
    full = smoothed_ga_torch.rows_forward(logits, labels, None, grad_norm, full_buffer, 0.1, -1.0, -100, chunk_rows=11)
    chunked = smoothed_ga_torch.rows_forward(logits, labels, None, grad_norm, chunked_buffer, 0.1, -1.0, -100, chunk_rows=4)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(chunked_buffer, full_buffer)


def test_module_form_matches_function():
    logits, labels = make_inputs((2, 3), 45, seed=23)
    module = SmoothedGALoss(smoothing=0.1, ascent=False, reduction="sum")
    assert "smoothing=0.1" in repr(module)
    torch.testing.assert_close(module(logits, labels), smoothed_ga_loss(logits, labels, smoothing=0.1, ascent=False, reduction="sum"))


def test_max_error_helper_measures_difference():
    assert max_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])) == 0.5
