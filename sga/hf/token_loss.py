"""Token-level unlearning rules (wga, satimp, ce_u, ihl, pdu) of a Hugging Face causal LM, without its logits:
the decoder's last hidden state and the LM head go through :func:`sga.kernels.linear_token_loss`."""
from __future__ import annotations

from typing import Optional, Union

import torch

from sga.hf.families import Head, resolve_head
from sga.hf.loss import IGNORE_INDEX, check_labels, shift_labels
from sga.kernels import linear_smoothed_ga_loss, linear_token_loss


def causal_lm_token_loss(
    model: torch.nn.Module,
    input_ids: Optional[torch.Tensor],
    labels: torch.Tensor,
    rule: str = "wga",
    *,
    attention_mask: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    backend: str = "auto",
    validate: bool = True,
    **rule_params: float,
) -> torch.Tensor:
    """The token rule ``rule`` (wga, satimp, ce_u, ihl, pdu) of a Hugging Face causal LM on (input_ids, labels),
    without computing its logits: the decoder's last hidden state and the LM head go through
    :func:`sga.kernels.linear_token_loss`. Usable in any training loop.

    Args:
        model, input_ids, labels, attention_mask, token_weights, normalizer, backend, validate: as in
            :func:`sga.hf.causal_lm_loss` (labels aligned with input_ids, shifted inside, -100 ignored).
        rule, **rule_params: as in :func:`sga.kernels.token_loss`.
        reduction: "mean" (over the scored tokens, or / normalizer), "sum", or "none" ([B, T - 1]).

    Returns:
        The loss to minimize: a float32 scalar, or per token [B, T - 1] aligned with labels[:, 1:].
    """
    loss, _ = token_losses_from_model(
        model, input_ids, labels, attention_mask, rule, token_weights=token_weights, reduction=reduction,
        normalizer=normalizer, backend=backend, validate=validate, rule_params=rule_params,
    )
    return loss


def token_losses_from_model(
    model: torch.nn.Module,
    input_ids: Optional[torch.Tensor],
    labels: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    rule: str,
    *,
    token_weights: Optional[torch.Tensor] = None,
    rule_labels: Optional[torch.Tensor] = None,
    reduction: str = "none",
    normalizer: Union[None, float, torch.Tensor] = None,
    backend: str = "auto",
    validate: bool = True,
    kept_rows: Optional[torch.Tensor] = None,
    with_nll: bool = False,
    rule_params: Optional[dict[str, float]] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(rule loss, per-token NLL [B, T - 1] under no_grad or None) from one decoder forward.

    rule_labels (default labels) are the tokens the rule scores; the NLL is always of ``labels``. kept_rows: as
    in :func:`sga.kernels.linear_token_loss` (flattened positions that include every scored one)."""
    head = resolve_head(model)
    check_labels(labels, token_weights)
    outputs = head.decoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, use_cache=False)
    hidden = outputs.last_hidden_state
    head_args = dict(bias=head.bias, softcap=head.softcap, logit_scale=head.logit_scale)
    shifted, weights = shift_labels(
        (labels if rule_labels is None else rule_labels).to(hidden.device),
        None if token_weights is None else token_weights.to(hidden.device),
    )
    loss = linear_token_loss(hidden, head.weight, shifted, rule, token_weights=weights, reduction=reduction,
                             normalizer=normalizer, backend=backend, validate=validate, ignore_index=IGNORE_INDEX,
                             kept_rows=kept_rows, **head_args, **(rule_params or {}))
    if reduction == "none":
        loss = loss[:, :-1]
    nll = answer_nll_from_hidden(head, hidden, labels, backend, kept_rows) if with_nll else None
    return loss, nll


def answer_nll_from_hidden(
    head: Head, hidden: torch.Tensor, labels: torch.Tensor, backend: str, kept_rows: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-token NLL [B, T - 1] (no gradient) of labels [B, T] from the decoder's last hidden state and the
    resolved head (:func:`sga.hf.families.resolve_head`): one forward GEMM pass of the fused linear loss, for logging."""
    shifted, _ = shift_labels(labels.to(hidden.device), None)
    with torch.no_grad():
        return linear_smoothed_ga_loss(
            hidden.detach(), head.weight.detach(), shifted, bias=None if head.bias is None else head.bias.detach(),
            softcap=head.softcap, logit_scale=head.logit_scale, smoothing=0.0, ascent=False,
            reduction="none", backend=backend, kept_rows=kept_rows, validate=False,
        )[:, :-1]
