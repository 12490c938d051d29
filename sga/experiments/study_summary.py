"""The summary of a study: per grid point, mean and standard deviation over seeds at the selection rule
(declared in the config before the run), at the final evaluation and at every evaluation step (the mean
trajectory); Markdown tables and JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sga.experiments.study_config import StudyConfig

TARGET_RUN = "target"
# (row key, header) of the summary columns.
SUMMARY_COLUMNS = (
    ("epoch", "epoch"),
    ("forget_quality", "forget quality"),
    ("model_utility", "model utility"),
    ("forget_rouge", "forget ROUGE-L"),
    ("forget_prob", "forget P"),
    ("forget_truth_ratio", "forget TR"),
    ("privleak", "privleak %"),
)
POINTS = ("selected", "final")
# (row key, header) of the trajectory tables: one table per metric, one column per evaluation step.
TRAJECTORY_COLUMNS = (
    ("model_utility", "model utility"),
    ("forget_quality", "forget quality"),
    ("forget_prob", "forget P"),
    ("forget_rouge", "forget ROUGE-L"),
)


def trajectories(rows: list[dict[str, Any]]) -> tuple[Optional[dict], dict[str, dict[int, list[dict]]]]:
    """The target's row and, per label and seed, the run's rows sorted by step (the target row first)."""
    target = next((row for row in rows if row["run"] == TARGET_RUN), None)
    runs: dict[str, dict[int, list[dict]]] = {}
    for row in rows:
        if row["run"] != TARGET_RUN:
            runs.setdefault(row["label"], {}).setdefault(row["seed"], []).append(row)
    for seeds in runs.values():
        for seed, trajectory in seeds.items():
            seeds[seed] = ([target] if target else []) + sorted(trajectory, key=lambda r: r["step"])
    return target, runs


def selected(trajectory: list[dict], target_utility: float, fraction: float) -> dict:
    """The selection rule: the last evaluation whose model utility is >= fraction * the target's (the target
    itself, the trajectory's first row, always qualifies)."""
    keep = [row for row in trajectory if row["model_utility"] >= fraction * target_utility]
    return keep[-1] if keep else trajectory[0]


def mean_std(values: list[Optional[float]]) -> dict[str, Optional[float]]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of the values that are not None."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(present)), "std": float(np.std(present, ddof=1)) if len(present) > 1 else 0.0}


def summarize(rows: list[dict[str, Any]], config: StudyConfig) -> dict[str, Any]:
    """Per label: the seeds whose runs are complete, and mean / std of every summary column at the
    selected and at the final evaluation."""
    target, runs = trajectories(rows)
    if target is None:
        return {"target": None, "settings": {}}
    last_step = config.eval_steps(config.data.forget_questions)[-1]
    fraction = config.selection.utility_fraction
    settings: dict[str, Any] = {}
    for label, seeds in runs.items():
        complete = {seed: t for seed, t in seeds.items() if t[-1]["step"] == last_step}
        points = {"selected": [selected(t, target["model_utility"], fraction) for t in complete.values()],
                  "final": [t[-1] for t in complete.values()]}
        by_step: dict[int, list[dict]] = {}
        for trajectory in complete.values():
            for row in trajectory:
                by_step.setdefault(row["step"], []).append(row)
        settings[label] = {
            "seeds": sorted(complete),
            "rate": mean_std([t[-1].get("rate") for t in complete.values()]),
            **{point: {key: mean_std([row.get(key) for row in chosen]) for key, _ in SUMMARY_COLUMNS} for point, chosen in points.items()},
            # the mean trajectory over the complete seeds: step -> metric -> mean / std (JSON keys: the steps)
            "trajectory": {str(step): {key: mean_std([row.get(key) for row in at_step]) for key, _ in TRAJECTORY_COLUMNS}
                           for step, at_step in sorted(by_step.items())},
        }
    return {
        "selection_rule": f"last evaluation with model utility >= {fraction:g} x the target's ({fraction * target['model_utility']:.4f})",
        "target": {key: target.get(key) for key, _ in SUMMARY_COLUMNS},
        "retain_model": target.get("retain_model"),
        "settings": settings,
    }


def format_mean_std(stat: dict[str, Optional[float]], key: str) -> str:
    """'mean ± std' of one metric at the precision its scale needs ('n/a' without values)."""
    if stat["mean"] is None:
        return "n/a"
    if key == "forget_quality":
        return f"{stat['mean']:.3g} ± {stat['std']:.2g}"
    if key == "privleak":
        return f"{stat['mean']:.1f} ± {stat['std']:.1f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def format_summary(summary: dict[str, Any]) -> str:
    """Markdown: the selection rule, the target and retain models, one table per point (selected, final) and
    one trajectory table per metric of TRAJECTORY_COLUMNS."""
    if summary["target"] is None:
        return "No results yet.\n"
    lines = [f"Selection rule (declared before the run): {summary['selection_rule']}.", ""]
    target = summary["target"]
    lines.append("Target (epoch 0): " + ", ".join(f"{title} {target[key]:.4g}" for key, title in SUMMARY_COLUMNS[1:] if target.get(key) is not None))
    if summary.get("retain_model"):
        lines.append("Retain model: " + ", ".join(f"{k} {v:.4g}" for k, v in summary["retain_model"].items()))
    for point, title in (("selected", "At the selection rule"), ("final", "At the final epoch")):
        header = ["setting", "seeds"] + [t for _, t in SUMMARY_COLUMNS]
        lines += ["", f"### {title} (mean ± std over seeds)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, s in summary["settings"].items():
            cells = [label, str(len(s["seeds"]))] + [format_mean_std(s[point][key], key) for key, _ in SUMMARY_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    steps = sorted({int(step) for s in summary["settings"].values() for step in s.get("trajectory", {})})
    for key, title in TRAJECTORY_COLUMNS:
        header = ["setting", "seeds"] + [f"step {step}" for step in steps]
        lines += ["", f"### Trajectory: {title} (mean ± std over seeds)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, s in summary["settings"].items():
            trajectory = s.get("trajectory", {})
            cells = [label, str(len(s["seeds"]))]
            cells += [format_mean_std(trajectory[str(step)][key], key) if str(step) in trajectory else "n/a" for step in steps]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], markdown: Path, json_path: Path) -> None:
    """Write the summary as Markdown and JSON (each through a temporary file and a rename)."""
    for path, text in ((markdown, format_summary(summary)), (json_path, json.dumps(summary, indent=2) + "\n")):
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
