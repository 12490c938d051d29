"""The retain term of open-unlearning's methods, shared by the objectives built on it.

open-unlearning writes its GradDiff-derived methods as L = gamma * L_forget + alpha * L_retain, with L_retain
the NLL of retain data (or a KL to the frozen initial model). Here, in the per-sample convention of
``sga.methods.base`` (every loss a mean over forget samples, each forget sample with its K-1 paired normal
samples):

    L = gamma * L_forget(x_f) + alpha * (1 / (K-1)) sum_k R(x_n^k)

with R(x) = l(x), the token-mean NLL of the normal answer (retain_loss "nll"), or the token-mean
KL(p_ref || p_theta) on it against the frozen initial model (retain_loss "kl"). gamma is ``forget_weight``,
alpha ``retain_weight``. Differences from open-unlearning: its retain NLL is the token mean over a random
retain batch; here it is the mean of per-sequence token means over the normal samples paired with each forget
sample (``sga.data.pairing``).
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from sga.benchmarks.prompts import IGNORE_INDEX
from sga.config import ConfigError, MethodConfig
from sga.methods.base import Objective, ObjectiveOutput
from sga.methods.sequence_nll import joint_sequence_nll


def retain_kl(model: torch.nn.Module, reference_model: Optional[torch.nn.Module], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per normal sequence: the token mean over its answer tokens of KL(p_ref || p_theta), p_ref the frozen
    initial model (materializes the normal rows' logits of both models)."""
    if reference_model is None:
        raise RuntimeError("grad_diff with retain_loss='kl' needs reference_model set (the trainer sets it)")
    inputs = {"input_ids": batch["normal_input_ids"], "attention_mask": batch["normal_attention_mask"], "use_cache": False}
    log_p = F.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
    with torch.no_grad():
        log_ref = F.log_softmax(reference_model(**inputs).logits[:, :-1].float(), dim=-1)
    per_token = F.kl_div(log_p, log_ref, log_target=True, reduction="none").sum(dim=-1)
    keep = (batch["normal_labels"][:, 1:] != IGNORE_INDEX).float()
    return (per_token * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class RetainRegularized(Objective):
    """Base of the methods with open-unlearning's retain term: ``gamma * forget + alpha * retain``.

    Subclasses implement :meth:`forget_term` and set ``default_alpha`` / ``default_forget_weight`` to
    open-unlearning's published defaults. Normal data (and, for retain_loss "kl", the frozen reference model)
    are used only when alpha != 0.
    """

    default_alpha: ClassVar[float] = 1.0
    default_forget_weight: ClassVar[float] = 1.0

    def __init__(
        self, *, forget_weight: Optional[float] = None, retain_weight: Optional[float] = None, retain_loss: str = "nll",
        backend: str = "auto",
    ) -> None:
        super().__init__(backend=backend)
        if retain_loss not in ("nll", "kl"):
            raise ValueError(f"retain_loss must be 'nll' or 'kl', got {retain_loss!r}")
        self.forget_weight = _finite("forget_weight", self.default_forget_weight if forget_weight is None else forget_weight)
        self.retain_weight = _finite("alpha (retain weight)", self.default_alpha if retain_weight is None else retain_weight)
        self.retain_loss = retain_loss

    @property
    def uses_normal(self) -> bool:  # type: ignore[override]
        return self.retain_weight != 0.0

    @property
    def uses_reference_model(self) -> bool:  # type: ignore[override]
        return self.uses_normal and self.retain_loss == "kl"

    @classmethod
    def retain_options(cls, config: MethodConfig) -> dict:
        """The constructor arguments of the retain term, from the method config."""
        return {"forget_weight": config.forget_weight, "retain_weight": config.alpha, "retain_loss": config.retain_loss}

    def forget_term(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(per forget sample losses [B] (differentiable), per forget sample token-mean NLLs [B] (for logs))."""
        raise NotImplementedError

    def retain_term(self, model, batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(sum over the micro-batch's forget samples of the mean of R over their normal samples, the normal
        sequences' NLLs for logs (None for "kl")); zero when alpha = 0."""
        if not self.uses_normal:
            return torch.zeros(()), None
        per_forget = batch["normal_input_ids"].shape[0] // batch["forget_input_ids"].shape[0]
        if self.retain_loss == "kl":
            return retain_kl(model, self.reference_model, batch).sum() / per_forget, None
        (normal,) = joint_sequence_nll(model, batch, ("normal",), smoothing=0.0, backend=self.backend, validate=False)
        return normal.sum() / per_forget, normal.detach()

    def compute(self, model, batch, num_forget):
        forget_losses, forget_nll = self.forget_term(model, batch)
        retain, normal_nll = self.retain_term(model, batch)
        loss = (self.forget_weight * forget_losses.sum() + self.retain_weight * retain.to(forget_losses.device)) / num_forget
        return ObjectiveOutput(loss=loss, forget_nll=forget_nll, normal_nll=normal_nll)

    def describe(self):
        return {"method": self.name, "forget_weight": self.forget_weight, "alpha": self.retain_weight, "retain_loss": self.retain_loss}


def resolved_beta(config: MethodConfig, default: float) -> float:
    """method.beta, or the method's default when unset; positive and finite."""
    beta = default if config.beta is None else config.beta
    if not (beta > 0 and math.isfinite(beta)):
        raise ConfigError(f"method.beta must be a positive number, got {beta}")
    return float(beta)
