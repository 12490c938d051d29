"""The summary of a study's attacks (``robustness.jsonl``): per attack, grid setting and point, mean and standard
deviation over seeds of each forget metric before and after the attack, of its change and of its durability score
(R for relearning, Q otherwise; ``sga.attacks.scores``); Markdown tables and JSON.

Points: ``final`` (the last step of each run) and ``selected`` (the model of the study's selection rule). A run
whose selected model is its final model or the untouched target has no rows of its own at ``selected``: its final
rows or the target's rows stand in, and ``sources`` counts which.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from sga.attacks.measure import FORGET_METRICS
from sga.experiments.robustness import selected_step
from sga.experiments.study_config import StudyConfig
from sga.experiments.study_summary import TARGET_RUN, mean_std

FIELDS = ("before", "after", "deltas", "scores")
# (metric, header) of the Markdown tables
TABLE_METRICS = (("forget_prob", "forget P"), ("forget_rouge", "ROUGE-L"), ("forget_quality", "forget quality"))


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean / std over rows of every field of FIELDS, per forget metric."""
    return {f: {key: mean_std([row[f].get(key) for row in rows]) for key in FORGET_METRICS} for f in FIELDS}


def resolved_rows(rows: list[dict], trajectory_rows: list[dict], run: str, point: str, config: StudyConfig,
              target_rows: dict[str, dict]) -> tuple[dict[str, dict], str]:
    """The rows (by attack) standing for ``run`` at ``point`` and their source: the point's own rows, the final
    model's (the selection rule picked the last step) or the target's (it picked step 0)."""
    if point == "selected":
        step = selected_step(trajectory_rows, run, config)
        if step == 0:
            return target_rows, TARGET_RUN
        if step == config.eval_steps(config.data.forget_questions)[-1]:
            point = "final"
    return {row["attack"]: row for row in rows if row["run"] == run and row["point"] == point}, point


def summarize_robustness(rows: list[dict[str, Any]], trajectory_rows: list[dict[str, Any]], config: StudyConfig) -> dict[str, Any]:
    """Per attack and point: the target's values and, per setting, the aggregates over its seeds (module docstring)."""
    target_rows = {row["attack"]: row for row in rows if row["run"] == TARGET_RUN}
    attacks = [a for a in config.robustness.attacks if any(row["attack"] == a for row in rows)]
    settings: dict[str, Any] = {}
    for label in config.robustness.settings:
        seed_of = {row["run"]: row["seed"] for row in trajectory_rows if row.get("label") == label}
        entry: dict[str, Any] = {}
        for point in config.robustness.points:
            chosen: dict[str, list[dict]] = {a: [] for a in attacks}
            sources: dict[str, int] = {}
            seeds = []
            for run in sorted(seed_of):
                found, source = resolved_rows(rows, trajectory_rows, run, point, config, target_rows)
                if not attacks or not all(a in found for a in attacks):
                    continue  # a run whose attacks are not all recorded yet
                sources[source] = sources.get(source, 0) + 1
                seeds.append(seed_of[run])
                for a in attacks:
                    chosen[a].append(found[a])
            seeds.sort()
            entry[point] = {"seeds": seeds, "sources": sources, "attacks": {a: _aggregate(chosen[a]) for a in attacks if chosen[a]}}
        settings[label] = entry
    return {
        "attacks": attacks,
        "points": list(config.robustness.points),
        "target": {a: {f: target_rows[a][f] for f in FIELDS} for a in attacks if a in target_rows},
        "retain": {a: {"before": target_rows[a]["retain_before"], "after": target_rows[a]["retain_after"]} for a in attacks if a in target_rows},
        "settings": settings,
    }


def _cell(stat: Optional[dict[str, Optional[float]]], digits: int = 3) -> str:
    if stat is None or stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _value(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _seeds_cell(entry: dict[str, Any], point: str) -> str:
    """How many seeds a row averages, and how many of them borrow the final model's or the target's rows."""
    borrowed = [f"{count} = {source}" for source, count in entry["sources"].items() if source != point]
    return f"{len(entry['seeds'])}" + (f" ({', '.join(borrowed)})" if borrowed else "")


def format_robustness(summary: dict[str, Any]) -> str:
    """Markdown: per attack, one table per point, a row per setting (and the target and retain models)."""
    lines = ["Durability scores: R for relearning (1: the forget metrics move as the retain model's do when it relearns),",
             "Q otherwise (1: unchanged). Mean ± std over seeds; before -> after of each metric. 'seeds' counts the runs",
             "whose attacks are all recorded; '(n = target)' / '(n = final)': n of them had the untouched target or their",
             "final model as the selected model, whose rows stand in.", ""]
    for attack in summary["attacks"]:
        score = "R" if attack.startswith("relearn_") else "Q"
        for point in summary["points"]:
            header = ["model", "seeds"] + [f"{title} before -> after ({score})" for _, title in TABLE_METRICS]
            lines += [f"### {attack}, {point} models", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            target = summary["target"].get(attack)
            if target:
                cells = [f"{_value(target['before'][k])} -> {_value(target['after'][k])} ({_value(target['scores'][k])})" for k, _ in TABLE_METRICS]
                lines.append("| target | - | " + " | ".join(cells) + " |")
            retain = summary["retain"].get(attack)
            if retain and retain["after"]:
                cells = [f"{_value(retain['before'][k])} -> {_value(retain['after'][k])}" for k, _ in TABLE_METRICS]
                lines.append("| retain model | - | " + " | ".join(cells) + " |")
            for label, entry in summary["settings"].items():
                at = entry[point]["attacks"].get(attack)
                if at is None:
                    continue
                cells = [f"{_cell(at['before'][k])} -> {_cell(at['after'][k])} ({_cell(at['scores'][k])})" for k, _ in TABLE_METRICS]
                lines.append(f"| {label} | {_seeds_cell(entry[point], point)} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def write_robustness_summary(summary: dict[str, Any], markdown: Path, json_path: Path) -> None:
    """The summary as Markdown and JSON (each through a temporary file and a rename)."""
    for path, text in ((markdown, format_robustness(summary)), (json_path, json.dumps(summary, indent=2) + "\n")):
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
