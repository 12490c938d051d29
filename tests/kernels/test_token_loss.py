"""The fused token-rule losses (sga.kernels.token_loss) against their float64 references, both backends."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sga.kernels import TOKEN_RULES, linear_token_loss, token_loss, token_loss_reference, token_loss_triton
from sga.kernels.tuning import KernelConfig

BACKENDS = ("torch", "triton")
RULE_PARAMS = [
    ("wga", {}),
    ("wga", {"beta": 0.0}),
    ("wga", {"beta": 2.5}),
    ("satimp", {}),
    ("satimp", {"beta1": 0.0, "beta2": 3.0}),
    ("ce_u", {}),
    ("ihl", {}),
    ("pdu", {}),
]


def _inputs(num_rows=9, vocab=37, scale=3.0, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, vocab, generator=generator) * scale).to(dtype)
    labels = torch.randint(0, vocab, (num_rows,), generator=generator)
    labels[1] = -100
    weights = torch.randn(num_rows, generator=generator)
    return logits, labels, weights


def _loss_and_grad(fn, logits, labels, **kwargs):
    z = logits.detach().clone().requires_grad_(True)
    loss = fn(z, labels, **kwargs)
    (loss if loss.dim() == 0 else (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum()).backward()
    return loss.detach(), z.grad


def _reference(logits, labels, **kwargs):
    return _loss_and_grad(token_loss_reference, logits.double(), labels, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule,params", RULE_PARAMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_rule_matches_float64_reference(backend, rule, params, reduction):
    logits, labels, weights = _inputs()
    kwargs = dict(rule=rule, token_weights=weights, reduction=reduction, **params)
    loss, grad = _loss_and_grad(token_loss, logits, labels, backend=backend, **kwargs)
    ref_loss, ref_grad = _reference(logits, labels, **kwargs)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.all(grad[1] == 0)  # the ignored token


@pytest.mark.parametrize("rule,params", RULE_PARAMS[::2] + [("pdu", {})])
def test_triton_many_blocks_per_row(monkeypatch, rule, params):
    """Blocks of 8 lanes: the online rescale, the running argmax k and the target mask cross block borders."""
    blocks_of_8 = KernelConfig(block_v=8, num_warps=1, programs_per_sm=2)
    monkeypatch.setattr(token_loss_triton, "launch_config", lambda vocab, dtype, device: blocks_of_8)
    logits, labels, weights = _inputs(num_rows=6, vocab=45, seed=3)
    labels[0], labels[2] = 0, 44  # targets in the first and the last, partial, block
    kwargs = dict(rule=rule, token_weights=weights, **params)
    loss, grad = _loss_and_grad(token_loss, logits, labels, backend="triton", **kwargs)
    ref_loss, ref_grad = _reference(logits, labels, **kwargs)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_backend_chunks_and_ignore_index_in_range(backend):
    logits, labels, _ = _inputs(num_rows=11, vocab=23, seed=5)
    labels[1], labels[4] = 3, 7
    for rule in TOKEN_RULES:
        loss, grad = _loss_and_grad(token_loss, logits, labels, rule=rule, ignore_index=7, backend=backend)
        ref_loss, ref_grad = _reference(logits, labels, rule=rule, ignore_index=7)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
        assert torch.all(grad[labels == 7] == 0)


def test_torch_backend_small_chunks_match_one_chunk():
    from sga.kernels import token_loss_torch
    from sga.kernels.token_rules import TOKEN_RULES as rules

    logits, labels, weights = _inputs(num_rows=10, vocab=19, seed=6)
    for rule in rules.values():
        outputs = []
        for chunk_rows in (3, None):
            grad = torch.empty_like(logits)
            row_loss = token_loss_torch.rows_forward(
                logits, labels, weights, torch.tensor(0.5), grad, rule, 1.5, 0.5, -100, chunk_rows=chunk_rows
            )
            outputs.append((row_loss, grad))
        torch.testing.assert_close(outputs[0], outputs[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", list(TOKEN_RULES))
def test_confident_and_masked_logits(backend, rule):
    """Target 40 above the rest (p_y ~ 1: 1 - p_y from the non-target mass, no cancellation) and -inf logits
    (a masked vocabulary) give finite numbers equal to the reference."""
    logits, labels, _ = _inputs(num_rows=5, vocab=29, seed=7)
    labels[1] = 3
    logits[0, labels[0]] += 40.0
    logits[2, 5:9] = float("-inf")
    labels[2] = 1
    if rule == "pdu":  # the max-minus-mean gap of a row with -inf logits is infinite by definition
        logits[2, 5:9] = -1e4
    loss, grad = _loss_and_grad(token_loss, logits, labels, rule=rule, reduction="none", backend=backend)
    ref_loss, ref_grad = _reference(logits, labels, rule=rule, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_satimp_weight_keeps_precision_when_target_is_certain():
    """(1 - p_y)^beta2 for 1 - p_y = 7e-13: float32 arithmetic on p_y would give a zero weight; the kernels take
    it from the non-target mass (exp(lse_u - lse)), so the non-target gradient -w p_v keeps its relative precision."""
    logits = torch.zeros(1, 8)
    logits[0, 2] = 30.0
    labels = torch.tensor([2])
    others = torch.arange(8) != 2
    for backend in BACKENDS:
        _, grad = _loss_and_grad(token_loss, logits, labels, rule="satimp", beta1=0.0, beta2=1.0, backend=backend)
        _, ref_grad = _reference(logits, labels, rule="satimp", beta1=0.0, beta2=1.0)
        assert (grad[0, others] != 0).all()
        torch.testing.assert_close(grad[0, others].double(), ref_grad[0, others], rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(backend, dtype):
    logits, labels, weights = _inputs(dtype=dtype, seed=8)
    for rule in TOKEN_RULES:
        loss, grad = _loss_and_grad(token_loss, logits, labels, rule=rule, token_weights=weights, backend=backend)
        ref_loss, ref_grad = _reference(logits, labels, rule=rule, token_weights=weights)
        assert grad.dtype == dtype and loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        # the gradient is computed in float32 and rounded once: within one unit in the last place of dtype
        ulp = torch.finfo(dtype).eps
        assert ((grad.double() - ref_grad).abs() <= ulp * ref_grad.abs() + 1e-6).all(), rule


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalizer_all_ignored_and_inplace(backend):
    logits, labels, _ = _inputs(seed=9)
    loss, grad = _loss_and_grad(token_loss, logits, labels, rule="ihl", normalizer=32.0, backend=backend)
    ref_loss, ref_grad = _reference(logits, labels, rule="ihl", normalizer=32.0)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)

    ignored = torch.full_like(labels, -100)
    loss, grad = _loss_and_grad(token_loss, logits, ignored, rule="ce_u", backend=backend)
    assert loss.item() == 0.0 and torch.all(grad == 0)

    buffer = logits.clone().requires_grad_(True)
    work = buffer * 1.0  # a non-leaf the kernel may overwrite
    token_loss(work, labels, "wga", inplace_backward=True, backend=backend).backward()
    _, expected = _loss_and_grad(token_loss, logits, labels, rule="wga", backend=backend)
    torch.testing.assert_close(buffer.grad, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", list(TOKEN_RULES))
def test_float64_gradient_matches_central_differences(backend, rule):
    """Directional central differences in float64 (torch.autograd.gradcheck calls backward twice on one graph,
    which the in-place scaled gradient buffer refuses by design). The detached weights of wga / satimp and
    the detached target of ce_u are constants here, so the rules are probed with their weights fixed: the
    check compares against the reference's autograd gradient, and the reference itself against differences
    for the rules without a stop-gradient (ihl, pdu)."""
    logits, labels, weights = _inputs(num_rows=4, vocab=6, seed=10)
    z = logits.double()
    grad_output = torch.randn(4, dtype=torch.float64)

    def scalar_loss(x, fn):
        return (fn(x, labels, rule, token_weights=weights, reduction="none") * grad_output).sum()

    _, grad = _loss_and_grad(lambda x, y, **k: scalar_loss(x, lambda *a, **kw: token_loss(*a, backend=backend, **kw)), z, labels)
    _, ref_grad = _loss_and_grad(lambda x, y, **k: scalar_loss(x, token_loss_reference), z, labels)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    if rule in ("ihl", "pdu"):
        generator = torch.Generator().manual_seed(0)
        step = 1e-6
        for _ in range(6):
            direction = torch.randn(z.shape, generator=generator, dtype=torch.float64)
            fn = lambda x: scalar_loss(x, lambda *a, **kw: token_loss(*a, backend=backend, **kw))  # noqa: E731
            numeric = (fn(z + step * direction) - fn(z - step * direction)) / (2 * step)
            analytic = (grad * direction).sum()
            assert abs(numeric.item() - analytic.item()) <= 1e-7 + 1e-6 * abs(analytic.item())


def test_leading_shape_and_non_contiguous():
    logits, labels, _ = _inputs(num_rows=12, vocab=10, seed=11)
    wide = torch.randn(12, 20)
    wide[:, ::2] = logits
    view = wide[:, ::2].reshape(3, 4, 10)
    loss = token_loss(view, labels.reshape(3, 4), "ce_u", reduction="none", backend="torch")
    assert loss.shape == (3, 4)
    torch.testing.assert_close(loss.double(), token_loss_reference(logits, labels, "ce_u", reduction="none").reshape(3, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(rule="nope"), ValueError, "unknown token rule"),
        (dict(rule="wga", alpha=1.0), TypeError, "accepts: beta"),
        (dict(rule="ihl", beta=1.0), TypeError, "accepts: none"),
        (dict(rule="wga", beta=-1.0), ValueError, "beta must be finite and >= 0"),
        (dict(rule="satimp", beta1=float("nan")), ValueError, "beta1"),
        (dict(rule="wga", beta=True), TypeError, "real number"),
        (dict(rule="ce_u", reduction="avg"), ValueError, "reduction"),
        (dict(rule="ce_u", reduction="sum", normalizer=2.0), ValueError, "normalizer"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    logits, labels, _ = _inputs()
    with pytest.raises(error, match=match):
        token_loss(logits, labels, **kwargs)


def test_bad_tensors():
    logits, labels, _ = _inputs()
    with pytest.raises(IndexError, match="labels must lie in"):
        token_loss(logits, torch.full_like(labels, 37), "wga")
    with pytest.raises(ValueError, match="at least 2 classes"):
        token_loss(logits[:, :1], torch.zeros_like(labels), "wga")
    with pytest.raises(TypeError, match="int32 or int64"):
        token_loss(logits, labels.float(), "wga")


def _linear_case(dtype, seed=12):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 5, 8, generator=generator, dtype=torch.float64).to(dtype)
    weight = torch.randn(21, 8, generator=generator, dtype=torch.float64).to(dtype)
    bias = torch.randn(21, generator=generator, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 21, (2, 5), generator=generator)
    labels[0, 1] = labels[1, 4] = -100
    weights = torch.randn(2, 5, generator=generator)
    return hidden, weight, bias, labels, weights


def _linear_grads(fn, hidden, weight, bias, reduction):
    params = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = fn(*params)
    grad_output = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * grad_output).sum().backward()
    return loss.detach(), [p.grad for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule,params", RULE_PARAMS[::2] + [("pdu", {})])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_token_loss_matches_reference(backend, rule, params, reduction):
    """The fused linear path (chunks of 3 rows, softcap, bias, token weights; "none" re-runs the pass in
    backward) against the float64 reference on the materialized logits."""
    hidden, weight, bias, labels, weights = _linear_case(torch.float32)
    kwargs = dict(token_weights=weights, reduction=reduction, **params)

    def fused(h, w, b):
        return linear_token_loss(h, w, labels, rule, bias=b, softcap=4.0, backend=backend, chunk_size=3, **kwargs)

    def reference(h, w, b):
        return token_loss_reference(4.0 * torch.tanh((h @ w.T + b) / 4.0), labels, rule, **kwargs)

    loss, grads = _linear_grads(fused, hidden, weight, bias, reduction)
    ref_loss, ref_grads = _linear_grads(reference, hidden.double(), weight.double(), bias.double(), reduction)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-5)


def test_linear_token_loss_float64_is_exact_and_returns_token_losses():
    hidden, weight, bias, labels, _ = _linear_case(torch.float64, seed=13)
    for rule in TOKEN_RULES:
        loss, token_losses = linear_token_loss(hidden, weight, labels, rule, bias=bias, backend="torch",
                                               return_token_losses=True)
        logits = hidden @ weight.T + bias
        torch.testing.assert_close(loss, token_loss_reference(logits, labels, rule), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(token_losses, token_loss_reference(logits, labels, rule, reduction="none"),
                                   rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="accepts: beta"):
        linear_token_loss(hidden, weight, labels, "wga", gamma=1.0)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU test_token_rule_kernel_on_cuda compiles and runs the kernel (bench/gpu_check.sh)")
def test_token_kernel_compiles_for_nvidia_targets():
    """Every rule, passed to the kernel as a constexpr @triton.jit function, lowers to sm_80 / sm_90 cubins."""
    script = Path(__file__).with_name("compile_token_kernels_for_gpu.py")
    path = os.pathsep.join([str(script.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("ok ") == 3 * len(TOKEN_RULES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_u_target_distribution_exact_beyond_float32_underflow(backend):
    """The target leads by 120 nats (p_v = e^-120 underflows in float32): q, the softmax without the target, is
    still uniform over the other classes, so the gradient p - q is -1/7 there (times the grad_output 0.5 of row
    0; computed from the non-target statistics, never as p_v / (1 - p_y))."""
    logits = torch.zeros(2, 8)
    logits[:, 2] = 120.0
    labels = torch.tensor([2, 2])
    loss, grad = _loss_and_grad(token_loss, logits, labels, rule="ce_u", reduction="none", backend=backend)
    ref_loss, ref_grad = _reference(logits, labels, rule="ce_u", reduction="none")
    torch.testing.assert_close(loss.double(), ref_loss)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-6, atol=1e-7)
    assert grad[0, 0].item() == pytest.approx(-0.5 / 7.0, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_loss_bfloat16(backend):
    """bf16 hidden and head: the loss equals the float64 rule on the bf16 logits of the same GEMM (the row
    kernel works in float32); dH and dW within bf16 rounding of the float64 reference."""
    hidden, weight, bias, labels, weights = _linear_case(torch.bfloat16, seed=14)
    for rule in TOKEN_RULES:
        loss, grads = _linear_grads(
            lambda h, w, b: linear_token_loss(h, w, labels, rule, bias=b, token_weights=weights, backend=backend, chunk_size=4),  # noqa: B023
            hidden, weight, bias, "mean",
        )
        logits = torch.addmm(bias, hidden.reshape(-1, 8), weight.T).reshape(2, 5, 21)  # the bf16 GEMM of the chunks
        torch.testing.assert_close(loss.double(), token_loss_reference(logits, labels, rule, token_weights=weights),
                                   rtol=1e-5, atol=1e-5)
        _, ref_grads = _linear_grads(
            lambda h, w, b: token_loss_reference(h @ w.T + b, labels, rule, token_weights=weights),  # noqa: B023
            hidden.double(), weight.double(), bias.double(), "mean",
        )
        for grad, ref in zip(grads, ref_grads):
            assert grad.dtype == torch.bfloat16
            torch.testing.assert_close(grad.double(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("rule,params", RULE_PARAMS)
def test_token_rule_kernel_on_cuda(rule, params, device="cuda", num_rows=512, vocab_size=128256):
    """The Triton kernel compiled and run on a GPU (every other test here runs it in the interpreter or on CPU
    tensors, so only this one reaches the GPU): bf16 logits at Llama-3's vocabulary, targets from unlikely to
    certain, ignored rows, signed weights, a per-row grad_output; rows at the start, the middle and the end (the
    persistent grid's first and last rows of its programs) against the float64 reference on the same bf16 values.
    The rule of docs/design.md section 4: the kernel's error is at most the float32 torch backend's own error on
    the same inputs (ce_u's p - q cancels, so float32 sums over 128K classes set it), plus the two bf16 roundings
    of the gradient (its store, and the backward's scale by grad_output): 2**-7 relative."""
    generator = torch.Generator(device=device).manual_seed(8)
    logits = (3 * torch.randn(num_rows, vocab_size, device=device, generator=generator)).bfloat16()
    labels = torch.randint(0, vocab_size, (num_rows,), device=device, generator=generator)
    # targets from unlikely (random logits: p_y ~ 1/V) to certain, so that the rules weighted by p_y (satimp,
    # wga) have gradients of float32 size and not only of float32's underflow
    boost = torch.linspace(0.0, 16.0, num_rows, device=device)
    logits = logits.float().scatter_add(1, labels.unsqueeze(1), boost.unsqueeze(1)).bfloat16()
    labels[::7] = -100
    weights = torch.randn(num_rows, device=device, generator=generator)
    grad_output = torch.rand(num_rows, device=device, generator=generator) + 0.5
    kwargs = dict(rule=rule, token_weights=weights, reduction="none", **params)
    results = {}
    for backend in ("triton", "torch"):
        z = logits.clone().requires_grad_(True)
        loss = token_loss(z, labels, backend=backend, **kwargs)
        (loss * grad_output).sum().backward()
        results[backend] = (loss.detach(), z.grad)
    loss, grad = results["triton"]
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    for row in (0, 1, 2, num_rows // 2, num_rows - 2, num_rows - 1):
        exact_z = logits[row : row + 1].double().requires_grad_(True)
        exact = token_loss_reference(exact_z, labels[row : row + 1], rule=rule, token_weights=weights[row : row + 1],
                                     reduction="none", **params)  # fmt: skip
        (exact * grad_output[row].double()).sum().backward()
        torch.testing.assert_close(loss[row : row + 1].double(), exact.detach(), rtol=1e-5, atol=1e-5)
        expected = exact_z.grad[0]
        torch_error = (results["torch"][1][row].double() - expected).abs()
        slack = torch_error + 2.0**-7 * expected.abs() + 1e-7 * expected.abs().max() + torch.finfo(torch.float32).tiny
        assert torch.all((grad[row].double() - expected).abs() <= slack), (rule, row)
        if labels[row] == -100:
            assert torch.all(grad[row] == 0)
