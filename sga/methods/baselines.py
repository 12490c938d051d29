"""The baselines SGA is compared with: GradDiff, NPO and SimNPO.

Notation as in ``sga.methods.sequence_nll`` (l(x) the token-mean answer NLL, K-1 normal samples per forget sample):

- ``grad_diff``: L = -l(x_f) + alpha * (1/(K-1)) sum_k l(x_n^k); or with retain_loss="kl" the retain
                 term is the token-mean KL(p_ref || p_theta) on the normal answers, p_ref the frozen
                 initial model (GradDiff / KL of the TOFU and open-unlearning baselines)
- ``npo``:       L = (2/beta) log(1 + (pi_theta(y|x) / pi_ref(y|x))^beta)
                   = -(2/beta) log sigmoid(-beta log(pi_theta(y|x) / pi_ref(y|x)))
                 (Zhang et al. 2024, "Negative Preference Optimization"); log pi(y|x) = -sum_t NLL_t, the
                 reference log-likelihoods are those of the initial model, computed once before training
- ``simnpo``:    L = -(2/beta) log sigmoid(-(beta/|y|) log pi_theta(y|x) - gamma)
                   = (2/beta) softplus(gamma - beta * l(x_f))
                 (Fan et al. 2024, "Simplicity Prevails: Rethinking NPO"; reference-free, length-normalized)
"""
from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F

from sga.methods.base import Objective, ObjectiveOutput
from sga.methods.retain import retain_kl
from sga.methods.sequence_nll import (
    answer_token_counts,
    joint_sequence_nll,
    weighted_sequence_loss,
)


class GradientDifference(Objective):
    """``grad_diff``: L = -l(x_f) + alpha * R, with R the mean over the K-1 normal (retain) samples of
    their token-mean NLL (retain_loss="nll"), or of their token-mean KL(p_ref || p_theta) on the answer
    tokens against the frozen initial model (retain_loss="kl"; materializes the normal rows' logits)."""

    name = "grad_diff"
    uses_normal = True

    def __init__(self, *, retain_weight: float = 1.0, retain_loss: str = "nll", backend: str = "auto") -> None:
        super().__init__(backend=backend)
        if retain_loss not in ("nll", "kl"):
            raise ValueError(f"retain_loss must be 'nll' or 'kl', got {retain_loss!r}")
        self.retain_weight = float(retain_weight)
        self.retain_loss = retain_loss

    @property
    def uses_reference_model(self) -> bool:  # type: ignore[override]
        return self.retain_loss == "kl"

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        return cls(retain_weight=config.retain_weight, retain_loss=config.retain_loss, backend=backend)

    def compute(self, model, batch, num_forget):
        per_forget = batch["normal_input_ids"].shape[0] // batch["forget_input_ids"].shape[0]
        if self.retain_loss == "nll":
            # linear in the NLLs: one fused call, c_f = -1 and c_n = alpha / (K - 1)
            coefficients = [("forget", -1.0), ("normal", self.retain_weight / per_forget)]
            loss, (forget, normal) = weighted_sequence_loss(model, batch, coefficients, num_forget, backend=self.backend)
            return ObjectiveOutput(loss=loss, forget_nll=forget, normal_nll=normal)
        loss, (forget,) = weighted_sequence_loss(model, batch, [("forget", -1.0)], num_forget, backend=self.backend)
        loss = loss + self.retain_weight * retain_kl(model, self.reference_model, batch).sum() / (per_forget * num_forget)
        return ObjectiveOutput(loss=loss, forget_nll=forget)

    def describe(self):
        return {"method": self.name, "retain_weight": self.retain_weight, "retain_loss": self.retain_loss}


class NegativePreferenceOptimization(Objective):
    """``npo``: L = (2/beta) log(1 + (pi_theta(y|x)/pi_ref(y|x))^beta) = (2/beta) softplus(beta * (S_ref - S))
    with S = sum_t NLL_t = -log pi_theta(y|x) and S_ref the same under the initial model. At the start
    L = (2/beta) log 2; as beta -> 0 its gradient tends to that of GA on the summed NLL.

    Nonlinear in S, so its sequence weights are known only after the forward pass: the fused loss runs with
    reduction "none" and its backward recomputes the chunked pass (4 GEMMs per token instead of 3)."""

    name = "npo"
    uses_reference_nll = True
    default_beta: ClassVar[float] = 0.1

    def __init__(self, *, beta: float = 0.1, backend: str = "auto") -> None:
        super().__init__(backend=backend)
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.beta = float(beta)

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        return cls(beta=cls.default_beta if config.beta is None else config.beta, backend=backend)

    def compute(self, model, batch, num_forget):
        (forget,) = joint_sequence_nll(model, batch, ("forget",), smoothing=0.0, backend=self.backend, validate=False)
        summed = forget * answer_token_counts(batch["forget_labels"]).to(forget.dtype)
        reference = batch["forget_reference_nll"].to(forget.dtype)
        per_sample = (2.0 / self.beta) * F.softplus(self.beta * (reference - summed))
        return ObjectiveOutput(loss=per_sample.sum() / num_forget, forget_nll=forget.detach())

    def describe(self):
        return {"method": self.name, "beta": self.beta}


class SimpleNPO(Objective):
    """``simnpo``: L = -(2/beta) log sigmoid(-(beta/|y|) log pi_theta(y|x) - gamma)
    = (2/beta) softplus(gamma - beta * l(x_f)); no reference model.

    Nonlinear in l(x_f), so, like ``npo``, it takes the recompute path (reduction "none", backward re-runs the
    chunked pass)."""

    name = "simnpo"
    default_beta: ClassVar[float] = 2.5

    def __init__(self, *, beta: float = 2.5, gamma: float = 0.0, backend: str = "auto") -> None:
        super().__init__(backend=backend)
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.beta = float(beta)
        self.gamma = float(gamma)

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        return cls(beta=cls.default_beta if config.beta is None else config.beta, gamma=config.gamma, backend=backend)

    def compute(self, model, batch, num_forget):
        (forget,) = joint_sequence_nll(model, batch, ("forget",), smoothing=0.0, backend=self.backend, validate=False)
        per_sample = (2.0 / self.beta) * F.softplus(self.gamma - self.beta * forget)
        return ObjectiveOutput(loss=per_sample.sum() / num_forget, forget_nll=forget.detach())

    def describe(self):
        return {"method": self.name, "beta": self.beta, "gamma": self.gamma}
