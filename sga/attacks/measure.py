"""What every attack measures: a model's knowledge of forget QA records, per question, under a prompt style.

Per question i with answer a_i, paraphrased answer a_i' and perturbed answers a_ij (TOFU's ``_perturbed`` records),
all scored after the same prompt (``PromptStyle``), l(x) the token-mean NLL of answer x:

- probability   P_i = exp(-l(a_i))
- ROUGE-L recall of the model's greedy answer (``max_new_tokens`` tokens) against a_i, stemmer on
- truth ratio   R_i = exp(-mean_j l(a_ij)) / (exp(-l(a_i')) + 1e-10)        (``sga.benchmarks.metrics.truth_ratios``)

and the aggregates of :meth:`Measurement.metrics`, under the study's names: ``forget_prob`` (mean P_i),
``forget_rouge`` (mean ROUGE-L recall), ``forget_truth_ratio`` (mean min(R_i, 1/R_i), TOFU's forget statistic)
and ``forget_quality`` (the KS-test p-value of the R_i against a retain model's, measured the same way).
With the standard prompt these are the numbers ``evaluate_tofu`` reports for the forget set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from sga.benchmarks import metrics
from sga.benchmarks.prompts import PLAIN_STOP_STRINGS, EncodedExample, encode_qa
from sga.benchmarks.scoring import greedy_generate, token_logprobs

FORGET_METRICS = ("forget_prob", "forget_rouge", "forget_truth_ratio", "forget_quality")
# the keys a QA record needs for a measurement with truth ratios
TRUTH_RATIO_KEYS = ("paraphrased_answer", "perturbed_answer")


@dataclass(frozen=True)
class PromptStyle:
    """How question i is put to the model: the record key that holds the question, text that opens the answer
    (part of the prompt, continued by the generation), and ``pairs``: (question, answer) pairs of which pair
    j = i mod len(pairs) is joined to it, "Question: q_j q_i\\nAnswer: a_j <prefix> a_i"."""

    name: str
    question_key: str = "question"
    answer_prefix: str = ""
    pairs: tuple[tuple[str, str], ...] = ()

    def encode(self, tokenizer, index: int, record: dict, answer: str, *, use_chat_template: bool) -> EncodedExample:
        """Question ``index`` (``record``) in this style, followed by ``answer`` (the scored tokens)."""
        question, prefix = record[self.question_key], self.answer_prefix
        if self.pairs:
            paired_question, paired_answer = self.pairs[index % len(self.pairs)]
            question, prefix = f"{paired_question} {question}", " ".join(t for t in (paired_answer, prefix) if t)
        return encode_qa(tokenizer, question, answer, use_chat_template=use_chat_template, answer_prefix=prefix)


STANDARD = PromptStyle("standard")


@dataclass
class Measurement:
    """Per-question values of one model on QA records (module docstring): ``prob`` P_i, ``rouge`` the ROUGE
    records (``rouge1_recall``, ``rougeL_f1``, ``rougeL_recall``, ``input``, ``ground_truth``, ``generation``),
    ``truth_ratios`` R_i (None when not measured) and the answers' mean NLL ``nll``."""

    prob: np.ndarray
    nll: np.ndarray
    rouge: list[dict[str, Any]]
    truth_ratios: Optional[np.ndarray] = None
    style: str = STANDARD.name

    def __len__(self) -> int:
        return len(self.prob)

    def subset(self, indices: Sequence[int]) -> "Measurement":
        """The measurement of the questions ``indices`` only (e.g. the measured half of a split)."""
        picked = list(indices)
        if not picked or any(not 0 <= i < len(self) for i in picked):
            raise ValueError(f"subset indices must be a non-empty selection of 0..{len(self) - 1}, got {picked}")
        ratios = None if self.truth_ratios is None else self.truth_ratios[picked]
        return Measurement(self.prob[picked], self.nll[picked], [self.rouge[i] for i in picked], ratios, self.style)

    def metrics(self, retain_truth_ratios: Optional[Sequence[float]] = None) -> dict[str, Optional[float]]:
        """The aggregates of ``FORGET_METRICS``; forget quality needs the retain model's R_i on the same
        questions (None without them or without truth ratios)."""
        ratios = self.truth_ratios
        quality = None
        if ratios is not None and retain_truth_ratios is not None:
            if len(retain_truth_ratios) != len(ratios):
                raise ValueError(f"{len(retain_truth_ratios)} retain truth ratios for {len(ratios)} questions: measure both on the same questions")
            quality = metrics.forget_quality(ratios, retain_truth_ratios)
        return {
            "forget_prob": float(np.mean(self.prob)),
            "forget_rouge": float(np.mean([r["rougeL_recall"] for r in self.rouge])),
            "forget_truth_ratio": None if ratios is None else metrics.truth_ratio_score(ratios, forget=True),
            "forget_quality": quality,
        }


