"""The fused smoothed-GA loss for Hugging Face causal LMs, computed from the last hidden state and the LM head.

The model's logits [B, T, V] are never computed: the decoder runs to its last hidden state h (the tensor the
model's own ``lm_head`` receives) and :func:`sga.kernels.linear_smoothed_ga_loss` takes h, the head's weight
and bias, and ``config.final_logit_softcapping``:

    logits = softcap(h @ W^T + b) ;  L = s * w * (lse - (1 - eps) z_y - (eps / V) sum_v z_v)   (DESIGN.md 2.1)

HF conventions: labels [B, T] are aligned with input_ids and shifted inside (position t predicts
labels[:, t + 1]), -100 is ignored, and reduction "mean" divides by the number of non-ignored shifted labels
(or by ``normalizer``, HF's ``num_items_in_batch``).

Only architectures whose logits are exactly ``softcap(lm_head(last_hidden_state))`` are accepted, each checked
by the tests against the model's own loss and gradients (``VERIFIED_MODEL_TYPES``); the head must be a plain
``nn.Linear`` (no quantized, LoRA-wrapped or hooked head). Anything else raises NotImplementedError rather than
return a silently different loss.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from sga.kernels import linear_smoothed_ga_loss
from sga.kernels._validation import BACKENDS, check_choice, check_smoothing

IGNORE_INDEX = -100

# model_type -> where the head's input comes from; every entry is checked in tests/test_hf.py.
# llama, qwen2, qwen3, mistral, phi3: model.get_decoder() is the base model, which ends with its final norm.
# gemma, gemma2: the same; gemma2 adds config.final_logit_softcapping (tanh cap) on the logits.
# phi: the base model ends with final_layernorm; the head has a bias.
# opt: get_decoder() is model.decoder, which applies final_layer_norm and project_out itself.
# gpt2: get_decoder() is the transformer, which applies ln_f; the head is tied to the token embedding.
VERIFIED_MODEL_TYPES = frozenset(
    {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "phi", "opt", "gpt2"}
)


@dataclasses.dataclass(frozen=True)
class _Head:
    """What the fused loss needs from a model: the module producing the head's input, and the head itself.

    The logits are softcap(logit_scale * (h @ weight^T + bias))."""

    decoder: torch.nn.Module
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]
    logit_scale: float = 1.0


def _is_plain_linear(module: Any) -> bool:
    """An nn.Linear whose forward is nn.Linear's own, with no hooks: its output is exactly h @ W^T + b."""
    return (
        isinstance(module, torch.nn.Linear)
        and type(module).forward is torch.nn.Linear.forward
        and "forward" not in vars(module)
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


def _resolve_head(model: torch.nn.Module) -> _Head:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in VERIFIED_MODEL_TYPES:
        raise NotImplementedError(
            f"the fused causal-LM loss is verified only for model types {sorted(VERIFIED_MODEL_TYPES)}, "
            f"got {model_type!r}: compute the logits and use sga.kernels.smoothed_ga_loss instead"
        )
    head = model.get_output_embeddings()
    if not _is_plain_linear(head):
        raise NotImplementedError(
            f"the LM head must be a plain torch.nn.Linear without hooks (got {type(head).__module__}."
            f"{type(head).__qualname__}); a wrapped, quantized or hooked head does not compute h @ W^T + b"
        )
    softcap = getattr(config, "final_logit_softcapping", None)
    return _Head(decoder=model.get_decoder(), weight=head.weight, bias=head.bias, softcap=softcap)


def _check_labels(labels: torch.Tensor, token_weights: Optional[torch.Tensor]) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a [B, T] tensor aligned with input_ids, got {shape}")
    if token_weights is not None and (
        not isinstance(token_weights, torch.Tensor) or tuple(token_weights.shape) != tuple(labels.shape)
    ):
        shape = tuple(token_weights.shape) if isinstance(token_weights, torch.Tensor) else type(token_weights).__name__
        raise ValueError(f"token_weights must have the labels' shape {tuple(labels.shape)}, got {shape}")


def _loss_from_hidden(
    head: _Head,
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
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        if token_weights is not None:
            token_weights = F.pad(token_weights[:, 1:], (0, 1), value=0.0)
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
            label (labels[:, t + 1]) is not -100, each once (row * T + t of ``sga.data.answer_positions``, built on
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
    head = _resolve_head(model)
    _check_labels(labels, token_weights)
    model_kwargs.setdefault("use_cache", False)
    model_kwargs.pop("return_dict", None)
    outputs = head.decoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **model_kwargs)
    return _loss_from_hidden(
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


class FusedLossPatch:
    """The undoable patch installed by :func:`fused_causal_lm_loss`.

    Use it as a context manager (``with fused_causal_lm_loss(model): ...``, which yields the model) or call
    :meth:`remove` to restore the model's previous ``forward``.
    """

    def __init__(self, model: torch.nn.Module, smoothing: float, ascent: bool, backend: str) -> None:
        _resolve_head(model)  # refuse unverified models now, not at the first training step
        if _installed_patch(model) is not None:
            raise ValueError("the model already carries a fused_causal_lm_loss patch; remove it first")
        self.model = model
        self.smoothing = check_smoothing(smoothing)
        if not isinstance(ascent, bool):
            raise TypeError(f"ascent must be a bool, got {type(ascent).__name__}")
        self.ascent = ascent
        self.backend = check_choice("backend", backend, BACKENDS)
        self._previous = vars(model).get("forward")  # an instance-level forward (another wrapper), or None
        self._original = model.forward
        # the class's forward signature names the arguments, whatever wrapper an instance forward may be
        self._signature = inspect.signature(types.MethodType(type(model).forward, model))

        def forward(module, *args, **kwargs):
            return self._forward(*args, **kwargs)

        forward.sga_fused_loss_patch = self
        # a bound method, so that wrappers that re-bind forward.__func__ (accelerate's autocast) keep working
        self._patched = types.MethodType(forward, model)
        model.forward = self._patched
        self.active = True

    def _forward(self, *args, **kwargs):
        arguments = dict(self._signature.bind(*args, **kwargs).arguments)
        for name, parameter in self._signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        labels = arguments.pop("labels", None)
        shift_labels = arguments.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return self._original(*args, **kwargs)
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("logits_to_keep is not supported together with labels under fused_causal_lm_loss")
        normalizer = arguments.pop("num_items_in_batch", None)
        return_dict = arguments.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.model.config, "return_dict", True)
        head = _resolve_head(self.model)  # looked up per call: resize_token_embeddings may replace the head
        outputs = head.decoder(return_dict=True, **arguments)
        loss = _loss_from_hidden(
            head,
            outputs.last_hidden_state,
            shift_labels if shift_labels is not None else labels,
            shift=shift_labels is None,
            token_weights=None,
            smoothing=self.smoothing,
            ascent=self.ascent,
            reduction="mean",
            normalizer=normalizer,
            backend=self.backend,
        )
        from transformers.modeling_outputs import CausalLMOutputWithPast

        fields = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)} - {"loss", "logits"}
        result = CausalLMOutputWithPast(loss=loss, logits=None, **{k: v for k, v in outputs.items() if k in fields})
        return result if return_dict else result.to_tuple()

    def remove(self) -> None:
        """Restore the forward the model had before the patch (a no-op when already removed)."""
        if not self.active:
            return
        if vars(self.model).get("forward") is not self._patched:
            raise RuntimeError(
                "model.forward was replaced after fused_causal_lm_loss was applied (e.g. by accelerate.prepare); "
                "undo that wrapper first"
            )
        if self._previous is None:
            del self.model.forward
        else:
            self.model.forward = self._previous
        self.active = False

    def __enter__(self) -> torch.nn.Module:
        return self.model

    def __exit__(self, *exc_info) -> None:
        self.remove()


