"""open-unlearning's evaluation logs: write them from this library's results, read them back, and read
a retain model's reference (forget quality, PrivLeak) from either format.

open-unlearning writes two JSON files per benchmark run, ``<BENCH>_EVAL.json`` and ``<BENCH>_SUMMARY.json``
(``BENCH`` = TOFU or MUSE). The EVAL file maps each metric name to ``{"agg_value": number or null,
"value_by_index": {"0": record, "1": record, ...}}``, records keyed by the item's index in its data split:
``{"prob", "avg_loss"}`` for probabilities (lists for the perturbed answers), ``{"score"}`` for truth
ratios, extraction strength and exact memorization, ``{"rouge1_recall", "rougeL_f1", "rougeL_recall",
"input", "ground_truth", "generation"}`` for ROUGE. An MIA metric holds ``{"agg_value": AUC, "auc": AUC,
"forget": {...}, "holdout": {...}}``, each side a per-index score log; forget_quality, model_utility and
privleak hold only ``agg_value``. The SUMMARY file maps the top-level metric names to their agg_value.

``evaluate_tofu`` / ``evaluate_muse`` put the per-index metrics under ``results["per_item"]`` with the
records as lists in index order; ``to_openunlearning_log`` turns that into the EVAL layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .mia import METRIC_NAMES
from .report import load_results, save_results

# Metrics that hold only an aggregate: open-unlearning name -> this library's result key.
AGGREGATE_ONLY = {
    "tofu": {"forget_quality": "forget_quality", "model_utility": "model_utility", "privleak": "privleak"},
    "muse-news": {"privleak": "privleak"},
}
LOG_PREFIX = {"tofu": "TOFU", "muse-news": "MUSE"}
# The metrics open-unlearning evaluates for their own sake (its SUMMARY file); the rest of the EVAL
# file are the pre-computed inputs of these (paraphrased / perturbed probabilities, utility terms).
SUMMARY_METRICS = {
    "tofu": ("forget_quality", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio", "model_utility",
             "privleak", "extraction_strength", "exact_memorization"),
    "muse-news": ("forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE", "privleak",
                  "extraction_strength", "exact_memorization"),
}


def per_item(agg_value: float | None, records: Sequence[Any]) -> dict[str, Any]:
    """One per-index metric: its aggregate and its records in index order."""
    return {"agg_value": agg_value, "value_by_index": list(records)}


def scores_entry(values: Sequence[float | None]) -> dict[str, Any]:
    """A per-index ``{"score"}`` metric whose aggregate is the mean of the values that are not None."""
    present = [v for v in values if v is not None]
    return per_item(float(np.mean(present)) if present else None, [{"score": v} for v in values])


def mia_entry(auc: float, forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> dict[str, Any]:
    """An MIA metric: the AUC and the per-index attack scores of both sides."""
    return {"agg_value": auc, "auc": auc, "forget": scores_entry(forget_scores), "holdout": scores_entry(holdout_scores)}


def mia_entries(found: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``mia.membership_inference``'s results under open-unlearning's MIA metric names."""
    return {METRIC_NAMES[a]: mia_entry(out["auc"], out["forget"], out["holdout"]) for a, out in found.items()}


def _benchmark(results: Mapping[str, Any]) -> str:
    benchmark = results.get("settings", {}).get("benchmark")
    if benchmark not in LOG_PREFIX:
        raise ValueError(
            f"results of benchmark {benchmark!r} have no open-unlearning log layout; expected one of {sorted(LOG_PREFIX)}"
        )
    if "per_item" not in results:
        raise ValueError("results lack 'per_item': pass the dict returned by evaluate_tofu / evaluate_muse")
    return benchmark


def _indexed(entry: Any) -> Any:
    """value_by_index lists -> {"0": ..., "1": ...}, recursively (the MIA entries nest two)."""
    if not isinstance(entry, Mapping):
        return entry
    out = {key: _indexed(value) for key, value in entry.items() if key != "value_by_index"}
    if "value_by_index" in entry:
        out["value_by_index"] = {str(i): record for i, record in enumerate(entry["value_by_index"])}
    return out


