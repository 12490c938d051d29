"""Unlearning objectives: one class per method, a registry keyed by name.

Notation. For a sequence x with answer (scored) tokens y, l(x) is the token-mean NLL of the answer,
l(x) = -(1/|y|) sum_t log p_theta(y_t | x, y_<t), computed by ``sga.hf.causal_lm_loss`` from the last
hidden state through the fused linear loss (no logits are materialized). Every objective is a mean over
the forget samples of a per-sample loss; a micro-batch contributes

    loss = (1 / N) * sum_{b in micro-batch} L_b

where N is the number of forget samples in the whole accumulation window over all processes (the
trainer all-reduces it), so the gradient of a window is exactly that of one big batch.

Forget and normal sequences of one sample go through ONE forward and ONE fused kernel call. Methods linear in
the sequence NLLs (ga, sga, sga_gls, sga_token, grad_diff with the NLL retain loss, sft) give that call signed
per-token weights c_seq / n_seq (n_seq the sequence's answer-token count, c_seq its coefficient in L) with
reduction "mean" over the normalizer N: the loss is a scalar, so the fused loss builds the whole gradient in
its forward pass (3 GEMMs per token, backward only hands it over). The per-sequence NLLs for logging come from
the per-token losses of that same call: sum_t (c / n) l_t = c * l(x). Methods nonlinear in l(x) (npo, simnpo)
need one differentiable value per sequence: their call has weights 1 / n_seq and reduction "none", and
backward re-runs the chunked pass with the sequence-level grad_output as token weights (4 GEMMs per token).

Labels are checked against the model's vocabulary once, when the run starts
(``sga.data.UnlearningData.check_labels``), so these calls pass validate=False, and the rows that reach the
LM head's GEMMs come with the batch (``{prefix}_answer_positions``, built on the host): a training step
makes no host sync in the loss.

Methods (r smoothing rate, K >= 2 classes, x_f a forget sample, x_n^1..x_n^{K-1} its normal samples):

- ``ga``:        L = -l(x_f)
- ``sga``:       L = -(1 - r + r/K) l(x_f) + (r/K) sum_k l(x_n^k)        (DESIGN.md 2.2; r = 0 is ga)
- ``sga_gls``:   L = -(1 - r + r/K) l(x_f) - (r/K) sum_k l(x_n^k)        (literal label-smoothing reading:
                 ascent on the whole smoothed mixture; normal data is descended only for r < 0)
- ``sga_token``: L = -l_eps(x_f) with eps = r the vocabulary smoothing of the kernel (UGradSL-style
                 token-level variant: l_eps = (1-eps) NLL + eps * (lse - mean_v z_v) per token)
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

Not an unlearning method, and registered beside them so the same trainer (checkpoints, progress, exact
resume) runs it:

- ``sft``:       L = +l(x), ordinary supervised fine-tuning (descent) on the answers of the training
                 records (the trainer's "forget" slot holds them). It teaches a model the facts that it
                 is later asked to forget, as ``sga demo`` does before unlearning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F

from .benchmarks.prompts import IGNORE_INDEX, EncodedExample
from .config import MethodConfig
from .data import pad_examples


@dataclass
class ObjectiveOutput:
    """One micro-batch: its share of the window loss, and the per-sequence NLLs (detached) for logging.

    ``normal_nll`` is None when the normal sequences were not run (no normal data, or zero weight)."""

    loss: torch.Tensor
    forget_nll: torch.Tensor
    normal_nll: Optional[torch.Tensor] = None


def answer_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """n_seq: the scored tokens of each row (labels [B, T]; position t predicts labels[:, t+1])."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def sequence_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    smoothing: float = 0.0,
    backend: str = "auto",
    kept_rows: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> torch.Tensor:
    """l(x) of each row [B]: the token-mean (smoothed, for smoothing != 0) NLL of the scored tokens,
    differentiable. One fused kernel call with weights 1 / n_seq and reduction "none" (its backward recomputes
    the chunked pass: use :func:`weighted_sequence_loss` for losses linear in l(x)). kept_rows: as in
    ``sga.hf.causal_lm_loss``."""
    from .hf import causal_lm_loss

    counts = answer_token_counts(labels)
    weights = _inverse_counts(counts).unsqueeze(1).expand(labels.shape)
    per_token = causal_lm_loss(
        model,
        input_ids,
        labels,
        attention_mask=attention_mask,
        token_weights=weights,
        smoothing=smoothing,
        ascent=False,
        reduction="none",
        backend=backend,
        kept_rows=kept_rows,
        validate=validate,
    )
    return per_token.sum(dim=1)


