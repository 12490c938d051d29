"""The fused smoothed-GA loss for Hugging Face causal LMs, computed from the last hidden state and the LM head.

The model's logits [B, T, V] are never computed: the decoder runs to its last hidden state h (the tensor the
model's own ``lm_head`` receives) and :func:`sga.kernels.linear_smoothed_ga_loss` takes h, the head's weight
and bias, and ``config.final_logit_softcapping``:

    logits = softcap(h @ W^T + b) ;  L = s * w * (lse - (1 - eps) z_y - (eps / V) sum_v z_v)   (docs/design.md, section 2.1)

HF conventions: labels [B, T] are aligned with input_ids and shifted inside (position t predicts
labels[:, t + 1]), -100 is ignored, and reduction "mean" divides by the number of non-ignored shifted labels
(or by ``normalizer``, HF's ``num_items_in_batch``).

The supported families and how their heads are found: ``sga.hf.families``.

Mixture-of-experts models: :func:`causal_lm_loss` is the token loss only (the likelihood the unlearning objectives
are built on); the router load-balancing loss that such a model adds to its own loss when it returns router
logits (``output_router_logits``) is added by the :func:`fused_causal_lm_loss` patch, as the model does.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from sga.hf import distributed
from sga.hf.families import Head, base_model, check_whole_head, own_class, resolve_head
from sga.kernels import linear_smoothed_ga_loss
from sga.kernels.checks import IGNORE_INDEX


def _gathers_a_sharded_head(loss_from_hidden):
    """Run the loss inside the head module's call when a framework holds the head's parameters, reading them there
    (FSDP2's unsharded parameters, ZeRO-3's gathered data); the framework then reduces and shards their gradients."""

    @functools.wraps(loss_from_hidden)
    def wrapper(head: Head, hidden: torch.Tensor, *args, **kwargs):
        if head.sharded is None:
            return loss_from_hidden(head, hidden, *args, **kwargs)
        module = head.sharded

        def compute(hidden: torch.Tensor) -> torch.Tensor:
            whole = dataclasses.replace(head, weight=module.weight, bias=module.bias, sharded=None)
            check_whole_head(whole.weight, None)
            return loss_from_hidden(whole, hidden, *args, **kwargs)

        return distributed.call_inside(module, compute, hidden)  # hidden: the input the frameworks' hooks see

    return wrapper


def _runs_inside_a_sharded_model(loss_fn):
    """Run ``loss_fn(model, ...)`` inside the model's call when the model is an FSDP2 module: its own parameters
    (embeddings, final norm, a head in its group) are whole only there, and FSDP2 reduces their gradients."""

    @functools.wraps(loss_fn)
    def wrapper(model: torch.nn.Module, *args, **kwargs):
        candidates = (model, base_model(model))
        sharded = next((m for m in candidates if distributed.sharding_framework(m) == distributed.FSDP2), None)
        if sharded is None or distributed.in_fsdp_forward(sharded):  # not sharded, or already inside its forward
            return loss_fn(model, *args, **kwargs)
        return distributed.call_inside(sharded, lambda: loss_fn(model, *args, **kwargs))

    return wrapper


def shift_labels(labels: torch.Tensor, token_weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Labels [B, T] and weights moved left by one (position t scores labels[:, t + 1]); the last position
    ignored (label -100, weight 0)."""
    labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    if token_weights is not None:
        token_weights = F.pad(token_weights[:, 1:], (0, 1), value=0.0)
    return labels, token_weights


