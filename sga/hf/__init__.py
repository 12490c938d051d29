"""The fused loss for Hugging Face causal LMs, computed from the last hidden state and the LM head (no logits).

- :func:`causal_lm_loss`: the smoothed-GA loss of a model on (input_ids, labels), usable in any training loop;
- :func:`fused_causal_lm_loss`: patch a model so that ``model(**batch).loss`` is that loss (HF Trainer, TRL);
- :func:`causal_lm_token_loss`: the token-level rules (wga, satimp, ce_u, ihl, pdu) the same way;
- :func:`register_model_type`: declare a family that is not in :data:`VERIFIED_MODEL_TYPES`.

``sga.hf.trl`` (TRL's SFTTrainer with the fused loss) needs the ``trl`` extra and is imported on its own.
"""
from sga.hf.families import (
    MODEL_FAMILIES,
    VERIFIED_MODEL_TYPES,
    LogitRule,
    register_model_type,
)
from sga.hf.loss import IGNORE_INDEX, causal_lm_loss
from sga.hf.patch import FusedLossPatch, fused_causal_lm_loss
from sga.hf.token_loss import causal_lm_token_loss

__all__ = [
    "IGNORE_INDEX",
    "MODEL_FAMILIES",
    "VERIFIED_MODEL_TYPES",
    "FusedLossPatch",
    "LogitRule",
    "causal_lm_loss",
    "causal_lm_token_loss",
    "fused_causal_lm_loss",
    "register_model_type",
]
