"""The robustness part of ``sga study``: the attacks of ``sga.attacks`` on the models of the study, recorded as they
come, resumable.

Which models: the retain model (every attack on it is the reference: relearning is scored against its relearning,
forget quality against its truth ratios), the target (for context: what each attack does to a model that forgot
nothing) and, for each run of a setting named in the config's ``robustness.settings``, the model at each point of
``robustness.points``: ``final`` (the last step) and ``selected`` (the step the study's selection rule picks from
the run's recorded trajectory), the latter only where it is neither the target (step 0, attacked already) nor the
final model. The runs' weights are not kept by the study, so a run is replayed from the target with its own
settings and seed (training is deterministic; the replay is not evaluated) and its model taken at those steps.

Files in the study folder (beside the trajectories, whose digest the robustness section does not enter):

- ``robustness.json``: the section and its digest; a folder holds the attacks of one section;
- ``robustness.jsonl``: one row per (model, point, attack), appended with an fsync as each attack ends (a torn
  last line is dropped on the next start): the forget metrics before and after, deltas and scores of
  ``sga.attacks.results.AttackResult``, the retain model's own metrics, the settings and versions;
- ``robustness/reference.json``: the retain model's measurements, before and after each attack (cached);
- ``robustness/logs/<model>/<point>/<standard|attack>/TOFU_EVAL.json`` and ``TOFU_SUMMARY.json``: every
  measurement in open-unlearning's log format (the measured questions, per question).
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sga.attacks.measure import Measurement, measurement_from_dict, measurement_to_dict
from sga.attacks.results import write_measurement_log
from sga.attacks.suite import AttackData, AttackRunner
from sga.benchmarks.tofu import load_tofu_split
from sga.config import ConfigError
from sga.experiments.study_config import RunSetting, StudyConfig
from sga.experiments.study_summary import TARGET_RUN, selected, trajectories
from sga.models import load_model

ROBUSTNESS_FILE = "robustness.json"
ROBUSTNESS_ROWS = "robustness.jsonl"
ROBUSTNESS_DIR = "robustness"
REFERENCE_FILE = "reference.json"
RETAIN_MODEL = "retain"
STANDARD_LOG = "standard"


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_robustness_folder(out: Path, config: StudyConfig) -> None:
    """ConfigError (one line) when ``out`` holds the attacks of another robustness section."""
    path = out / ROBUSTNESS_FILE
    recorded = json.loads(path.read_text(encoding="utf-8")).get("robustness_hash") if path.is_file() else None
    if config.robustness is not None and recorded not in (None, config.robustness_digest()):
        raise ConfigError(f"--out: {out} holds attacks of another robustness section; use a new --out folder to run this one")


def selected_step(rows: list[dict[str, Any]], run: str, config: StudyConfig) -> Optional[int]:
    """The step the selection rule picks in ``run``'s recorded trajectory (0: the target), or None until the
    trajectory is complete."""
    target, runs = trajectories(rows)
    trajectory = next((t for seeds in runs.values() for t in seeds.values() if t[-1]["run"] == run), None)
    if target is None or trajectory is None or trajectory[-1]["step"] != config.eval_steps(config.data.forget_questions)[-1]:
        return None
    return selected(trajectory, target["model_utility"], config.selection.utility_fraction)["step"]


def attack_points(rows: list[dict[str, Any]], run: str, config: StudyConfig) -> dict[str, int]:
    """{point: step} of the models of ``run`` that the robustness section attacks (module docstring): ``final`` and,
    where it is neither the target nor the final model, ``selected``; empty until the run's trajectory is complete."""
    step = selected_step(rows, run, config)
    if step is None:
        return {}
    last = config.eval_steps(config.data.forget_questions)[-1]
    points = {"final": last} | ({"selected": step} if step not in (0, last) else {})
    return {point: at for point, at in points.items() if point in config.robustness.points}