def router_aux_loss(
    model: torch.nn.Module, router_logits: tuple[torch.Tensor, ...], attention_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """The router load-balancing loss of a mixture-of-experts model, exactly as its *ForCausalLM computes it:
    its modeling module's ``load_balancing_loss_func(router_logits, num_experts, num_experts_per_tok, mask)``
    (the loss the model adds, times ``router_aux_loss_coef``, when it returns router logits and gets labels)."""
    base = base_model(model)
    function = getattr(sys.modules[own_class(base).__module__], "load_balancing_loss_func", None)
    if function is None or not hasattr(base, "router_aux_loss_coef"):
        raise NotImplementedError(
            f"{type(base).__qualname__} returned router logits but has no load_balancing_loss_func / "
            "router_aux_loss_coef to turn them into its auxiliary loss; set output_router_logits=False"
        )
    return function(router_logits, base.num_experts, base.num_experts_per_tok, attention_mask)


def check_labels(labels: torch.Tensor, token_weights: Optional[torch.Tensor]) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a [B, T] tensor aligned with input_ids, got {shape}")
    if token_weights is not None and (
        not isinstance(token_weights, torch.Tensor) or tuple(token_weights.shape) != tuple(labels.shape)
    ):
        shape = tuple(token_weights.shape) if isinstance(token_weights, torch.Tensor) else type(token_weights).__name__
        raise ValueError(f"token_weights must have the labels' shape {tuple(labels.shape)}, got {shape}")


@_gathers_a_sharded_head
def loss_from_hidden(
    head: Head,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool,
    token_weights: Optional[torch.Tensor],
    smoothing: float,
    ascent: bool,
    reduction: str,
    normalizer: Union[None, float, torch.Tensor],
    backend: str,
    validate: bool = True,
    accumulate_in_float32: bool = True,
    kept_rows: Optional[torch.Tensor] = None,
    skip_ignored: bool = True,
    return_token_losses: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The fused loss of hidden [B, T, D] against labels [B, T].

    shift=True: position t is scored against labels[:, t + 1] (the labels and weights move left by one, the last
    position gets ignore_index), so no slice of hidden is copied; reduction "none" (and the token losses of
    return_token_losses) come back as [B, T - 1]. shift=False: labels are already aligned with the positions
    (HF's ``shift_labels``). kept_rows index the flattened [B * T] positions (after the shift).
    """
    labels = labels.to(hidden.device)
    if token_weights is not None:
        token_weights = token_weights.to(hidden.device)
    if shift:
        labels, token_weights = shift_labels(labels, token_weights)
    loss = linear_smoothed_ga_loss(
        hidden,
        head.weight,
        labels,
        bias=head.bias,
        softcap=head.softcap,
        smoothing=smoothing,
        ascent=ascent,
        token_weights=token_weights,
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
        normalizer=normalizer,
        backend=backend,
        validate=validate,
        accumulate_in_float32=accumulate_in_float32,
        logit_scale=head.logit_scale,
        kept_rows=None if kept_rows is None else kept_rows.to(hidden.device),
        skip_ignored=skip_ignored,
        return_token_losses=return_token_losses,
    )
    token_losses = None
    if return_token_losses:
        loss, token_losses = loss
    if shift:
        if reduction == "none":
            loss = loss[:, :-1]
        if token_losses is not None:
            token_losses = token_losses[:, :-1]
    return loss if token_losses is None else (loss, token_losses)


@_runs_inside_a_sharded_model
def causal_lm_loss(
    model: torch.nn.Module,
    input_ids: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    smoothing: float = 0.0,
    ascent: bool = True,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    backend: str = "auto",
    validate: bool = True,
    accumulate_in_float32: bool = True,
    kept_rows: Optional[torch.Tensor] = None,
    skip_ignored: bool = True,
    return_token_losses: bool = False,
    **model_kwargs: Any,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Smoothed-GA loss of a Hugging Face causal LM on (input_ids, labels), without computing its logits.

    Args:
        model: a ``*ForCausalLM`` of a type in ``VERIFIED_MODEL_TYPES`` (tied head weights work as is).
        input_ids: [B, T] token ids (None when ``inputs_embeds`` is passed in model_kwargs).
        labels: [B, T] aligned with input_ids, -100 for ignored positions; shifted inside.
        attention_mask: passed to the model.
        token_weights: optional [B, T] per-token weights aligned with labels (shifted the same way).
        smoothing, ascent, reduction, normalizer, backend: as in :func:`sga.kernels.linear_smoothed_ga_loss`.
            With ascent=False, smoothing=0 and reduction "mean" this is ``model(..., labels=labels).loss``;
            ``normalizer`` plays the role of HF's ``num_items_in_batch``.
        validate: check every label is -100 or in [0, V) (one host sync on CUDA per call); set False in a
            training loop whose labels come from the tokenizer.
        accumulate_in_float32: as in :func:`sga.kernels.linear_smoothed_ga_loss` (matters for a bf16 / fp16
            head only; a float32 head under autocast always accumulates in its float32 gradient).
        kept_rows: int64 indices into the flattened [B * T] positions that include every position whose shifted
            label (labels[:, t + 1]) is not -100, each once (row * T + t of ``sga.data.unlearning.answer_positions``, built on
            the host with the batch): only those positions go through the head's GEMMs. None: computed with one ``nonzero`` (a host
            sync on CUDA), or not at all with ``skip_ignored=False``.
        return_token_losses: also return the detached per-token losses of the same pass, [B, T - 1] aligned with
            labels[:, 1:] (0 on ignored positions): ``(loss, token_losses)``.
        **model_kwargs: passed to the decoder (position_ids, inputs_embeds, token_type_ids, ...); use_cache
            defaults to False.

    Returns:
        The loss: a float32 scalar, or [B, T - 1] per-token losses aligned with labels[:, 1:] for "none"; with
        return_token_losses, ``(loss, token_losses)``.
    """
    head = resolve_head(model)
    check_labels(labels, token_weights)
    model_kwargs.setdefault("use_cache", False)
    model_kwargs.pop("return_dict", None)
    outputs = head.decoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **model_kwargs)
    return loss_from_hidden(
        head,
        outputs.last_hidden_state,
        labels,
        shift=True,
        token_weights=token_weights,
        smoothing=smoothing,
        ascent=ascent,
        reduction=reduction,
        normalizer=normalizer,
        backend=backend,
        validate=validate,
        accumulate_in_float32=accumulate_in_float32,
        kept_rows=kept_rows,
        skip_ignored=skip_ignored,
        return_token_losses=return_token_losses,
    )
