"""The result of one attack on one model: the forget metrics before and after, the retain model's where it is
measured, the durability score of each metric, and the same in open-unlearning's log format.

Forget quality is the KS-test p-value against the untouched retain model's truth ratios on the same questions:
measured with the standard prompt before every attack and after relearning and quantization; after a prompt
probe, against the retain model's ratios under the same probe (forget quality compares like with like). The
retain model's own forget quality before an attack is therefore 1.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from sga.attacks.measure import FORGET_METRICS, Measurement
from sga.attacks.scores import change_score, relearn_score
from sga.benchmarks import openunlearning_log as log
from sga.benchmarks.report import save_results

ATTACK_KINDS = ("relearn", "quantize", "probe")
SCORE_NAMES = {"relearn": "R", "quantize": "Q", "probe": "Q"}


@dataclass
class AttackResult:
    """One attack on one model (module docstring): ``before`` / ``after`` the forget metrics of the attacked model on
    the ``measured`` questions, ``retain_before`` / ``retain_after`` the retain model's (None where not measured),
    ``scores`` the score of each metric (``score`` names it: R for relearning, Q otherwise) and ``deltas`` after -
    before of the attacked model."""

    attack: str
    kind: str
    before: dict[str, Optional[float]]
    after: dict[str, Optional[float]]
    scores: dict[str, Optional[float]]
    deltas: dict[str, Optional[float]]
    measured: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    retain_before: Optional[dict[str, Optional[float]]] = None
    retain_after: Optional[dict[str, Optional[float]]] = None

    @property
    def score(self) -> str:
        return SCORE_NAMES[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": self.score}


def _delta(before: Optional[float], after: Optional[float]) -> Optional[float]:
    return None if before is None or after is None else after - before


def score_attack(
    attack: str, kind: str, before: Measurement, after: Measurement, measured: Sequence[int], *,
    retain_before: Measurement, retain_after: Optional[Measurement] = None, settings: Optional[dict[str, Any]] = None,
) -> AttackResult:
    """Score an attack from its measurements: ``before`` and ``retain_before`` cover every forget question, ``after``
    and ``retain_after`` the ``measured`` ones (in that order). Relearning needs ``retain_after`` (R compares the two
    changes); quantization and probes score the attacked model's own change (Q)."""
    if kind not in ATTACK_KINDS:
        raise ValueError(f"unknown attack kind {kind!r}; expected one of {ATTACK_KINDS}")
    if kind == "relearn" and retain_after is None:
        raise ValueError("a relearning attack is scored against the retain model's relearning: give retain_after")
    measured = list(measured)
    for name, m in (("after", after), ("retain_after", retain_after)):
        if m is not None and len(m) != len(measured):
            raise ValueError(f"{name} has {len(m)} questions, the attack measured {len(measured)}")
    reference = retain_before.subset(measured).truth_ratios
    after_reference = retain_after.truth_ratios if kind == "probe" and retain_after is not None else reference
    if kind == "probe" and retain_after is None:
        after_reference = None
    b = before.subset(measured).metrics(reference)
    a = after.metrics(after_reference)
    rb = retain_before.subset(measured).metrics(reference) if retain_after is not None else None
    ra = retain_after.metrics(after_reference) if retain_after is not None else None
    deltas = {key: _delta(b[key], a[key]) for key in FORGET_METRICS}
    if kind == "relearn":
        scores = {key: relearn_score(deltas[key], _delta(rb[key], ra[key])) for key in FORGET_METRICS}
    else:
        scores = {key: change_score(b[key], a[key]) for key in FORGET_METRICS}
    return AttackResult(attack, kind, b, a, scores, deltas, measured, dict(settings or {}), rb, ra)


def _tofu_log(measurement: Measurement, metrics: dict[str, Optional[float]]) -> dict[str, Any]:
    """The forget-set entries of an open-unlearning TOFU_EVAL log of one measurement."""
    per_item = {
        "forget_Q_A_Prob": log.per_item(metrics["forget_prob"], [{"prob": float(p), "avg_loss": float(l)} for p, l in zip(measurement.prob, measurement.nll)]),
        "forget_Q_A_ROUGE": log.per_item(metrics["forget_rouge"], measurement.rouge),
    }
    if measurement.truth_ratios is not None:
        per_item["forget_truth_ratio"] = log.per_item(metrics["forget_truth_ratio"], [{"score": float(r)} for r in measurement.truth_ratios])
    results: dict[str, Any] = {"settings": {"benchmark": "tofu"}, "per_item": per_item}
    if metrics["forget_quality"] is not None:
        results["forget_quality"] = metrics["forget_quality"]
    return log.to_openunlearning_log(results)


def write_measurement_log(measurement: Measurement, metrics: dict[str, Optional[float]], folder: str | os.PathLike) -> list[Path]:
    """open-unlearning's TOFU_EVAL.json (per question) and TOFU_SUMMARY.json of one measurement in ``folder``;
    ``metrics`` are its aggregates (``Measurement.metrics``: forget quality needs the reference it was measured with)."""
    eval_log = _tofu_log(measurement, metrics)
    folder = Path(folder)
    return [save_results(eval_log, folder / "TOFU_EVAL.json"), save_results(log.summarize(eval_log, "tofu"), folder / "TOFU_SUMMARY.json")]


def write_attack_logs(result: AttackResult, measurements: dict[str, Measurement], out_dir: str | os.PathLike) -> list[Path]:
    """open-unlearning's logs of an attack in ``out_dir/<attack>/<state>/`` (:func:`write_measurement_log`, the
    measured questions only), one state per measurement given (``before``, ``after``, ``retain_before``,
    ``retain_after``), and ``<attack>/ROBUSTNESS_SUMMARY.json``: the metrics, deltas and scores."""
    folder = Path(out_dir) / result.attack
    written = []
    for state, measurement in measurements.items():
        metrics = getattr(result, state)
        if metrics is None:
            continue
        if len(measurement) != len(result.measured):
            measurement = measurement.subset(result.measured)
        written += write_measurement_log(measurement, metrics, folder / state)
    written.append(save_results(result.to_dict(), folder / "ROBUSTNESS_SUMMARY.json"))
    return written