def _installed_patch(model: torch.nn.Module) -> Optional[FusedLossPatch]:
    forward = vars(model).get("forward")
    return getattr(getattr(forward, "__func__", None), "sga_fused_loss_patch", None)


def fused_causal_lm_loss(
    model: torch.nn.Module, *, smoothing: float = 0.0, ascent: bool = False, backend: str = "auto"
) -> FusedLossPatch:
    """Patch ``model`` so that ``model(**batch).loss`` is the fused smoothed-GA loss; undo with the handle.

    Behaviour while patched:
    - A call with ``labels`` (or HF's pre-shifted ``shift_labels``) runs the decoder only and returns a
      ``CausalLMOutputWithPast`` with the fused loss, ``logits=None``, and the decoder's cache / hidden states /
      attentions when it produced them (a tuple without the None entries for return_dict=False).
      The loss is the mean over non-ignored shifted labels, or the sum divided by ``num_items_in_batch`` when
      the caller (e.g. HF's Trainer) passes it; with the defaults (smoothing 0, ascent False) it equals the
      model's own cross-entropy loss. ``logits_to_keep`` other than 0 is refused together with labels.
    - A call without labels (generation, evaluation of logits) runs the original forward unchanged.
    - Apply it to the bare model before wrapping it (DDP, FSDP, ``accelerator.prepare``): the wrappers call
      ``model.forward`` and so reach the patch. Remove such a wrapper's own forward replacement before
      :meth:`FusedLossPatch.remove` (it refuses otherwise).

    Returns:
        A :class:`FusedLossPatch`: a context manager yielding the model, or call ``.remove()``.
    """
    return FusedLossPatch(model, smoothing, ascent, backend)