def _inverse_counts(counts: torch.Tensor) -> torch.Tensor:
    """1 / n_seq, and 0 for a sequence without scored tokens (float32, on the counts' device)."""
    return torch.where(counts > 0, 1.0 / counts.clamp(min=1).float(), torch.zeros_like(counts, dtype=torch.float32))


@dataclass
class JointRows:
    """The sequences of several prefixes as one batch: right-padded to a common width T, stacked prefix by
    prefix; ``kept_rows`` are the flattened row * T + t positions whose next label is scored (None when the
    batch carries no ``{prefix}_answer_positions``); ``sizes`` the number of rows of each prefix."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    kept_rows: Optional[torch.Tensor]
    sizes: list[int]


def joint_rows(batch: dict[str, torch.Tensor], prefixes: Sequence[str]) -> JointRows:
    """Stack the sequences under each prefix ("forget", "normal") into one :class:`JointRows` (no host sync)."""
    width = max(batch[f"{p}_input_ids"].shape[1] for p in prefixes)

    def widen(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(tensor, (0, width - tensor.shape[1]), value=value)

    sizes = [batch[f"{p}_input_ids"].shape[0] for p in prefixes]
    kept_rows = None
    if all(f"{p}_answer_positions" in batch for p in prefixes):
        offsets = [sum(sizes[:i]) for i in range(len(prefixes))]
        kept_rows = torch.cat([
            (batch[f"{p}_answer_positions"][:, 0] + offset) * width + batch[f"{p}_answer_positions"][:, 1]
            for p, offset in zip(prefixes, offsets)
        ])
    return JointRows(
        input_ids=torch.cat([widen(batch[f"{p}_input_ids"], 0) for p in prefixes]),
        labels=torch.cat([widen(batch[f"{p}_labels"], IGNORE_INDEX) for p in prefixes]),
        attention_mask=torch.cat([widen(batch[f"{p}_attention_mask"], 0) for p in prefixes]),
        kept_rows=kept_rows,
        sizes=sizes,
    )


def joint_sequence_nll(
    model, batch, prefixes: Sequence[str], *, smoothing: float, backend: str, validate: bool = True
) -> list[torch.Tensor]:
    """l(x) of the sequences under each prefix ("forget", "normal"), differentiable, all rows in one forward
    and one kernel call of reduction "none" (the recompute path of :func:`sequence_nll`)."""
    rows = joint_rows(batch, prefixes)
    nll = sequence_nll(
        model,
        rows.input_ids,
        rows.labels,
        rows.attention_mask,
        smoothing=smoothing,
        backend=backend,
        kept_rows=rows.kept_rows,
        validate=validate,
    )
    return list(torch.split(nll, rows.sizes))


def weighted_sequence_loss(
    model,
    batch: dict[str, torch.Tensor],
    coefficients: Sequence[tuple[str, float]],
    normalizer: torch.Tensor,
    *,
    smoothing: float = 0.0,
    backend: str = "auto",
    validate: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """L = (1 / normalizer) * sum_p c_p * sum_{x under prefix p} l(x), and the detached l(x) of every sequence.

    coefficients: (prefix, c_p) pairs, at least one c_p != 0. One forward and ONE fused call with per-token
    weights c_p / n_seq, reduction "mean" over the normalizer: the gradient is built in the forward pass. l(x)
    is read back from the same call's per-token losses, sum_t (c_p / n_seq) l_t = c_p l(x). A prefix with
    c_p = 0 has no gradient and nothing to read back: its l(x), for the log, comes from a separate no-grad
    call. validate=False: the labels were checked when the data was built (``UnlearningData.check_labels``).
    """
    active = [(prefix, c) for prefix, c in coefficients if c != 0.0]
    if not active:
        raise ValueError(f"at least one coefficient must be non-zero, got {list(coefficients)}")
    loss, active_nll = _linear_sequence_loss(model, batch, active, normalizer, smoothing, backend, validate)
    by_prefix = dict(zip([prefix for prefix, _ in active], active_nll))
    for prefix, c in coefficients:
        if c == 0.0:
            with torch.no_grad():
                (by_prefix[prefix],) = joint_sequence_nll(
                    model, batch, (prefix,), smoothing=smoothing, backend=backend, validate=validate
                )
    return loss, [by_prefix[prefix] for prefix, _ in coefficients]


def _linear_sequence_loss(model, batch, coefficients, normalizer, smoothing, backend, validate):
    """:func:`weighted_sequence_loss` for non-zero coefficients: the one fused call."""
    from .hf import causal_lm_loss

    rows = joint_rows(batch, [prefix for prefix, _ in coefficients])
    device = rows.labels.device
    row_coefficient = torch.cat([
        torch.full((size,), c, dtype=torch.float32, device=device) for size, (_, c) in zip(rows.sizes, coefficients)
    ])
    row_weight = row_coefficient * _inverse_counts(answer_token_counts(rows.labels))  # c_p / n_seq
    loss, token_losses = causal_lm_loss(
        model,
        rows.input_ids,
        rows.labels,
        attention_mask=rows.attention_mask,
        token_weights=row_weight.unsqueeze(1).expand(rows.labels.shape),
        smoothing=smoothing,
        ascent=False,
        reduction="mean",
        normalizer=normalizer,
        backend=backend,
        kept_rows=rows.kept_rows,
        validate=validate,
        return_token_losses=True,
    )
    nll = token_losses.sum(dim=1) / row_coefficient  # c_p l(x) / c_p
    return loss, list(torch.split(nll, rows.sizes))


class Objective:
    """Base class. Subclasses set ``name`` and implement :meth:`compute`.

    Class flags tell the trainer what a method needs: ``uses_normal`` (K-1 paired normal samples per
    forget sample), ``uses_reference_nll`` (each forget sample's summed NLL under the initial model, in
    ``batch["forget_reference_nll"]``), ``uses_reference_model`` (a frozen copy of the initial model in
    ``self.reference_model``).
    """

    name: ClassVar[str]
    uses_normal: ClassVar[bool] = False
    uses_reference_nll: ClassVar[bool] = False
    uses_reference_model: ClassVar[bool] = False

    def __init__(self, *, backend: str = "auto") -> None:
        self.backend = backend
        self.reference_model: Optional[torch.nn.Module] = None

    @classmethod
    def from_config(cls, config: MethodConfig, *, backend: str = "auto") -> "Objective":
        """Build the objective from the method section of a run config."""
        return cls(backend=backend)

    def compute(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], num_forget: torch.Tensor) -> ObjectiveOutput:
        """The micro-batch loss (sum of per-sample losses / ``num_forget``) and per-sequence NLLs.

        ``num_forget`` is the normalizer N (a 0-dim tensor on the batch's device); the trainer passes the
        window's forget count divided by the factors its backward pass and gradient averaging apply. The
        batch's labels are assumed checked against the model's vocabulary (``UnlearningData.check_labels``)."""
        raise NotImplementedError

    def describe(self) -> dict[str, float | str]:
        """The method's name and parameters, for logs."""
        return {"method": self.name}


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator adding an objective to :data:`OBJECTIVES` under its ``name``."""
    OBJECTIVES[cls.name] = cls
    return cls


def build_objective(config: MethodConfig, *, backend: str = "auto") -> Objective:
    """The objective named by ``config.name``, with its parameters."""
    if config.name not in OBJECTIVES:
        raise ValueError(f"unknown method {config.name!r}; expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[config.name].from_config(config, backend=backend)


@register
class GradientAscent(Objective):
    """``ga``: L = -l(x_f), gradient ascent on the forget answers' token-mean NLL."""

    name = "ga"

    def compute(self, model, batch, num_forget):
        loss, (forget,) = weighted_sequence_loss(model, batch, [("forget", -1.0)], num_forget, backend=self.backend)
        return ObjectiveOutput(loss=loss, forget_nll=forget)


class _SmoothedAscent(Objective):
    """Shared by ``sga`` and ``sga_gls``: L = c_f l(x_f) + c_n sum_k l(x_n^k), with
    c_f = -(1 - r + r/K) and c_n = normal_sign * r/K. At r = 0 the normal sequences carry zero weight and
    are not run, so the computation is exactly that of ``ga``."""

    uses_normal = True
    normal_sign: ClassVar[float]

    def __init__(self, *, rate: float, num_classes: int, backend: str = "auto") -> None:
        super().__init__(backend=backend)
        if num_classes < 2:
            raise ValueError(f"num_classes (K) must be >= 2, got {num_classes}")
        self.rate = float(rate)
        self.num_classes = int(num_classes)

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        return cls(rate=config.rate, num_classes=config.num_classes, backend=backend)

    def coefficients(self) -> tuple[float, float]:
        """(c_f, c_n) for the current rate."""
        r, k = self.rate, self.num_classes
        return -(1.0 - r + r / k), self.normal_sign * r / k

    def compute(self, model, batch, num_forget):
        c_forget, c_normal = self.coefficients()
        if c_normal == 0.0:
            loss, (forget,) = weighted_sequence_loss(model, batch, [("forget", c_forget)], num_forget, backend=self.backend)
            return ObjectiveOutput(loss=loss, forget_nll=forget)
        coefficients = [("forget", c_forget), ("normal", c_normal)]
        loss, (forget, normal) = weighted_sequence_loss(model, batch, coefficients, num_forget, backend=self.backend)
        return ObjectiveOutput(loss=loss, forget_nll=forget, normal_nll=normal)

    def describe(self):
        return {"method": self.name, "rate": self.rate, "num_classes": self.num_classes}


@register
class SmoothedGradientAscent(_SmoothedAscent):
    """``sga`` (DESIGN.md 2.2): L = -(1 - r + r/K) l(x_f) + (r/K) sum_k l(x_n^k).

    The weights come from label smoothing over K "classes" (the forget sample the true class, its K-1
    normal samples the others): ascent on the forget sample, descent on the normal samples for r > 0."""

    name = "sga"
    normal_sign = 1.0


@register
class SmoothedGradientAscentLiteral(_SmoothedAscent):
    """``sga_gls``, the literal label-smoothing reading: ascent on the whole smoothed mixture,
    L = -(1 - r + r/K) l(x_f) - (r/K) sum_k l(x_n^k); normal data is descended only for r < 0."""

    name = "sga_gls"
    normal_sign = -1.0


@register
class TokenSmoothedAscent(Objective):
    """``sga_token``: GA with vocabulary label smoothing eps = r in the kernel, L = -l_eps(x_f) where per
    token l_eps = lse(z) - (1 - eps) z_y - (eps/V) sum_v z_v (the token-level, UGradSL-style variant).
    Its logged forget NLL is l_eps itself."""

    name = "sga_token"

    def __init__(self, *, rate: float, backend: str = "auto") -> None:
        super().__init__(backend=backend)
        if not rate <= 1.0:
            raise ValueError(f"sga_token's rate is the vocabulary smoothing eps and must be <= 1, got {rate}")
        self.rate = float(rate)

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        return cls(rate=config.rate, backend=backend)

    def compute(self, model, batch, num_forget):
        loss, (forget,) = weighted_sequence_loss(
            model, batch, [("forget", -1.0)], num_forget, smoothing=self.rate, backend=self.backend
        )
        return ObjectiveOutput(loss=loss, forget_nll=forget)

    def describe(self):
        return {"method": self.name, "rate": self.rate}


@register
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
        loss = loss + self.retain_weight * self._retain_kl(model, batch).sum() / (per_forget * num_forget)
        return ObjectiveOutput(loss=loss, forget_nll=forget)

    def _retain_kl(self, model, batch) -> torch.Tensor:
        """Per normal sequence: token-mean over answer tokens of KL(p_ref || p_theta)."""
        if self.reference_model is None:
            raise RuntimeError("grad_diff with retain_loss='kl' needs reference_model set (the trainer sets it)")
        inputs = {"input_ids": batch["normal_input_ids"], "attention_mask": batch["normal_attention_mask"], "use_cache": False}
        log_p = F.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
        with torch.no_grad():
            log_ref = F.log_softmax(self.reference_model(**inputs).logits[:, :-1].float(), dim=-1)
        per_token = F.kl_div(log_p, log_ref, log_target=True, reduction="none").sum(dim=-1)
        keep = (batch["normal_labels"][:, 1:] != IGNORE_INDEX).float()
        return (per_token * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)

    def describe(self):
        return {"method": self.name, "retain_weight": self.retain_weight, "retain_loss": self.retain_loss}


@register
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


@register
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


@register
class SupervisedFineTuning(Objective):
    """``sft``: L = +l(x), descent on the token-mean NLL of the training answers: ordinary supervised
    fine-tuning, used to teach a model what it later forgets. The records are the trainer's "forget"
    data; the logged ``forget_nll`` is the training NLL."""

    name = "sft"

    def compute(self, model, batch, num_forget):
        loss, (nll,) = weighted_sequence_loss(model, batch, [("forget", 1.0)], num_forget, backend=self.backend)
        return ObjectiveOutput(loss=loss, forget_nll=nll)


@torch.no_grad()
def examples_nll(
    model: torch.nn.Module,
    examples: Sequence[EncodedExample],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    backend: str = "auto",
) -> torch.Tensor:
    """l(x) of every example under ``model`` in eval mode [n] (float32, on CPU, in input order). The
    model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        values = []
        for start in range(0, len(examples), batch_size):
            padded = pad_examples(examples[start : start + batch_size], pad_token_id, "x")
            padded = {key: value.to(device) for key, value in padded.items()}
            (nll,) = joint_sequence_nll(model, padded, ("x",), smoothing=0.0, backend=backend)
            values.append(nll.float().cpu())
        return torch.cat(values)
    finally:
        model.train(was_training)


def reference_sequence_nll(model: torch.nn.Module, examples: Sequence[EncodedExample], **kwargs) -> torch.Tensor:
    """S_ref = -log pi_ref(y|x) of every example: l(x) times its answer-token count (for ``npo``)."""
    counts = torch.tensor([sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in examples], dtype=torch.float32)
    return examples_nll(model, examples, **kwargs) * counts