def to_openunlearning_log(results: Mapping[str, Any]) -> dict[str, Any]:
    """The EVAL-file dict of a result of ``evaluate_tofu`` or ``evaluate_muse``, metric names sorted as
    open-unlearning writes them."""
    benchmark = _benchmark(results)
    log = {name: _indexed(entry) for name, entry in results["per_item"].items()}
    for name, key in AGGREGATE_ONLY[benchmark].items():
        if key in results:
            log[name] = {"agg_value": results[key]}
    return dict(sorted(log.items()))


def summarize(log: Mapping[str, Any], benchmark: str) -> dict[str, Any]:
    """The SUMMARY-file dict: the top-level metrics present in ``log`` (and every mia_* one) with an agg_value."""
    if benchmark not in SUMMARY_METRICS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {sorted(SUMMARY_METRICS)}")
    return {
        name: entry["agg_value"]
        for name, entry in log.items()
        if (name in SUMMARY_METRICS[benchmark] or name.startswith("mia_")) and entry.get("agg_value") is not None
    }


def write_openunlearning_logs(results: Mapping[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<out_dir>/<BENCH>_EVAL.json`` and ``<BENCH>_SUMMARY.json``; returns both paths."""
    benchmark = _benchmark(results)
    log = to_openunlearning_log(results)
    prefix = Path(out_dir) / LOG_PREFIX[benchmark]
    return (
        save_results(log, f"{prefix}_EVAL.json"),
        save_results(summarize(log, benchmark), f"{prefix}_SUMMARY.json"),
    )


def is_openunlearning_log(data: Any) -> bool:
    """Whether a parsed JSON object is an open-unlearning EVAL log: a dict of metric dicts, each with an
    ``agg_value`` (this library's own results carry a ``settings`` dict instead)."""
    return (
        isinstance(data, Mapping)
        and bool(data)
        and "settings" not in data
        and all(isinstance(entry, Mapping) and "agg_value" in entry for entry in data.values())
    )


def read_openunlearning_log(path: str | os.PathLike) -> dict[str, Any]:
    """Read an open-unlearning EVAL log; a clear ValueError when the file is something else."""
    data = load_results(path)
    if not is_openunlearning_log(data):
        raise ValueError(
            f"{path} is not an open-unlearning evaluation log (a JSON object of metrics, each with 'agg_value')"
        )
    return data


def value_list(entry: Mapping[str, Any], field: str = "score") -> list[Any]:
    """The ``field`` of each record of a logged metric, in index order."""
    by_index = entry.get("value_by_index")
    if not isinstance(by_index, Mapping) or not by_index:
        raise ValueError("the logged metric has no value_by_index records")
    return [by_index[key][field] for key in sorted(by_index, key=int)]


@dataclass(frozen=True)
class RetainReference:
    """What a retain model's log gives the scoring of an unlearned model: its raw per-question forget
    truth ratios (forget quality) and its Min-K MIA AUC (PrivLeak). Either may be None when the log
    lacks it; ``forget_split`` is None when the log does not say (open-unlearning's does not)."""

    truth_ratios: list[float] | None
    mia_min_k_auc: float | None
    forget_split: str | None
    source_format: str  # "sga" or "open-unlearning"


def load_retain_reference(path: str | os.PathLike) -> RetainReference:
    """A retain reference from this library's results JSON (``save_results`` of ``evaluate_tofu`` /
    ``evaluate_muse``) or from an open-unlearning EVAL log; the format is detected from the content."""
    data = load_results(path)
    if is_openunlearning_log(data):
        ratios = data.get("forget_truth_ratio")
        auc = data.get("mia_min_k", {}).get("agg_value")
        return RetainReference(
            truth_ratios=[float(r) for r in value_list(ratios)] if ratios else None,
            mia_min_k_auc=None if auc is None else float(auc),
            forget_split=None,
            source_format="open-unlearning",
        )
    if not isinstance(data, Mapping) or not isinstance(data.get("settings"), Mapping):
        raise ValueError(
            f"{path} is neither this library's results JSON (with 'settings') nor an open-unlearning evaluation log"
        )
    ratios = data.get("forget_truth_ratios")
    auc = data.get("mia_min_k_auc")
    return RetainReference(
        truth_ratios=[float(r) for r in ratios] if ratios is not None else None,
        mia_min_k_auc=None if auc is None else float(auc),
        forget_split=data["settings"].get("forget_split"),
        source_format="sga",
    )
