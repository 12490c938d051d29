"""The row computations registered as ``torch.library`` custom ops, each dispatched to its Triton or torch backend.

torch.compile then treats each launch as one opaque node (no tracing into Triton or into the chunk loop of the
torch backends), and the autograd Functions above stay traceable with fullgraph=True. :func:`resolve_backend`
turns the ``backend=`` argument of the public functions into the backend these ops run.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import smoothed_ga_torch, smoothed_ga_triton, token_loss_torch, token_loss_triton, triton_launch
from .checks import BACKENDS, accumulation_dtype, check_choice
from .token_rules import TOKEN_RULES


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' picks the Triton kernel for CUDA tensors and plain PyTorch otherwise.

    'triton' on a CPU tensor is only allowed under TRITON_INTERPRET=1 (the test suite's CPU mode).
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_launch.interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 before "
            "importing sga.kernels to run the kernel on the CPU, or use backend='torch'"
        )
    return backend


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
        return smoothed_ga_triton.rows_forward(*args, softcap=softcap, logit_scale=logit_scale)
    return smoothed_ga_torch.rows_forward(*args, softcap=softcap, logit_scale=logit_scale)


@smoothed_ga_rows.register_fake
def _(logits, labels, weights, grad_norm, grad_buffer, smoothing, sign, ignore_index, backend, softcap=None,
      logit_scale=1.0):
    return logits.new_empty((logits.shape[0],), dtype=accumulation_dtype(logits.dtype))


@torch.library.custom_op("sga::token_rule_rows", mutates_args=("grad_buffer",))
def token_rule_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    grad_norm: torch.Tensor,
    grad_buffer: Optional[torch.Tensor],
    rule: str,
    param0: float,
    param1: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    """Per-token losses w * L_rule of a [N, V] logits matrix; writes w * grad_norm * dL/dz into grad_buffer
    when given."""
    args = (logits, labels, weights, grad_norm, grad_buffer, TOKEN_RULES[rule], param0, param1, ignore_index)
    if backend == "triton":
        return token_loss_triton.rows_forward(*args)
    return token_loss_torch.rows_forward(*args)


@token_rule_rows.register_fake
def _(logits, labels, weights, grad_norm, grad_buffer, rule, param0, param1, ignore_index, backend):
    return logits.new_empty((logits.shape[0],), dtype=accumulation_dtype(logits.dtype))


@torch.library.custom_op("sga::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> None:
    """grad *= grad_output in place (0-dim, or one factor per row)."""
    if backend == "triton":
        triton_launch.scale_rows_(grad, grad_output)
    else:
        smoothed_ga_torch.scale_rows_(grad, grad_output)


@scale_rows_.register_fake
def _(grad, grad_output, backend):
    return None
