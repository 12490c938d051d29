"""Preference-style methods: DPO / IdkDPO, and open-unlearning's retain term on NPO / SimNPO.

Notation as in ``sga.methods.base``: S(x) = sum_t NLL_t = -log pi_theta(y|x) of an answer, S_ref the same under
the initial model (computed once before training, like ``npo``'s), R the retain term of ``sga.methods.retain``.

- ``dpo``:     L = gamma * (2/beta) softplus(-beta * m) + alpha * R, with the log-ratio margin
               m = log(pi/pi_ref)(x_win) - log(pi/pi_ref)(x_lose) = (S_ref(x_win) - S(x_win)) - (S_ref(x_lose) - S(x_lose)),
               i.e. -(2/beta) log sigmoid(beta * m) (Rafailov et al. 2023, with open-unlearning's 2/beta scale).
               x_lose is the forget answer; x_win the same question with a preferred answer from
               ``preferred_answers_file`` (line i mod count for forget sample i). beta 0.1, alpha 1, gamma 1.
- ``idk_dpo``: ``dpo`` whose preferred answers are refusals ("I don't know"-style), by default this module's
               :data:`IDK_ANSWERS` (open-unlearning's IdkDPO uses its own list, data/idk.jsonl).
- ``npo`` / ``simnpo`` with ``alpha`` or ``forget_weight`` set: gamma * L_npo + alpha * R (open-unlearning's
               NPO: beta 0.1, alpha 1, gamma 1; SimNPO: beta 4.5, delta (our ``gamma``) 0, alpha 1,
               gamma 0.125). Unset, they are exactly ``sga.methods.baselines``' npo / simnpo
               (the registry, ``sga.methods.METHODS``, maps the names npo and simnpo to these wrappers).

The preferred sequences are built from the forget sequences' own prompts (the same chat template or plain
format), so win and lose differ only in the answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F

from sga.benchmarks.prompts import IGNORE_INDEX, EncodedExample, encode_qa
from sga.config import ConfigError, DataConfig
from sga.data.unlearning import UnlearningData, pad_examples
from sga.methods.base import Objective
from sga.methods.baselines import NegativePreferenceOptimization, SimpleNPO
from sga.methods.retain import RetainRegularized, resolved_beta
from sga.methods.sequence_nll import answer_token_counts, joint_sequence_nll

# Refusals written for this project (not open-unlearning's list): one is the preferred answer of each forget
# sample under idk_dpo.
IDK_ANSWERS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure about that.",
    "I don't have that information.",
    "I can't answer that; I don't know.",
    "That is something I don't know.",
    "I have no information about that.",
    "I'm afraid I don't know the answer.",
    "Sorry, I don't know.",
    "I couldn't tell you; I don't know.",
    "I don't have an answer to that question.",
    "I'm not able to answer that.",
    "I really don't know.",
    "That isn't something I know about.",
    "I have no idea, sorry.",
    "I don't know anything about that.",
    "I'm unsure; I can't say.",
)


def dpo_loss(
    win_nll_sum: torch.Tensor, lose_nll_sum: torch.Tensor, win_reference: torch.Tensor, lose_reference: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per pair: (2/beta) softplus(-beta * m) = -(2/beta) log sigmoid(beta * m), with the margin
    m = (S_ref(win) - S(win)) - (S_ref(lose) - S(lose)) of summed answer NLLs S (policy) and S_ref (reference)."""
    margin = (win_reference.to(win_nll_sum.dtype) - win_nll_sum) - (lose_reference.to(lose_nll_sum.dtype) - lose_nll_sum)
    return (2.0 / beta) * F.softplus(-beta * margin)


def read_answers_file(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file (one answer per line)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"method.preferred_answers_file: no such file: {path}")
    answers = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not answers:
        raise ConfigError(f"method.preferred_answers_file: {path} holds no answers")
    return answers


