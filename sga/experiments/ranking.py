"""Rank the grid settings of studies that share one protocol (e.g. the default study and its grid extension) on forget
quality, model utility, privleak and durability, and place each SGA setting among the baselines.

Per setting, over its complete seeds, at a point (``final``: the last step; ``selected``: the model of the selection
rule, as in ``sga.experiments.study_summary``): the mean and standard deviation of

- forget quality (higher is better), model utility (higher is better), privleak (closer to 0 is better: |mean|);
- durability: per seed, the mean of the durability scores (R for relearning, Q for quantization and probes;
  ``sga.attacks.scores``) of forget P and ROUGE-L over the attacks every ranked setting has rows for (at ``selected``,
  a run whose rule picked the final model or the target stands in with those rows, as in
  ``sga.experiments.robustness_summary``). Higher is more durable; settings without attacks have none.

Ranks are 1 for the best; an SGA setting's rank is its place among the baselines (every setting whose method is not
an SGA reading) and itself. Studies are ranked together only when their protocols (every config section but the
grid and the robustness section) and their target models' evaluations are the same: the target's truth ratios within
a relative 1e-3 (``TARGET_TOLERANCE``), since one model's float32 evaluation moves by ~1e-4 between CPUs and library
versions, while a different target model moves them by far more.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sga.config import ConfigError
from sga.experiments.robustness import ROBUSTNESS_FILE, ROBUSTNESS_ROWS
from sga.experiments.robustness_summary import resolved_rows
from sga.experiments.study import RESULTS_FILE, STUDY_FILE, read_results
from sga.experiments.study_config import StudyConfig, config_from_dict
from sga.experiments.study_summary import TARGET_RUN, format_mean_std, mean_std, selected, trajectories

SGA_METHODS = ("sga", "sga_gls", "sga_token")
DURABILITY_METRICS = ("forget_prob", "forget_rouge")
# (key, header, better): "high" ranks the largest mean first, "zero" the smallest |mean|
RANKED = (
    ("forget_quality", "forget quality", "high"),
    ("model_utility", "model utility", "high"),
    ("privleak", "privleak %", "zero"),
    ("durability", "durability", "high"),
)
POINTS = ("final", "selected")
TARGET_TOLERANCE = 1e-3  # relative: studies whose target's truth ratios differ by more evaluated different models


@dataclass
class StudyRecords:
    """A study folder's config (with its robustness section, if any) and its recorded rows."""

    folder: Path
    config: StudyConfig
    rows: list[dict[str, Any]]
    attacks: list[dict[str, Any]]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return read_results(path)[0] if path.is_file() else []


def load_study(folder: Path) -> StudyRecords:
    """The records of study folder ``folder`` (read only); ConfigError (one line) when it holds no study."""
    study = folder / STUDY_FILE
    if not study.is_file() or not (folder / RESULTS_FILE).is_file():
        raise ConfigError(f"--rank: {folder} holds no study results ({STUDY_FILE} and {RESULTS_FILE})")
    data = json.loads(study.read_text(encoding="utf-8"))["config"]
    robustness = folder / ROBUSTNESS_FILE
    if robustness.is_file():
        data = {**data, "robustness": json.loads(robustness.read_text(encoding="utf-8"))["robustness"]}
    return StudyRecords(folder, config_from_dict(data), _read_jsonl(folder / RESULTS_FILE), _read_jsonl(folder / ROBUSTNESS_ROWS))


def _protocol(config: StudyConfig) -> dict[str, Any]:
    return {key: value for key, value in config.to_dict().items() if key not in ("grid", "seeds")}


def _same_evaluation(ours: list[float], theirs: list[float]) -> bool:
    """Whether two evaluations of the target agree: |a - b| <= TARGET_TOLERANCE * |b| per truth ratio."""
    return len(ours) == len(theirs) and bool(np.allclose(ours, theirs, rtol=TARGET_TOLERANCE, atol=0.0))


def check_same_protocol(studies: list[StudyRecords]) -> None:
    """ConfigError (one line) unless the studies share the protocol and the target's evaluation."""
    first = studies[0]
    target = next((r for r in first.rows if r["run"] == TARGET_RUN), None)
    for other in studies[1:]:
        if _protocol(other.config) != _protocol(first.config):
            raise ConfigError(f"--rank: {other.folder} and {first.folder} ran different protocols; only studies of one protocol rank together")
        theirs = next((r for r in other.rows if r["run"] == TARGET_RUN), None)
        if target is None or theirs is None or not _same_evaluation(theirs["forget_truth_ratios"], target["forget_truth_ratios"]):
            raise ConfigError(f"--rank: {other.folder} and {first.folder} evaluated different target models")


def _durability(rows: dict[str, dict], attacks: list[str]) -> Optional[float]:
    """The mean of the durability scores of DURABILITY_METRICS over ``attacks`` in one run's rows (by attack)."""
    if not attacks or not all(a in rows for a in attacks):
        return None
    scores = [rows[a]["scores"][m] for a in attacks for m in DURABILITY_METRICS]
    return None if any(s is None for s in scores) else float(np.mean(scores))


