"""Token-level unlearning losses over logits, one fused kernel for every rule of ``token_rules``.

Per token (z the logits row, y the label, w the optional token weight, L_rule from ``token_rules``):

    loss_t = w * L_rule(z, y)      ;  dL/dz_v = w (A p_v + B [v == y] + C [v == k] + E q_v + F) / D

:func:`linear_token_loss` computes the same losses from hidden states and an LM head, never holding the
logits (the chunk loop of ``linear.fused_linear_rows`` with this kernel as its row kernel).

Rules: ``wga`` (beta), ``satimp`` (beta1, beta2), ``ce_u``, ``ihl``, ``pdu`` (see ``token_rules`` for the
formulas). Ignored tokens (label == ignore_index) give 0 and a zero gradient; reduction "mean" divides by
D = the non-ignored token count or the caller's ``normalizer`` (D = 0 gives 0). As in ``smoothed_ga``, the
gradient is computed in the forward launch and backward only scales it by grad_output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.autograd.function import once_differentiable

from . import ops, token_loss_torch
from .linear import fused_linear_rows
from .checks import (
    REDUCTIONS,
    check_choice,
    check_labels_in_range,
    check_logits_and_labels,
    check_normalizer,
    resolve_backend,
)
from .token_rules import TOKEN_RULES, get_rule
from .smoothed_ga_torch import compute_dtype_for


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
    when given. One opaque node for torch.compile."""
    spec = TOKEN_RULES[rule]
    if backend == "triton":
        from . import token_loss_triton

        return token_loss_triton.rows_forward(logits, labels, weights, grad_norm, grad_buffer, spec, param0, param1, ignore_index)
    return token_loss_torch.rows_forward(logits, labels, weights, grad_norm, grad_buffer, spec, param0, param1, ignore_index)


@token_rule_rows.register_fake
def _(logits, labels, weights, grad_norm, grad_buffer, rule, param0, param1, ignore_index, backend):
    return logits.new_empty((logits.shape[0],), dtype=compute_dtype_for(logits.dtype))


