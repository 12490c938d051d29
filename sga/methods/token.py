"""open-unlearning's token-level methods, on the fused token-rule kernels (``sga.kernels.token_rules``).

Notation as in ``sga.methods.base``: x_f a forget sample with answer tokens y_1..y_n, p = softmax(z_t) at the
position predicting y_t, sg = stop-gradient, gamma = ``forget_weight``, alpha = ``alpha`` (``--alpha``) (the retain
term of ``sga.methods.retain``). Every forget term is the token mean over the answer of a per-token rule:

- ``wga``:    gamma * (1/n) sum_t -sg(p_y)^beta * NLL_t                       + alpha * R    (beta 1, alpha 1, gamma 1)
- ``satimp``: gamma * (1/n) sum_t -sg(p_y)^beta1 sg(1 - p_y)^beta2 * NLL_t   + alpha * R    (beta1 5, beta2 1, alpha 1, gamma 0.1)
- ``ce_u``:   gamma * (1/n') sum_t -sum_{v != y} sg(q)_v log p_v, q the softmax with the target removed,
              over the answer tokens after the first ``ignore_first_answer_tokens`` (1)          (alpha 0)
- ``ihl``:    gamma * (1/n) sum_t (1 + p_y - max_{v != y} p_v)                 + alpha * R    (alpha 0)
- ``pdu``:    gamma * (1/n) sum_t (max_v z_v - mean_v z_v)^2 + lambda * (R - eps), and after every optimizer
              step lambda <- max(0, lambda + dual_step_size * (R_step - eps)) once ``dual_warmup_epochs`` epochs
              are done (R_step the step's mean retain NLL; lambda starts at alpha = 1; eps = ``retain_eps``)
- ``undial``: gamma * (1/n) sum_t CE(softmax(z_ref - beta * 1_y), p) with z_ref the frozen initial model's
              logits (self-distillation to a teacher with the target logit lowered by beta)  (beta 10, alpha 0)

(defaults: open-unlearning's published configs.) The first five run through the fused linear path
(:func:`sga.kernels.linear_token_loss` on the last hidden state and the LM head: no [N, V] logits are held);
``undial`` needs the teacher's full distribution at every position and materializes both models' logits of
the forget rows. The logged forget NLL of a step comes from the same hidden states (one extra forward GEMM
pass, no backward).

Differences from open-unlearning, by design: losses are per-sample token means averaged over forget samples
(open-unlearning: a token mean over the batch); ``pdu`` scores the positions that predict answer tokens
(open-unlearning masks the unshifted logits with the labels, one position later) and updates lambda once per
optimizer step with the step's mean retain NLL (open-unlearning: per micro-batch; its per-epoch variant is not
offered); ``undial`` scores the answer tokens only (open-unlearning averages over every position).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from sga.config import ConfigError
from sga.hf.loss import IGNORE_INDEX
from sga.hf.token_loss import token_losses_from_model
from sga.methods.base import ObjectiveOutput
from sga.methods.retain import RetainRegularized, resolved_beta
from sga.methods.sequence_nll import answer_token_counts


def kept_positions(batch: dict[str, torch.Tensor], prefix: str) -> Optional[torch.Tensor]:
    """The flattened row * T + t positions of the batch's ``{prefix}_answer_positions`` (built on the host with
    the batch: no device count in the step), or None when the batch has none."""
    positions = batch.get(f"{prefix}_answer_positions")
    if positions is None:
        return None
    return positions[:, 0] * batch[f"{prefix}_input_ids"].shape[1] + positions[:, 1]


def token_means(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the sum of per-token values [B, T - 1] over the scored positions / their count (0 if none)."""
    counts = answer_token_counts(labels).to(per_token.dtype)
    keep = labels[:, 1:] != IGNORE_INDEX
    return torch.where(keep, per_token, torch.zeros_like(per_token)).sum(dim=1) / counts.clamp(min=1.0)