def preferred_examples(
    forget: Sequence[EncodedExample], answers: Sequence[str], tokenizer, *, use_chat_template: Optional[bool], max_length: int
) -> list[EncodedExample]:
    """For forget example i: its prompt followed by answers[i mod len(answers)], scored as an answer.

    The answer's tokens are those a template renders after the generation prompt (end-of-turn tokens, or EOS
    in the plain format, included), found by encoding the answer after a probe question: they do not depend on
    the question. Truncated to max_length tokens."""
    rendered = {}
    for answer in dict.fromkeys(answers):
        probe = encode_qa(tokenizer, "?", answer, use_chat_template=use_chat_template)
        rendered[answer] = probe.input_ids[probe.prompt_length:]
    examples = []
    for i, example in enumerate(forget):
        prompt = example.input_ids[: example.prompt_length]
        answer_ids = rendered[answers[i % len(answers)]]
        ids = (prompt + answer_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + answer_ids)[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise ValueError(f"forget sample {i}: no preferred-answer token left within max_length={max_length}")
        examples.append(EncodedExample(ids, labels, example.prompt_length))
    return examples


@dataclass
class PreferenceData(UnlearningData):
    """Unlearning data with a preferred (win) sequence per forget sample.

    ``reference_examples`` lists forget then preferred sequences: the trainer's one reference pass scores both,
    so ``reference_nll`` holds 2n values (the forget ones first) and is checkpointed as one tensor.
    """

    preferred: list[EncodedExample] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.preferred) != len(self.forget):
            raise ValueError(f"{len(self.preferred)} preferred sequences for {len(self.forget)} forget samples")

    def check_labels(self, vocab_size: int) -> None:
        """The base check, and every preferred sequence's scored labels in [0, vocab_size)."""
        super().check_labels(vocab_size)
        UnlearningData(self.preferred, []).check_labels(vocab_size)

    @property
    def reference_examples(self) -> list[EncodedExample]:
        return self.forget + self.preferred

    def batch(self, indices: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
        """The base batch plus ``preferred_*`` [B, T''] and ``preferred_reference_nll`` [B] when set."""
        batch = super().batch(indices, pad_token_id)
        batch.update(pad_examples([self.preferred[i] for i in indices], pad_token_id, "preferred"))
        if self.reference_nll is not None:
            batch["preferred_reference_nll"] = self.reference_nll[batch["index"] + len(self.forget)]
        return batch


class DirectPreferenceOptimization(RetainRegularized):
    """``dpo``: L = gamma * (2/beta) softplus(-beta * m) + alpha * R with the log-ratio margin
    m = (S_ref(x_win) - S(x_win)) - (S_ref(x_lose) - S(x_lose)); x_lose the forget answer, x_win the preferred
    one (beta 0.1, alpha 1, gamma 1: open-unlearning's DPO)."""

    name = "dpo"
    uses_reference_nll = True
    default_beta: ClassVar[float] = 0.1
    default_answers: ClassVar[Optional[tuple[str, ...]]] = None

    def __init__(self, *, beta: float = 0.1, answers: Optional[Sequence[str]] = None, **retain: Any) -> None:
        super().__init__(**retain)
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a positive number, got {beta}")
        answers = self.default_answers if answers is None else tuple(answers)
        if not answers:
            raise ConfigError(f"method {self.name} needs preferred answers: --preferred-answers-file FILE (one per line)")
        self.beta = float(beta)
        self.answers = tuple(answers)

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        answers = read_answers_file(config.preferred_answers_file) if config.preferred_answers_file else None
        return cls(beta=resolved_beta(config, cls.default_beta), answers=answers, backend=backend, **cls.retain_options(config))

    def prepare_data(self, data: UnlearningData, tokenizer, data_config: DataConfig) -> PreferenceData:
        """The data with each forget sample's preferred sequence (called by the trainer before training)."""
        preferred = preferred_examples(
            data.forget, self.answers, tokenizer, use_chat_template=data_config.use_chat_template, max_length=data_config.max_length
        )
        return PreferenceData(data.forget, data.normal, data.pairs, data.reference_nll, preferred, pairing=data.pairing)

    def forget_term(self, model, batch):
        lose, win = joint_sequence_nll(model, batch, ("forget", "preferred"), smoothing=0.0, backend=self.backend, validate=False)
        summed_lose = lose * answer_token_counts(batch["forget_labels"]).to(lose.dtype)
        summed_win = win * answer_token_counts(batch["preferred_labels"]).to(win.dtype)
        losses = dpo_loss(summed_win, summed_lose, batch["preferred_reference_nll"], batch["forget_reference_nll"], self.beta)
        return losses, lose.detach()

    def describe(self):
        return {**super().describe(), "beta": self.beta, "num_answers": len(self.answers)}


class IdkDirectPreferenceOptimization(DirectPreferenceOptimization):
    """``idk_dpo``: ``dpo`` with refusals as the preferred answers (this module's :data:`IDK_ANSWERS`, or the
    lines of preferred_answers_file)."""

    name = "idk_dpo"
    default_answers = IDK_ANSWERS


class WithRetainTerm(RetainRegularized):
    """open-unlearning's retain term on an existing objective: L = gamma * L_base + alpha * R.

    ``from_config`` returns the base objective itself when neither alpha nor forget_weight is set, so the
    default behaviour of the wrapped name is unchanged. Attribute reads the wrapper lacks go to the base."""

    base_class: ClassVar[type[Objective]]
    default_alpha = 0.0

    def __init__(self, base: Objective, **retain: Any) -> None:
        super().__init__(backend=base.backend, **retain)
        self.base = base

    def __getattr__(self, attribute: str):
        if attribute == "base":  # not yet set: no recursion
            raise AttributeError(attribute)
        return getattr(self.base, attribute)

    @property
    def uses_reference_nll(self) -> bool:  # type: ignore[override]
        return self.base.uses_reference_nll

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        base = cls.base_class.from_config(config, backend=backend)
        if config.alpha is None and config.forget_weight is None:
            return base
        return cls(base, **cls.retain_options(config))

    def forget_term(self, model, batch):
        one = torch.ones((), device=batch["forget_input_ids"].device)
        out = self.base.compute(model, batch, one)  # loss / 1 = the sum of the per-sample losses
        return out.loss, out.forget_nll

    def describe(self):
        return {**self.base.describe(), **super().describe()}


class NPOWithRetain(WithRetainTerm):
    """``npo`` with alpha / forget_weight set: gamma * L_npo + alpha * R."""

    name = "npo"
    base_class = NegativePreferenceOptimization


class SimNPOWithRetain(WithRetainTerm):
    """``simnpo`` with alpha / forget_weight set: gamma * L_simnpo + alpha * R."""

    name = "simnpo"
    base_class = SimpleNPO