class Robustness:
    """The attacks of one study folder (module docstring). ``say`` reports progress; ``time`` records phase times."""

    def __init__(
        self, config: StudyConfig, out: Path, eval_dir: Path, retain_records: list[dict], tokenizer, rows, *,
        versions: dict[str, str], say: Callable[[str], None], time: Callable[[str, float], None],
    ) -> None:
        section = config.robustness
        self.config, self.out, self.say, self.time = config, out, say, time
        self.folder = out / ROBUSTNESS_DIR
        self.work = self.folder / "work"
        shutil.rmtree(self.work, ignore_errors=True)  # what a killed session left (relearning runs, quantized copies)
        forget = load_tofu_split(f"{config.data.forget_split}_perturbed", eval_dir)
        related = retain_records[: section.related_records]
        suite = section.suite(config.evaluation.max_new_tokens, config.evaluation.batch_size)
        self.runner = AttackRunner(suite, AttackData(forget, related, related), tokenizer, work_dir=self.work)
        self.rows = rows  # the row file (``sga.experiments.study.Results`` of ROBUSTNESS_ROWS: its append / torn-line rules)
        self.common = {"config_hash": config.digest(), "robustness_hash": config.robustness_digest(), "versions": versions}
        _write_json(out / ROBUSTNESS_FILE, {"robustness_hash": config.robustness_digest(), "config_hash": config.digest(),
                                            "robustness": config.robustness_dict()})

    def todo(self, run: str, point: str) -> list[str]:
        """The attacks not yet recorded for the model of ``run`` at ``point``."""
        done = {row["attack"] for row in self.rows.rows if row["run"] == run and row["point"] == point}
        return [name for name in self.runner.suite.attacks if name not in done]

    # ---------------------------------------------------------------- the retain model

    def reference(self, retain_path: Path) -> tuple[Measurement, dict[str, Measurement]]:
        """The retain model's measurements before and after every attack, computed once (``robustness/reference.json``)."""
        path = self.folder / REFERENCE_FILE
        cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if cached.get("robustness_hash") != self.config.robustness_digest():
            cached = {"robustness_hash": self.config.robustness_digest(), "attacks": {}}
        todo = [name for name in self.runner.suite.attacks if name not in cached["attacks"]]
        if "before" not in cached or todo:
            model, _ = load_model(retain_path, dtype=torch.float32)
            if "before" not in cached:
                cached["before"] = measurement_to_dict(self._measure_before(model, RETAIN_MODEL, "reference"))
                _write_json(path, cached)
            for name, after in self._timed(self.runner.attacked(model, model_dir=retain_path, skip=list(cached["attacks"]))):
                cached["attacks"][name] = measurement_to_dict(after)
                write_measurement_log(after, after.metrics(), self.folder / "logs" / RETAIN_MODEL / "reference" / name)
                _write_json(path, cached)
                self.say(f"retain model: {name} measured")
            del model
            gc.collect()
        self.retain_before = measurement_from_dict(cached["before"])
        self.retain_after = {name: measurement_from_dict(m) for name, m in cached["attacks"].items()}
        return self.retain_before, self.retain_after

    # ---------------------------------------------------------------- attacking a model

    def _measure_before(self, model, run: str, point: str) -> Measurement:
        start = time.monotonic()
        before = self.runner.measure(model)
        self.time("robustness: measure before", time.monotonic() - start)
        write_measurement_log(before, before.metrics(None if run == RETAIN_MODEL else self.retain_before.truth_ratios),
                              self.folder / "logs" / run / point / STANDARD_LOG)
        return before

    def _timed(self, attacked):
        """The (name, measurement) pairs of ``attacked`` with the seconds each took, recorded as a phase time."""
        start = time.monotonic()
        for name, after in attacked:
            self.time(f"robustness: {name}", time.monotonic() - start)
            yield name, after
            start = time.monotonic()

    def attack(
        self, model, run: str, point: str, step: int, setting: Optional[RunSetting], seed: Optional[int], *,
        model_dir: Optional[Path] = None,
    ) -> None:
        """Every attack not yet recorded on ``model`` (the model of ``run`` at ``point``, step ``step``), a row each."""
        todo = self.todo(run, point)
        if not todo:
            return
        before = self._measure_before(model, run, point)
        skip = [name for name in self.runner.suite.attacks if name not in todo]
        for name, after in self._timed(self.runner.attacked(model, model_dir=model_dir, skip=skip)):
            result = self.runner.score(name, before, after, self.retain_before, self.retain_after[name])
            write_measurement_log(after, result.after, self.folder / "logs" / run / point / name)
            self.rows.append({
                "run": run, "label": setting.label if setting else TARGET_RUN, "method": setting.method if setting else None,
                "seed": seed, "point": point, "step": step, **result.to_dict(), **self.common,
                "torch_threads": torch.get_num_threads(),
            })
            self.say(f"{run} ({point}, step {step}): {name}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in result.scores.items() if v is not None))
