"""Token-level unlearning losses over logits, one fused kernel for every rule of ``token_rules``.

Per token (z the logits row, y the label, w the optional token weight, L_rule from ``token_rules``):

    loss_t = w * L_rule(z, y)      ;  dL/dz_v = w (A p_v + B [v == y] + C [v == k] + E q_v + F) / D

:func:`linear_token_loss` computes the same losses from hidden states and an LM head, never holding the
logits (the chunk loop of ``linear.fused_linear_rows`` with :class:`TokenRuleRowKernel` as its row kernel).

Rules: ``wga`` (beta), ``satimp`` (beta1, beta2), ``ce_u``, ``ihl``, ``pdu`` (see ``token_rules`` for the
formulas). Ignored tokens (label == ignore_index) give 0 and a zero gradient; reduction "mean" divides by
D = the non-ignored token count or the caller's ``normalizer`` (D = 0 gives 0). As in ``smoothed_ga``, the
gradient is computed in the forward launch and backward only scales it by grad_output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch

from . import ops
from .checks import (
    IGNORE_INDEX,
    accumulation_dtype,
    check_bool,
    check_labels_in_range,
    check_logits_and_labels,
    check_normalizer,
    check_reduction,
    check_vocab_for_rules,
)
from .linear import fused_linear_rows
from .row_loss import OpRowKernel, RowLossConfig, RowLossFunction
from .token_rules import get_rule


@dataclass(frozen=True)
class TokenRuleRowKernel(OpRowKernel):
    """A token rule (``sga::token_rule_rows``) with one call's options: per-token losses w * L and the gradient
    w * grad_norm * dL/dz. backend is resolved ("triton" or "torch")."""

    loss_name: ClassVar[str] = "token_loss"
    rule: str
    param0: float
    param1: float
    ignore_index: int
    backend: str

    def rows(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor],
        grad_norm: torch.Tensor,
        grad_buffer: Optional[torch.Tensor],
    ) -> torch.Tensor:
        return ops.token_rule_rows(
            logits, labels, weights, grad_norm, grad_buffer, self.rule, self.param0, self.param1, self.ignore_index,
            self.backend,
        )


class TokenLossFunction(RowLossFunction):
    """autograd Function over prepared inputs: logits [N, V] with unit stride along V, labels [N], token weights
    [N] in the accumulation dtype or None, the normalizer as a 0-dim float tensor or None, and a
    :class:`~sga.kernels.row_loss.RowLossConfig` holding a :class:`TokenRuleRowKernel`.

    Use :func:`token_loss` unless you prepare the inputs yourself.
    """


def token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rule: str = "wga",
    *,
    token_weights: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
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
    check_reduction(reduction, normalizer)
    check_bool("inplace_backward", inplace_backward)
    resolved_backend = ops.resolve_backend(backend, logits.device)
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
        weights_1d = token_weights.detach().reshape(-1).to(accumulation_dtype(logits.dtype)).contiguous()
    row_kernel = TokenRuleRowKernel(spec.name, param0, param1, ignore_index, resolved_backend)
    config = RowLossConfig(row_kernel, reduction, inplace_backward)
    loss = TokenLossFunction.apply(logits_2d, labels.reshape(-1).contiguous(), weights_1d, normalizer_tensor, config)
    if reduction == "none":
        return loss.reshape(labels.shape)
    return loss


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
    ignore_index: int = IGNORE_INDEX,
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
    row_kernel = TokenRuleRowKernel(spec.name, param0, param1, ignore_index, ops.resolve_backend(backend, device))
    return fused_linear_rows(
        hidden, weight, labels, row_kernel=row_kernel, bias=bias, softcap=softcap, logit_scale=logit_scale,
        token_weights=token_weights, ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
        kept_rows=kept_rows, skip_ignored=skip_ignored, chunk_size=chunk_size, chunk_budget_bytes=chunk_budget_bytes,
        accumulate_in_float32=accumulate_in_float32, backend=backend, validate=validate,
        return_token_losses=return_token_losses,
    )
