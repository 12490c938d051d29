"""Supervised fine-tuning with TRL's ``SFTTrainer`` and the fused smoothed loss of :mod:`sga.hf`.

TRL's ``SFTTrainer`` (1.x) computes its loss with a fused LM head of its own: it replaces the model's forward
(``trl.trainer.utils.add_fused_lm_head``) and calls ``model(..., fused_lm_head=True)``, which never reaches the
model's loss path, so :func:`sga.hf.fused_causal_lm_loss` applied to a model given to a plain ``SFTTrainer`` is
bypassed. :class:`FusedSFTTrainer` is the ``SFTTrainer`` whose loss is sga's fused loss instead::

    trainer = FusedSFTTrainer(model, SFTConfig(...), train_dataset=dataset, processing_class=tokenizer, smoothing=0.1)
    trainer.train()

Everything of ``SFTTrainer`` before the loss is kept: dataset preparation, its label masking (completion-only for
prompt-completion data, which is its default there, assistant-only with ``assistant_only_loss``), packing and
padding-free batches, PEFT. The loss is the Trainer's own path, ``model(**inputs, num_items_in_batch=N).loss``
(``transformers.Trainer.compute_loss``), reaching the :func:`sga.hf.fused_causal_lm_loss` patch that this class
installs on the model after ``SFTTrainer`` has added its head:

    loss of a micro-batch = sum over its non-ignored tokens of s * ((1 - eps) (lse - z_y) + eps (lse - mean_v z_v)) / N

with N the Trainer's ``num_items_in_batch`` (the label tokens of the whole accumulation window over all processes),
so with smoothing 0 and descent it is ``SFTTrainer``'s own negative log-likelihood, and with smoothing eps the
label-smoothed loss of its ``label_smoothing_factor = eps`` (without computing the logits).

Not logged: TRL's ``entropy`` and ``mean_token_accuracy`` (its fused head computes them from the full next-token
distributions, which the fused loss does not form) and ``num_tokens`` (counted in ``SFTTrainer.compute_loss``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import Trainer

try:
    from trl import SFTTrainer
except ImportError as error:
    raise ImportError(f"sga.hf.trl needs TRL ({error}): pip install 'trl>=1.16' (the extra sga[trl])") from error

from sga.hf.families import base_model
from sga.hf.patch import fused_causal_lm_loss, installed_patch


class FusedSFTTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` whose training and evaluation loss is :func:`sga.hf.fused_causal_lm_loss`.

    Args:
        model, args, **kwargs: as for ``trl.SFTTrainer`` (a model id, a model of a verified family of
            :mod:`sga.hf`, or a PEFT model; the model must not carry a fused-loss patch of its own).
        smoothing: eps, the smoothing over the vocabulary (PyTorch's convention; 0: plain cross-entropy). Use it
            instead of ``SFTConfig.label_smoothing_factor``, which needs the full logits and is refused here.
        ascent: gradient ascent (s = -1) instead of descent: the loss is negated. Default False: this is a
            fine-tuning trainer, the one place where the library descends by default (every loss function and
            ``fused_causal_lm_loss`` default to ascent=True).
        backend: the loss kernel backend ("auto", "triton", "torch").

    The patch is ``self.fused_loss`` (:class:`sga.hf.FusedLossPatch`); ``self.fused_loss.remove()`` restores the
    model's forward. Refused, with a ValueError naming the setting: ``loss_type="dft"``, ``compute_loss_func``,
    ``label_smoothing_factor > 0``, and a mixture-of-experts router loss (``router_aux_loss_coef`` not 0), which
    ``SFTTrainer`` weights differently from the model's own loss.
    """

    def __init__(
        self,
        model: Any,
        args: Any = None,
        *,
        smoothing: float = 0.0,
        ascent: bool = False,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        if isinstance(model, torch.nn.Module) and installed_patch(base_model(model)) is not None:
            raise ValueError(
                "the model already carries a fused_causal_lm_loss patch: pass the bare model, FusedSFTTrainer "
                "installs the patch itself (smoothing=, ascent=, backend=)"
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("FusedSFTTrainer computes the loss itself: do not pass compute_loss_func")
        super().__init__(model, args, **kwargs)
        if self.args.loss_type != "nll":
            raise ValueError(f"FusedSFTTrainer computes the NLL loss, not loss_type={self.args.loss_type!r}: set loss_type='nll'")
        if self.args.label_smoothing_factor > 0:
            raise ValueError(
                f"label_smoothing_factor={self.args.label_smoothing_factor} needs the full logits: set it to 0 and pass "
                f"FusedSFTTrainer(..., smoothing={self.args.label_smoothing_factor}), the same loss computed fused"
            )
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                "FusedSFTTrainer does not add the mixture-of-experts router loss the way SFTTrainer weights it: set "
                "router_aux_loss_coef=0.0 in SFTConfig, or train with trl.SFTTrainer"
            )
        # installed on the transformers model after SFTTrainer's own head, so that the Trainer's calls with labels
        # reach it (calls without labels go on to SFTTrainer's forward, then the model's own)
        self.fused_loss = fused_causal_lm_loss(base_model(self.model), smoothing=smoothing, ascent=ascent, backend=backend)

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
        num_items_in_batch: Optional[torch.Tensor] = None,
    ):
        """``transformers.Trainer.compute_loss``: the patched model's loss, normalized by ``num_items_in_batch``
        (and scaled by the number of processes, which DDP averages over, as the Trainer does)."""
        inputs = {**inputs, "use_cache": False}
        return Trainer.compute_loss(
            self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

