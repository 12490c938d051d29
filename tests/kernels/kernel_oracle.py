"""Shared helpers for the logits-kernel tests: input builders and the error rule for low-precision results
(float64 truth, plain fp32 arithmetic as the baseline)."""
from __future__ import annotations

import torch

from sga.kernels import smoothed_ga_loss_reference

BACKENDS = ("torch", "triton")


def make_inputs(shape, vocab_size, *, dtype=torch.float32, ignore_index=-100, ignore_fraction=0.2, seed=0):
    """Random logits (scale 3) and labels with about ignore_fraction of the tokens set to ignore_index."""
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, vocab_size, generator=generator)).to(dtype)
    labels = torch.randint(0, vocab_size, shape, generator=generator)
    ignored = torch.rand(shape, generator=generator) < ignore_fraction
    labels = torch.where(ignored, torch.full_like(labels, ignore_index), labels)
    return logits, labels


def loss_and_grad(fn, logits, labels, grad_output=None, **kwargs):
    """Run fn(logits, labels, **kwargs) forward and backward; return (loss, d loss / d logits)."""
    leaf = logits.detach().clone().requires_grad_(True)
    loss = fn(leaf, labels, **kwargs)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    loss.backward(grad_output.to(loss.dtype))
    return loss.detach(), leaf.grad


def truth(logits, labels, grad_output=None, **kwargs):
    """float64 loss and gradient of docs/design.md, section 2.1, on the (already rounded) inputs."""
    return loss_and_grad(smoothed_ga_loss_reference, logits.double(), labels, grad_output, **kwargs)


def fp32_eager(logits, labels, grad_output=None, **kwargs):
    """What plain fp32 arithmetic gives on the same inputs: the formula (softcap and logit scale included) in
    float32, gradient cast back to the logits' dtype as autograd does for an upcast."""
    def upcast_reference(z, y, **kw):
        z32 = kw.get("logit_scale", 1.0) * z.float()
        softcap = kw.get("softcap")
        if softcap is not None:
            z32 = softcap * torch.tanh(z32 / softcap)
        vocab_size = z32.shape[-1]
        valid = y != kw.get("ignore_index", -100)
        safe_y = torch.where(valid, y, torch.zeros_like(y)).long()
        eps = kw.get("smoothing", 0.0)
        per_token = torch.logsumexp(z32, -1) - (1 - eps) * z32.gather(-1, safe_y[..., None]).squeeze(-1)
        per_token = per_token - (eps / vocab_size) * z32.sum(-1)
        weights = kw.get("token_weights")
        weights = torch.ones_like(per_token) if weights is None else weights.float()
        sign = -1.0 if kw.get("ascent", True) else 1.0
        per_token = torch.where(valid, sign * weights * per_token, torch.zeros_like(per_token))
        reduction = kw.get("reduction", "mean")
        if reduction == "none":
            return per_token
        if reduction == "sum":
            return per_token.sum()
        return per_token.sum() / valid.sum().clamp_min(1)

    return loss_and_grad(upcast_reference, logits, labels, grad_output, **kwargs)


def max_error(value, reference):
    return (value.double() - reference.double()).abs().max().item() if value.numel() else 0.0


def assert_no_worse_than_fp32(ours, baseline, exact, *, rtol=1e-5, what=""):
    """The error rule: our error against the float64 truth is no larger than plain fp32 arithmetic's error on the
    same inputs plus rtol times the size of the exact value, in the max norm and in the 2-norm.

    Every bound scales with |exact| (no floor at 1), so an all-zero, halved or 1%-off result fails at any
    magnitude, a dH of size 1e-4 too; and the baseline must itself be within half the exact value's size, or
    the comparison would mean nothing."""
    exact = exact.double()
    for norm_name, norm in (("max", lambda t: t.abs().max().item()), ("2-norm", lambda t: t.norm().item())):
        size = norm(exact) if exact.numel() else 0.0
        ours_error = norm(ours.double() - exact) if exact.numel() else 0.0
        baseline_error = norm(baseline.double() - exact) if exact.numel() else 0.0
        assert baseline_error <= 0.5 * size or size == 0.0, (
            f"{what}: the fp32 baseline's {norm_name} error {baseline_error:.3e} is over half the exact value's "
            f"size {size:.3e}; it cannot bound ours"
        )
        allowed = baseline_error + rtol * size
        assert ours_error <= allowed, (
            f"{what}: {norm_name} error {ours_error:.3e} > fp32 baseline {baseline_error:.3e} + {rtol:g} x size "
            f"{size:.3e}"
        )


def assert_low_precision_rule(loss, grad, logits, labels, **options):
    """The error rule for a run on low-precision logits: the gradient keeps their dtype, and loss and gradient err
    against the float64 truth no more than fp32 arithmetic does on the same inputs."""
    exact_loss, exact_grad = truth(logits, labels, **options)
    base_loss, base_grad = fp32_eager(logits, labels, **options)
    assert grad.dtype == logits.dtype
    assert_no_worse_than_fp32(loss, base_loss, exact_loss, what="loss")
    assert_no_worse_than_fp32(grad, base_grad, exact_grad, what="gradient")


def rows_truth(logits, labels, weights, grad_norm, *, smoothing, sign, softcap=None, logit_scale=1.0, ignore_index=-100):
    """float64 truth of the row kernel's contract on raw logits x: z = softcap(logit_scale * x), per-row loss
    s * w * l(z) and dL/dx * grad_norm; plus the size of the terms behind each value (for relative bounds):
    |c| (|lse| + |z_y| + |eps| mean|z|) per row and |c| scale dz/du (p_v + |eps| / V + [v == y]) per element."""
    x = logits.double().requires_grad_(True)
    u = logit_scale * x
    z = u if softcap is None else softcap * torch.tanh(u / softcap)
    row_loss = smoothed_ga_loss_reference(z, labels, smoothing=smoothing, ascent=sign < 0, token_weights=weights,
                                          ignore_index=ignore_index, reduction="none")
    (row_loss * grad_norm.double()).sum().backward()
    with torch.no_grad():
        valid = labels != ignore_index
        coef = (weights.double() if weights is not None else torch.ones(len(labels), dtype=torch.float64)) * valid
        safe = labels.clamp_min(0)[:, None]
        onehot = torch.zeros_like(z).scatter_(1, safe, 1.0)
        terms = torch.logsumexp(z, -1).abs() + z.gather(1, safe).squeeze(1).abs() + abs(smoothing) * z.abs().mean(-1)
        loss_scale = coef.abs() * terms + 1e-30
        dz_du = torch.ones_like(z) if softcap is None else 1 - torch.tanh(u / softcap) ** 2
        probs = torch.softmax(z, -1)
        grad_scale = (coef * grad_norm.double()).abs()[:, None] * logit_scale * dz_du
        grad_scale = grad_scale * (probs + abs(smoothing) / z.shape[-1] + onehot) + 1e-300
    return row_loss.detach(), x.grad, loss_scale, grad_scale
