"""The optimal smoothing rate r* (docs/design.md, section 2.3).

With g_f the gradient of the mean forget NLL and g_n that of the mean normal NLL (means over samples),
the one-step update of the SGA objective (2.2) is

    d(r) = -(1 - r + r/K) g_f + (r/K) (K-1) g_n = -g_f + r v,   v = ((K-1)/K) (g_f + g_n),

and ||d(r)||^2 is smallest at r* = <g_f, v> / ||v||^2, i.e.

    r* = (K/(K-1)) (||g_f||^2 + <g_f, g_n>) / ||g_f + g_n||^2.

For the literal reading (``sga_gls``), d(r) = -g_f + r ((K-1)/K) (g_f - g_n), so

    r* = (K/(K-1)) (||g_f||^2 - <g_f, g_n>) / ||g_f - g_n||^2.

The gradients are averaged over a few batches before the inner products are taken (the norm of a mean
is not the mean of norms); across processes they are summed with their sample counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from sga.methods.sequence_nll import joint_sequence_nll

READINGS = {"sga": 1.0, "sga_gls": -1.0}


@dataclass(frozen=True)
class GradientStatistics:
    """Inner products of the mean forget gradient g_f and the mean normal gradient g_n."""

    ff: float  # ||g_f||^2
    fn: float  # <g_f, g_n>
    nn: float  # ||g_n||^2
    num_forget: int
    num_normal: int


def optimal_rate(stats: GradientStatistics, num_classes: int, reading: str = "sga") -> float:
    """r* minimizing ||d(r)|| for ``reading`` "sga" (docs/design.md, section 2.2) or "sga_gls" (literal reading).

    r* = (K/(K-1)) (||g_f||^2 + s <g_f,g_n>) / ||g_f + s g_n||^2 with s = +1 (sga) or -1 (sga_gls).
    """
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {sorted(READINGS)}, got {reading!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes (K) must be >= 2, got {num_classes}")
    s = READINGS[reading]
    denominator = stats.ff + 2.0 * s * stats.fn + stats.nn
    if not denominator > 0:
        raise ValueError("g_f + s g_n is zero: ||d(r)|| does not depend on r, r* is undefined")
    return num_classes / (num_classes - 1) * (stats.ff + s * stats.fn) / denominator


def gradient_statistics(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    backend: str = "auto",
    all_reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> GradientStatistics:
    """Mean forget and normal gradients over ``batches`` (each with forget_* and normal_* tensors on the
    model's device) and their inner products, over the model's trainable parameters.

    The model is put in eval mode (no dropout) for the estimate and restored after. ``all_reduce_sum``
    sums a tensor over processes (e.g. ``lambda t: accelerator.reduce(t, "sum")``); each process passes
    its own batches and the statistics are those of the union. Holds two float32 copies of the trainable
    parameters' gradients.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    sum_f = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    sum_n = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    counts = torch.zeros(2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            # Two forward passes: the fused loss supports one backward per forward.
            (forget,) = joint_sequence_nll(model, batch, ("forget",), smoothing=0.0, backend=backend)
            grads_f = torch.autograd.grad(forget.sum(), params, allow_unused=True)
            (normal,) = joint_sequence_nll(model, batch, ("normal",), smoothing=0.0, backend=backend)
            grads_n = torch.autograd.grad(normal.sum(), params, allow_unused=True)
            for acc_f, acc_n, g_f, g_n in zip(sum_f, sum_n, grads_f, grads_n):
                if g_f is not None:
                    acc_f += g_f.float()
                if g_n is not None:
                    acc_n += g_n.float()
            counts += torch.tensor([forget.numel(), normal.numel()], dtype=torch.float64)
    finally:
        model.train(was_training)
    device = sum_f[0].device
    if all_reduce_sum is not None:
        counts = all_reduce_sum(counts.to(device)).cpu()
        sum_f = [all_reduce_sum(t) for t in sum_f]
        sum_n = [all_reduce_sum(t) for t in sum_n]
    num_forget, num_normal = int(counts[0]), int(counts[1])
    if num_forget == 0 or num_normal == 0:
        raise ValueError("the rate estimate needs forget and normal samples")
    products = torch.zeros(3, dtype=torch.float64, device=device)
    for acc_f, acc_n in zip(sum_f, sum_n):
        g_f = acc_f.double() / num_forget
        g_n = acc_n.double() / num_normal
        products += torch.stack([(g_f * g_f).sum(), (g_f * g_n).sum(), (g_n * g_n).sum()])
    ff, fn, nn = products.tolist()
    if not all(math.isfinite(x) for x in (ff, fn, nn)):
        raise ValueError("non-finite gradient in the rate estimate")
    return GradientStatistics(ff=ff, fn=fn, nn=nn, num_forget=num_forget, num_normal=num_normal)


def estimate_rate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    num_classes: int,
    *,
    reading: str = "sga",
    backend: str = "auto",
    all_reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> tuple[float, GradientStatistics]:
    """r* for the model and data (see the module docstring) and the gradient statistics behind it."""
    stats = gradient_statistics(model, batches, backend=backend, all_reduce_sum=all_reduce_sum)
    return optimal_rate(stats, num_classes, reading), stats


def clip_rate(rate: float, low: float, high: float) -> float:
    """The adaptive rate kept inside the user's range [low, high]."""
    return min(max(rate, low), high)