class TokenRuleMethod(RetainRegularized):
    """A method whose forget term is the token mean of a fused token rule over each forget answer.

    The forget term goes through ONE fused call with token weights gamma / n_seq and reduction "mean" over the
    window normalizer, so its gradient is built in the forward pass (3 GEMMs per token, as the linear
    objectives of ``sga.methods.base``); the logged NLL comes from a no-grad pass over the same hidden states."""

    rule: ClassVar[str]

    def rule_params(self) -> dict[str, float]:
        return {}

    def rule_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The forget labels the rule scores (default: every answer token)."""
        return labels

    def compute(self, model, batch, num_forget):
        labels = batch["forget_labels"]
        scored = self.rule_labels(labels)
        counts = answer_token_counts(scored).float()
        inverse = torch.where(counts > 0, 1.0 / counts.clamp(min=1.0), torch.zeros_like(counts))
        weights = (self.forget_weight * inverse).unsqueeze(1).expand(scored.shape)
        forget, nll = token_losses_from_model(
            model, batch["forget_input_ids"], labels, batch["forget_attention_mask"], self.rule, token_weights=weights,
            rule_labels=scored, reduction="mean", normalizer=num_forget, backend=self.backend, validate=False,
            kept_rows=kept_positions(batch, "forget"), with_nll=True, rule_params=self.rule_params(),
        )
        retain, normal_nll = self.retain_term(model, batch)
        loss = forget + self.retain_weight * retain.to(forget.device) / num_forget
        return ObjectiveOutput(loss=loss, forget_nll=token_means(nll, labels), normal_nll=normal_nll)

    def describe(self):
        return {**super().describe(), **self.rule_params()}


class WeightedGradientAscent(TokenRuleMethod):
    """``wga``: L = gamma * (1/n) sum_t -sg(p_y)^beta (-log p_y) + alpha * R (open-unlearning's WGA; beta 1)."""

    name = "wga"
    rule = "wga"
    default_beta: ClassVar[float] = 1.0

    def __init__(self, *, beta: float = 1.0, **retain: Any) -> None:
        super().__init__(**retain)
        if not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"wga's beta must be finite and >= 0, got {beta}")
        self.beta = float(beta)

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        beta = cls.default_beta if config.beta is None else config.beta
        return cls(beta=beta, backend=backend, **cls.retain_options(config))

    def rule_params(self):
        return {"beta": self.beta}


class SaturationImportance(TokenRuleMethod):
    """``satimp``: L = gamma * (1/n) sum_t -sg(p_y)^beta1 sg(1 - p_y)^beta2 (-log p_y) + alpha * R
    (open-unlearning's SatImp: beta1 5, beta2 1, gamma 0.1, alpha 1)."""

    name = "satimp"
    rule = "satimp"
    default_forget_weight = 0.1

    def __init__(self, *, beta1: float = 5.0, beta2: float = 1.0, **retain: Any) -> None:
        super().__init__(**retain)
        for label, value in (("beta1", beta1), ("beta2", beta2)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"satimp's {label} must be finite and >= 0, got {value}")
        self.beta1, self.beta2 = float(beta1), float(beta2)

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        return cls(beta1=config.beta1, beta2=config.beta2, backend=backend, **cls.retain_options(config))

    def rule_params(self):
        return {"beta1": self.beta1, "beta2": self.beta2}


class CrossEntropyUnlearning(TokenRuleMethod):
    """``ce_u``: L = gamma * (1/n') sum_t -sum_{v != y} sg(q)_v log p_v + alpha * R, q = softmax(z with
    z_y = -inf); the first ``ignore_first_answer_tokens`` (1) answer tokens are not scored (as in
    open-unlearning's CE-U; its config has no retain term: alpha 0)."""

    name = "ce_u"
    rule = "ce_u"
    default_alpha = 0.0

    def __init__(self, *, ignore_first_answer_tokens: int = 1, **retain: Any) -> None:
        super().__init__(**retain)
        if isinstance(ignore_first_answer_tokens, bool) or not isinstance(ignore_first_answer_tokens, int) or ignore_first_answer_tokens < 0:
            raise ValueError(f"ignore_first_answer_tokens must be an int >= 0, got {ignore_first_answer_tokens!r}")
        self.ignore_first = ignore_first_answer_tokens

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        return cls(ignore_first_answer_tokens=config.ignore_first_answer_tokens, backend=backend, **cls.retain_options(config))

    def rule_labels(self, labels):
        scored = labels != IGNORE_INDEX
        leading = (scored.cumsum(dim=1) <= self.ignore_first) & scored
        return labels.masked_fill(leading, IGNORE_INDEX)

    def describe(self):
        return {**super().describe(), "ignore_first_answer_tokens": self.ignore_first}


class InvertedHingeLoss(TokenRuleMethod):
    """``ihl``: L = gamma * (1/n) sum_t (1 + p_y - max_{v != y} p_v) + alpha * R (the inverted hinge loss of
    Cha et al., ICLR 2025; minimizing it lowers p_y below the best other token's probability)."""

    name = "ihl"
    rule = "ihl"
    default_alpha = 0.0

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        return cls(backend=backend, **cls.retain_options(config))


def dual_update(dual: float, retain_loss: float, eps: float, step_size: float) -> float:
    """PDU's projected dual ascent on the constraint retain_loss <= eps: max(0, lambda + step (retain - eps))."""
    return max(0.0, dual + step_size * (retain_loss - eps))