def check_qa_records(records: Sequence[dict], *, truth_ratio: bool, question_key: str = "question") -> None:
    """A ValueError naming the first record that lacks what the measurement needs."""
    if not records:
        raise ValueError("no QA records to measure")
    needed = (question_key, "answer") + (TRUTH_RATIO_KEYS if truth_ratio else ())
    for i, record in enumerate(records):
        missing = [key for key in needed if key not in record]
        if missing:
            raise ValueError(f"record {i} lacks {missing}: the measurement needs TOFU _perturbed records")


def measure(
    model, tokenizer, records: Sequence[dict], *, style: PromptStyle = STANDARD, truth_ratio: bool = True,
    max_new_tokens: int = 32, batch_size: int = 8, use_chat_template: bool = False,
) -> Measurement:
    """Score and generate the answers of ``records`` under ``style`` (module docstring)."""
    check_qa_records(records, truth_ratio=truth_ratio, question_key=style.question_key)
    n = len(records)

    def encode(i: int, answer: str) -> EncodedExample:
        return style.encode(tokenizer, i, records[i], answer, use_chat_template=use_chat_template)

    examples = [encode(i, r["answer"]) for i, r in enumerate(records)]
    if truth_ratio:
        examples += [encode(i, r["paraphrased_answer"]) for i, r in enumerate(records)]
        examples += [encode(i, p) for i, r in enumerate(records) for p in r["perturbed_answer"]]
    logprobs = token_logprobs(model, examples, batch_size=batch_size, desc=f"{style.name}: scoring")
    mean_nll = np.array([-lp.mean() for lp in logprobs])
    ratios = None
    if truth_ratio:
        bounds = np.cumsum([2 * n] + [len(r["perturbed_answer"]) for r in records])
        perturbed = [mean_nll[bounds[i] : bounds[i + 1]] for i in range(n)]
        ratios = metrics.truth_ratios(mean_nll[n : 2 * n], perturbed)
    prompts = [e.prompt_ids for e in examples[:n]]
    generations = greedy_generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        stop_strings=() if use_chat_template else PLAIN_STOP_STRINGS, desc=f"{style.name}: generating",
    )
    references = [r["answer"] for r in records]
    rouge = [
        {**score, "input": tokenizer.decode(prompt, skip_special_tokens=True), "ground_truth": ref, "generation": gen}
        for score, prompt, ref, gen in zip(metrics.rouge_scores(generations, references, use_stemmer=True), prompts, references, generations)
    ]
    nll = mean_nll[:n]
    return Measurement(prob=metrics.answer_probability(nll), nll=nll, rouge=rouge, truth_ratios=ratios, style=style.name)


def measurement_to_dict(measurement: Measurement) -> dict[str, Any]:
    """A JSON-ready dict of a measurement (read back by :func:`measurement_from_dict`)."""
    ratios = measurement.truth_ratios
    return {
        "style": measurement.style, "prob": measurement.prob.tolist(), "nll": measurement.nll.tolist(), "rouge": measurement.rouge,
        "truth_ratios": None if ratios is None else ratios.tolist(),
    }


def measurement_from_dict(data: dict[str, Any]) -> Measurement:
    """The measurement of :func:`measurement_to_dict`'s dict."""
    ratios = data.get("truth_ratios")
    return Measurement(
        prob=np.asarray(data["prob"], dtype=np.float64), nll=np.asarray(data["nll"], dtype=np.float64), rouge=list(data["rouge"]),
        truth_ratios=None if ratios is None else np.asarray(ratios, dtype=np.float64), style=data["style"],
    )