def _setting_points(study: StudyRecords, label: str, attacks: list[str]) -> dict[str, dict[str, list]]:
    """Per point, the per-seed values of every RANKED key of one setting's complete runs."""
    config = study.config
    target, runs = trajectories(study.rows)
    last = config.eval_steps(config.data.forget_questions)[-1]
    target_rows = {row["attack"]: row for row in study.attacks if row["run"] == TARGET_RUN}
    values: dict[str, dict[str, list]] = {point: {key: [] for key, _, _ in RANKED} for point in POINTS}
    for _seed, trajectory in sorted(runs.get(label, {}).items()):
        if trajectory[-1]["step"] != last:
            continue
        run = trajectory[-1]["run"]
        chosen = {"final": trajectory[-1], "selected": selected(trajectory, target["model_utility"], config.selection.utility_fraction)}
        for point, row in chosen.items():
            for key, _, _ in RANKED[:3]:
                values[point][key].append(row.get(key))
            attacked = resolved_rows(study.attacks, study.rows, run, point, config, target_rows) if config.robustness else ({}, None)
            values[point]["durability"].append(_durability(attacked[0], attacks))
    return values


def rank_studies(studies: list[StudyRecords]) -> dict[str, Any]:
    """Per point: each setting's mean / std of the RANKED keys, its rank among all settings, and each SGA setting's
    rank among the baselines (module docstring)."""
    check_same_protocol(studies)
    attacked = [set(row["attack"] for row in s.attacks) for s in studies if s.attacks]
    attacks = sorted(set.intersection(*attacked)) if attacked else []
    settings: dict[str, dict[str, Any]] = {}
    methods: dict[str, str] = {}
    for study in studies:
        for setting in study.config.settings():
            values = _setting_points(study, setting.label, attacks)
            settings[setting.label] = {point: {key: mean_std(v) for key, v in values[point].items()} for point in POINTS}
            for point in POINTS:  # a partial robustness run attacks fewer seeds than the trajectories have
                settings[setting.label][point]["durability"]["seeds"] = sum(v is not None for v in values[point]["durability"])
            settings[setting.label]["seeds"] = len(values["final"]["model_utility"])
            methods[setting.label] = setting.method["name"]
    baselines = [label for label, method in methods.items() if method not in SGA_METHODS]
    ranking: dict[str, Any] = {}
    for point in POINTS:
        overall = {key: _ranks({label: settings[label][point][key]["mean"] for label in settings}, better) for key, _, better in RANKED}
        among = {
            label: {key: _ranks({other: settings[other][point][key]["mean"] for other in [*baselines, label]}, better).get(label)
                    for key, _, better in RANKED}
            for label in settings if methods[label] in SGA_METHODS
        }
        ranking[point] = {"overall": overall, "sga_among_baselines": among}
    return {"studies": [str(s.folder) for s in studies], "durability_attacks": attacks, "baselines": baselines,
            "settings": settings, "ranks": ranking}


def _ranks(means: dict[str, Optional[float]], better: str) -> dict[str, int]:
    """1-based ranks of the labels with a mean (best first: largest, or smallest |mean| for "zero"); ties share a rank."""
    present = {label: (-m if better == "high" else abs(m)) for label, m in means.items() if m is not None}
    order = sorted(present.values())
    return {label: order.index(value) + 1 for label, value in present.items()}


def format_ranking(ranking: dict[str, Any]) -> str:
    """Markdown: per point, every setting's values with its overall rank, and each SGA setting's rank among the
    baselines."""
    lines = [f"Studies: {', '.join(ranking['studies'])}. Durability: the mean R / Q of forget P and ROUGE-L over "
             f"{', '.join(ranking['durability_attacks']) or 'no attacks'}. Baselines: {', '.join(ranking['baselines'])}.", ""]
    for point in POINTS:
        overall = ranking["ranks"][point]["overall"]
        header = ["setting", "seeds"] + [f"{title} (rank)" for _, title, _ in RANKED]
        lines += [f"### {point} models (mean ± std over seeds; rank 1 = best of all settings)", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        order = sorted(ranking["settings"], key=lambda label: overall["durability"].get(label, 10**6))
        for label in order:
            entry = ranking["settings"][label]
            cells = [f"{format_mean_std(entry[point][key], key)} ({overall[key].get(label, '-')})" for key, _, _ in RANKED]
            attacked = entry[point]["durability"]["seeds"]
            if 0 < attacked < entry["seeds"]:
                cells[-1] += f" [{attacked} of {entry['seeds']} seeds]"
            lines.append(f"| {label} | {entry['seeds']} | " + " | ".join(cells) + " |")
        among = ranking["ranks"][point]["sga_among_baselines"]
        total = len(ranking["baselines"]) + 1
        header = ["SGA setting"] + [f"{title}: rank of {total}" for _, title, _ in RANKED]
        lines += ["", f"SGA settings among the {len(ranking['baselines'])} baselines ({point} models):", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, ranks in among.items():
            lines.append(f"| {label} | " + " | ".join(str(ranks[key]) if ranks[key] is not None else "n/a" for key, _, _ in RANKED) + " |")
        lines.append("")
    return "\n".join(lines)


def write_ranking(ranking: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """ranking.md and ranking.json in ``out`` (each through a temporary file and a rename)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "ranking.md", out / "ranking.json")
    for path, text in zip(paths, (format_ranking(ranking), json.dumps(ranking, indent=2) + "\n")):
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return paths
