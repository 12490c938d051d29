"""The kernel launches registered as ``torch.library`` custom ops.

torch.compile then treats each launch as one opaque node (no tracing into Triton or into the chunk loop of
the torch backend), and the autograd Function in ``smoothed_ga`` stays traceable with fullgraph=True.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import smoothed_ga_torch


@torch.library.custom_op("sga::smoothed_ga_rows", mutates_args=("grad_buffer",))
def smoothed_ga_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    grad_norm: torch.Tensor,
    grad_buffer: Optional[torch.Tensor],
    smoothing: float,
    sign: float,
    ignore_index: int,
    backend: str,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Per-token signed loss of a [N, V] matrix of raw logits x; writes dL/dx into grad_buffer when given.

    The loss sees z = softcap(logit_scale * x), softcap(u) = c * tanh(u / c) (no cap when softcap is None).
    """
    args = (logits, labels, weights, grad_norm, grad_buffer, smoothing, sign, ignore_index)
    if backend == "triton":
        from . import smoothed_ga_triton

        # the transform keywords only when used, so a Triton backend without them still runs the plain loss
        transform = {} if softcap is None and logit_scale == 1.0 else dict(softcap=softcap, logit_scale=logit_scale)
        return smoothed_ga_triton.rows_forward(*args, **transform)
    return smoothed_ga_torch.rows_forward(*args, softcap=softcap, logit_scale=logit_scale)


@smoothed_ga_rows.register_fake
def _(logits, labels, weights, grad_norm, grad_buffer, smoothing, sign, ignore_index, backend, softcap=None,
      logit_scale=1.0):
    acc_dtype = smoothed_ga_torch.compute_dtype_for(logits.dtype)
    return logits.new_empty((logits.shape[0],), dtype=acc_dtype)


@torch.library.custom_op("sga::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> None:
    """grad *= grad_output in place (0-dim, or one factor per row)."""
    if backend == "triton":
        from . import smoothed_ga_triton

        smoothed_ga_triton.scale_rows_(grad, grad_output)
    else:
        smoothed_ga_torch.scale_rows_(grad, grad_output)


@scale_rows_.register_fake
def _(grad, grad_output, backend):
    return None