def mean_divisor(labels: torch.Tensor, ignore_index: int, normalizer: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """1 / D for reduction "mean" (D = non-ignored tokens or the caller's normalizer; D = 0 gives 0), on device."""
    divisor = (labels != ignore_index).sum().to(dtype) if normalizer is None else normalizer.to(dtype)
    return torch.where(divisor != 0, 1.0 / divisor, torch.zeros_like(divisor))


class TokenLossFunction(torch.autograd.Function):
    """autograd Function over prepared inputs: logits [N, V] with unit stride along V, labels [N], token
    weights [N] or None, the normalizer as a 0-dim tensor or None, the rule name and its two parameters.

    Use :func:`token_loss` unless you prepare the inputs yourself.
    """

    @staticmethod
    def forward(ctx, logits, labels, token_weights, normalizer, rule, param0, param1, ignore_index, reduction, backend, inplace_backward):
        acc_dtype = compute_dtype_for(logits.dtype)
        if reduction == "mean":
            grad_norm = mean_divisor(labels, ignore_index, normalizer, acc_dtype)
        else:
            grad_norm = torch.ones((), dtype=acc_dtype, device=logits.device)
        grad_buffer = None
        if ctx.needs_input_grad[0]:
            grad_buffer = logits if inplace_backward else torch.empty_like(logits)
        row_loss = token_rule_rows(logits, labels, token_weights, grad_norm, grad_buffer, rule, param0, param1, ignore_index, backend)
        ctx.backend = backend
        ctx.backward_done = False
        ctx.save_for_backward(grad_buffer)
        if reduction == "none":
            return row_loss
        if reduction == "sum":
            return row_loss.sum()
        return row_loss.sum() * grad_norm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.backward_done:
            raise RuntimeError("token_loss: backward can run only once per forward (the gradient buffer is scaled in place)")
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        ops.scale_rows_(grad, grad_output, ctx.backend)
        return (grad,) + (None,) * 10


def check_vocab_for_rules(vocab_size: int) -> None:
    """Every rule needs a non-target class (q, z_k): V >= 2."""
    if vocab_size < 2:
        raise ValueError(f"token rules need a vocabulary of at least 2 classes (a non-target class), got V = {vocab_size}")


def token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rule: str = "wga",
    *,
    token_weights: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    backend: str = "auto",
    inplace_backward: bool = False,
    validate: bool = True,
    **rule_params: float,
) -> torch.Tensor:
    """Token-level unlearning loss ``rule`` of logits ``[..., V]`` against ``labels [...]``, fused (one kernel).

    Args:
        logits: float16 / bfloat16 / float32 (float64 for gradcheck) logits, any leading shape, V >= 2.
        labels: int32 / int64 class ids with the logits' leading shape; ``ignore_index`` marks skipped tokens.
        rule: "wga", "satimp", "ce_u", "ihl" or "pdu" (``sga.kernels.token_rules.TOKEN_RULES``).
        **rule_params: the rule's parameters: wga ``beta`` (default 1.0), satimp ``beta1`` (5.0) and
            ``beta2`` (1.0), each finite and >= 0; the other rules take none.
        token_weights: optional per-token weights w of any sign (zero allowed); treated as constants.
        ignore_index, reduction, normalizer, backend, inplace_backward, validate: as in
            :func:`sga.kernels.smoothed_ga_loss`.

    Returns:
        float32 loss (float64 for float64 logits): a scalar, or per token for reduction "none".

    Every rule's L is the quantity to *minimize* for unlearning (wga / satimp carry the ascent sign themselves).
    """
    spec = get_rule(rule)
    param0, param1 = spec.resolve(rule_params)
    check_logits_and_labels(logits, labels, token_weights, ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    if normalizer is not None and reduction != "mean":
        raise ValueError(f"normalizer applies to reduction='mean' only, got reduction={reduction!r}")
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    resolved_backend = resolve_backend(backend, logits.device)
    normalizer_tensor = check_normalizer(normalizer, logits.device)
    vocab_size = logits.shape[-1]
    check_vocab_for_rules(vocab_size)
    if validate:
        check_labels_in_range(labels, vocab_size, ignore_index)

    logits_2d = logits.reshape(-1, vocab_size)
    if logits_2d.stride(-1) != 1:
        logits_2d = logits_2d.contiguous()
    weights_1d = None
    if token_weights is not None:
        weights_1d = token_weights.detach().reshape(-1).to(compute_dtype_for(logits.dtype)).contiguous()
    loss = TokenLossFunction.apply(
        logits_2d, labels.reshape(-1).contiguous(), weights_1d, normalizer_tensor, spec.name, param0, param1,
        ignore_index, reduction, resolved_backend, inplace_backward,
    )
    if reduction == "none":
        return loss.reshape(labels.shape)
    return loss


@dataclass(frozen=True)
class TokenRuleRowKernel:
    """A token rule as the row kernel of :func:`sga.kernels.linear.fused_linear_rows`: per-chunk losses w * L
    and, in place, w * dL/dz (grad_norm = 1: the chunk loop applies 1 / D). backend is resolved."""

    rule: str
    param0: float
    param1: float
    ignore_index: int
    backend: str

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor], write_grad: bool
    ) -> torch.Tensor:
        unit_norm = torch.ones((), dtype=compute_dtype_for(logits.dtype), device=logits.device)
        return token_rule_rows(
            logits, labels, weights, unit_norm, logits if write_grad else None, self.rule, self.param0, self.param1,
            self.ignore_index, self.backend,
        )


def linear_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    rule: str = "wga",
    *,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    token_weights: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    backend: str = "auto",
    kept_rows: Optional[torch.Tensor] = None,
    skip_ignored: bool = True,
    chunk_size: Optional[int] = None,
    chunk_budget_bytes: Optional[int] = None,
    accumulate_in_float32: bool = True,
    validate: bool = True,
    return_token_losses: bool = False,
    **rule_params: float,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The token rule ``rule`` of the logits ``softcap(logit_scale * (hidden @ weight.T + bias))``, never holding
    the [N, V] logits: the chunk loop of :func:`sga.kernels.linear.fused_linear_rows` with the token-rule kernel.

    Args:
        rule, **rule_params: as in :func:`token_loss`.
        everything else: as in :func:`sga.kernels.linear_smoothed_ga_loss` (return_token_losses gives the
            per-token w * L of the same pass).
    """
    spec = get_rule(rule)
    param0, param1 = spec.resolve(rule_params)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        check_vocab_for_rules(weight.shape[0])
    device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    row_kernel = TokenRuleRowKernel(spec.name, param0, param1, ignore_index, resolve_backend(backend, device))
    return fused_linear_rows(
        hidden, weight, labels, row_kernel=row_kernel, bias=bias, softcap=softcap, logit_scale=logit_scale,
        token_weights=token_weights, ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
        kept_rows=kept_rows, skip_ignored=skip_ignored, chunk_size=chunk_size, chunk_budget_bytes=chunk_budget_bytes,
        accumulate_in_float32=accumulate_in_float32, backend=backend, validate=validate,
        return_token_losses=return_token_losses,
    )
