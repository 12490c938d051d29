"""``fused_causal_lm_loss``: patch a Hugging Face causal LM so that ``model(**batch).loss`` is the fused loss."""
from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Optional

import torch

from sga.hf.families import base_model, resolve_head
from sga.hf.loss import loss_from_hidden, router_aux_loss
from sga.kernels.checks import BACKENDS, check_choice, check_smoothing


class FusedLossPatch:
    """The undoable patch installed by :func:`fused_causal_lm_loss`.

    Use it as a context manager (``with fused_causal_lm_loss(model): ...``, which yields the model) or call
    :meth:`remove` to restore the model's previous ``forward``.
    """

    def __init__(self, model: torch.nn.Module, smoothing: float, ascent: bool, backend: str) -> None:
        resolve_head(model)  # refuse unverified models now, not at the first training step
        if installed_patch(model) is not None:
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
        # the class forward's signature: HF's Trainer reads the argument names from it (remove_unused_columns keeps
        # only the columns it names; **kwargs in it means the model accepts num_items_in_batch)
        forward.__signature__ = inspect.signature(type(model).forward)
        # a bound method, so that wrappers that re-bind forward.__func__ (accelerate's autocast) keep working
        self._patched = types.MethodType(forward, model)
        model.forward = self._patched
        self.active = True

    def _forward(self, *args, **kwargs):
        arguments = dict(self._signature.bind(*args, **kwargs).arguments)
        for name, parameter in self._signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        if arguments.pop("fused_lm_head", False):
            raise TypeError(
                "fused_lm_head=True is TRL SFTTrainer's call of its own fused head, which bypasses this patch's loss: "
                "train with sga.hf.trl.FusedSFTTrainer, the SFTTrainer that uses the fused smoothed loss"
            )
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
        head = resolve_head(self.model)  # looked up per call: resize_token_embeddings may replace the head
        outputs = head.decoder(return_dict=True, **arguments)
        loss = loss_from_hidden(
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
        from transformers.modeling_outputs import (
            CausalLMOutputWithPast,
            MoeCausalLMOutputWithPast,
        )

        output_class, extra = CausalLMOutputWithPast, {}
        if outputs.get("router_logits") is not None:
            # what a mixture-of-experts *ForCausalLM adds when it returns router logits and gets labels
            aux_loss = router_aux_loss(self.model, outputs.router_logits, arguments.get("attention_mask"))
            loss = loss + base_model(self.model).router_aux_loss_coef * aux_loss.to(loss.device)
            output_class, extra = MoeCausalLMOutputWithPast, {"aux_loss": aux_loss}
        fields = {field.name for field in dataclasses.fields(output_class)} - {"loss", "logits", "aux_loss"}
        result = output_class(loss=loss, logits=None, **extra, **{k: v for k, v in outputs.items() if k in fields})
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


def installed_patch(model: torch.nn.Module) -> Optional[FusedLossPatch]:
    forward = vars(model).get("forward")
    return getattr(getattr(forward, "__func__", None), "sga_fused_loss_patch", None)


def fused_causal_lm_loss(
    model: torch.nn.Module, *, smoothing: float = 0.0, ascent: bool = True, backend: str = "auto"
) -> FusedLossPatch:
    """Patch ``model`` so that ``model(**batch).loss`` is the fused smoothed-GA loss; undo with the handle.

    ``ascent`` defaults to True, as in every loss of the library (``sga.kernels.smoothed_ga_loss``,
    ``sga.hf.causal_lm_loss``): the patched loss is the negated (smoothed) cross-entropy, for unlearning by
    gradient ascent; pass ``ascent=False`` to fine-tune with the fused loss.

    Behaviour while patched:
    - A call with ``labels`` (or HF's pre-shifted ``shift_labels``) runs the decoder only and returns a
      ``CausalLMOutputWithPast`` with the fused loss, ``logits=None``, and the decoder's cache / hidden states /
      attentions when it produced them (a tuple without the None entries for return_dict=False).
      The loss is the mean over non-ignored shifted labels, or the sum divided by ``num_items_in_batch`` when
      the caller (e.g. HF's Trainer) passes it; with smoothing 0 and ascent=False it equals the
      model's own cross-entropy loss. ``logits_to_keep`` other than 0 is refused together with labels.
    - A call without labels (generation, evaluation of logits) runs the original forward unchanged.
    - Apply it to the bare model before wrapping it (DDP, FSDP, ``accelerator.prepare``): the wrappers call
      ``model.forward`` and so reach the patch. Remove such a wrapper's own forward replacement before
      :meth:`FusedLossPatch.remove` (it refuses otherwise).
    - TRL's ``SFTTrainer`` computes its loss with a fused head of its own (``model(..., fused_lm_head=True)``),
      which never reaches this patch: use :class:`sga.hf.trl.FusedSFTTrainer` there.

    Returns:
        A :class:`FusedLossPatch`: a context manager yielding the model, or call ``.remove()``.
    """
    return FusedLossPatch(model, smoothing, ascent, backend)