class PrimalDualUnlearning(TokenRuleMethod):
    """``pdu``: L = gamma * (1/n) sum_t (max_v z_v - mean_v z_v)^2 + lambda * (R - eps), with the dual update
    lambda <- max(0, lambda + dual_step_size * (R_step - eps)) after every optimizer step once
    ``dual_warmup_epochs`` epochs are done (open-unlearning's PDU: lambda starts at alpha = 1, step 1, warmup 5;
    eps has no default). primal_dual=False keeps lambda = alpha."""

    name = "pdu"
    rule = "pdu"

    def __init__(self, *, retain_eps: float, primal_dual: bool = True, dual_step_size: float = 1.0,
                 dual_warmup_epochs: float = 5.0, **retain: Any) -> None:
        super().__init__(**retain)
        for label, value in (("retain_eps", retain_eps), ("dual_step_size", dual_step_size), ("dual_warmup_epochs", dual_warmup_epochs)):
            if not math.isfinite(value):
                raise ValueError(f"pdu's {label} must be finite, got {value}")
        if dual_step_size < 0 or dual_warmup_epochs < 0 or self.retain_weight < 0:
            raise ValueError("pdu's dual_step_size, dual_warmup_epochs and alpha (the initial dual variable) must be >= 0")
        self.retain_eps = float(retain_eps)
        self.primal_dual = bool(primal_dual)
        self.dual_step_size = float(dual_step_size)
        self.dual_warmup_epochs = float(dual_warmup_epochs)
        self.initial_dual = self.retain_weight
        self.dual = self.retain_weight  # lambda, the weight of the retain constraint

    @property
    def uses_normal(self) -> bool:  # type: ignore[override]
        return True  # the constraint needs the retain NLL even while lambda is 0

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        if config.retain_eps is None:
            raise ConfigError("method pdu needs method.retain_eps (--retain-eps), the bound of its retain constraint")
        return cls(retain_eps=config.retain_eps, primal_dual=config.primal_dual, dual_step_size=config.dual_step_size,
                   dual_warmup_epochs=config.dual_warmup_epochs, backend=backend, **cls.retain_options(config))

    def compute(self, model, batch, num_forget):
        self.retain_weight = self.dual
        out = super().compute(model, batch, num_forget)
        # the constant -lambda * eps per forget sample: the loss value of lambda * (R - eps)
        out.loss = out.loss - self.dual * self.retain_eps * batch["forget_input_ids"].shape[0] / num_forget
        return out

    def after_step(self, record: dict, epochs_done: float) -> dict:
        """The dual update after an optimizer step (record: the step's all-reduced metrics); returns what to log."""
        if self.primal_dual and epochs_done >= self.dual_warmup_epochs and "normal_nll" in record:
            self.dual = dual_update(self.dual, record["normal_nll"], self.retain_eps, self.dual_step_size)
        return {"dual": self.dual}

    def checkpoint_state(self) -> dict:
        return {"dual": self.dual}

    def restore_checkpoint_state(self, state: dict) -> None:
        self.dual = float(state["dual"])

    def describe(self):
        described = {**super().describe(), "alpha": self.initial_dual, "retain_eps": self.retain_eps,
                     "primal_dual": self.primal_dual, "dual_step_size": self.dual_step_size,
                     "dual_warmup_epochs": self.dual_warmup_epochs}
        return described


def undialtoken_losses_from_model(
    logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, beta: float
) -> torch.Tensor:
    """UNDIAL's per-token loss [..] on aligned logits [.., V] and labels [..] (-100 gives 0):
    CE(softmax(z_ref - beta * 1_y), softmax(z)) = -sum_v t_v log p_v with t = softmax(z_ref - beta * 1_y)."""
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lowered = teacher_logits.float().scatter_add(-1, safe.unsqueeze(-1), torch.full_like(safe, -beta, dtype=torch.float32).unsqueeze(-1))
    target = torch.softmax(lowered, dim=-1)
    per_token = -(target * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    return torch.where(valid, per_token, torch.zeros_like(per_token))


class Undial(RetainRegularized):
    """``undial``: L = gamma * (1/n) sum_t CE(softmax(z_ref,t - beta * 1_{y_t}), p_theta,t) + alpha * R, with
    z_ref the frozen initial model's logits (open-unlearning's UNDIAL: beta 10, alpha 0). Materializes the
    forget rows' logits of both models."""

    name = "undial"
    default_alpha = 0.0
    default_beta: ClassVar[float] = 10.0

    def __init__(self, *, beta: float = 10.0, **retain: Any) -> None:
        super().__init__(**retain)
        if not math.isfinite(beta):
            raise ValueError(f"undial's beta must be finite, got {beta}")
        self.beta = float(beta)

    @property
    def uses_reference_model(self) -> bool:  # type: ignore[override]
        return True  # the teacher

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        return cls(beta=resolved_beta(config, cls.default_beta), backend=backend, **cls.retain_options(config))

    def forget_term(self, model, batch):
        if self.reference_model is None:
            raise RuntimeError("undial needs reference_model set (the trainer sets it): the frozen initial model")
        inputs = {"input_ids": batch["forget_input_ids"], "attention_mask": batch["forget_attention_mask"], "use_cache": False}
        logits = model(**inputs).logits[:, :-1]
        with torch.no_grad():
            teacher = self.reference_model(**inputs).logits[:, :-1]
        labels = batch["forget_labels"]
        target = labels[:, 1:]
        per_token = undialtoken_losses_from_model(logits, teacher, target, self.beta)
        with torch.no_grad():
            nll = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
        return token_means(per_token, labels), token_means(nll, labels)

    def describe(self):
        return {**super().describe(), "beta": self.beta}
