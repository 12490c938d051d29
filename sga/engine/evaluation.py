"""Evaluation during training: a benchmark's metrics every ``eval_every`` optimizer steps, logged beside the
training metrics, and the best model kept under a criterion declared before the run starts.

Schedule. With ``evaluation.eval_every = N > 0`` the trainer evaluates the model after every N-th optimizer
step and after the last step and, with ``eval_at_start`` (default), the model before unlearning (step 0).
Each evaluation is one metrics.jsonl record, right after the record of its step (strict JSON like every
record)::

    {"event": "eval", "step": 4, "benchmark": "tofu", "forget_quality": 0.27, "model_utility": 0.41, ...,
     "best": true, "eval_s": 12.3}

The benchmark runs in inference mode on the unwrapped model (its train mode restored by the scoring code)
inside ``torch.random.fork_rng``, so a run trains exactly the same weights with or without evaluation.
``UnlearningTrainer(evaluator=...)`` replaces the benchmark by any ``(model, tokenizer, step) -> metrics``.

Criterion. ``best_metric`` names one metric of the benchmark (:data:`METRIC_GOALS` gives each its goal:
max, min, or closest to a target: 0 for privleak, 0.5 for an MIA AUC); ``utility_floor`` f adds a
utility constraint. The rule:

    an evaluation at step s >= 1 is eligible when its best_metric value v_s is a finite number and, with a
    floor, its utility U_s >= f * U_0 (U_0: the utility of the step-0 evaluation, the model before
    unlearning; tofu: model_utility, muse: knowmem_r); its score is v_s (max), -v_s (min) or
    -|v_s - target| (closest); the best is the eligible evaluation of highest score, the earliest on ties
    (a later one must score strictly higher).

``best_metric: forget_quality, utility_floor: 0.9`` keeps the model of highest forget quality among those
that kept 90% of the original model utility. Step 0 is the baseline, never the best.

The best model goes to ``output_dir/best/``: ``save_pretrained`` and the tokenizer as in ``final/``, with
``best.json`` (step, metric, value, score, every metric, the criterion) and ``manifest.json`` (size and
SHA-256 of each file), written in a temporary folder renamed into place once complete. A fresh run
deletes a previous run's ``best/``.

Resume. Every checkpoint stores the evaluation state (the scoring settings, U_0, the best so far); a
resumed run restores it, and adopts ``best/best.json`` when it names a step after the checkpoint (a best
found after the last checkpoint by a run that was killed: its model is in ``best/``). A resume with
another criterion or with settings that change the scores is refused, naming them.

Processes. Only the main process evaluates; the others wait for its metrics in a broadcast (the barrier),
so every process logs the same record, takes the same best decision and writes ``best/`` together (the
export is collective). An evaluation that fails on the main process raises on every process instead of
leaving them waiting. Waiting processes give up after the process group's timeout (torch's
``default_pg_timeout``, 30 minutes): for longer evaluations raise it (accelerate's
``InitProcessGroupKwargs``). Sharded models (FSDP, DeepSpeed) are refused: the main process alone
cannot run them.
"""
from __future__ import annotations

import functools
import json
import math
import numbers
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from sga.benchmarks.mia import METRIC_NAMES
from sga.benchmarks.muse import evaluate_muse
from sga.benchmarks.muse import required_files as muse_required_files
from sga.benchmarks.openunlearning_log import load_retain_reference
from sga.benchmarks.tofu import evaluate_tofu, read_json_records
from sga.benchmarks.tofu import required_files as tofu_required_files
from sga.config import ConfigError, UnlearnConfig
from sga.engine.run_folder import BEST_DIR

BEST_FILE = "best.json"
# the "event" of an evaluation record in metrics.jsonl
EVAL_EVENT = "eval"
# The utility that ``utility_floor`` constrains, per benchmark.
UTILITY_METRIC = {"tofu": "model_utility", "muse": "knowmem_r"}

Evaluator = Callable[[Any, Any, int], Mapping[str, Any]]
"""``(model, tokenizer, step) -> {metric: value}``: one evaluation (non-numeric values are dropped)."""


class TrainerCallback:
    """Hooks into ``UnlearningTrainer.train()``: subclass and override the ones you need. Every hook runs on
    every process with the same arguments (the records are all-reduced or broadcast)."""

    def on_step_end(self, trainer, step: int, record: dict[str, Any]) -> None:
        """After optimizer step ``step`` (1-based) is logged; ``record`` is its metrics.jsonl record."""

    def on_evaluate(self, trainer, step: int, record: dict[str, Any]) -> None:
        """After the evaluation of ``step`` (0: before training) is logged; ``record`` holds its metrics
        and, under a criterion, ``best`` (whether it became the best model)."""


@dataclass(frozen=True)
class Goal:
    """What makes a metric better: "max", "min" or "closest" (to ``target``)."""

    kind: str
    target: float = 0.0

    def score(self, value: float) -> float:
        """Higher is better: v (max), -v (min), -|v - target| (closest)."""
        if self.kind == "max":
            return value
        if self.kind == "min":
            return -value
        return -abs(value - self.target)

    def describe(self) -> str:
        return self.kind if self.kind != "closest" else f"closest to {self.target:g}"


MAX, MIN = Goal("max"), Goal("min")


@functools.cache
def metric_goals(benchmark: str) -> dict[str, Goal]:
    """The metrics a criterion may name for ``benchmark`` ("tofu" or "muse"), each with its goal."""

    shared = {
        "exact_memorization": MIN, "extraction_strength": MIN, "privleak": Goal("closest", 0.0),
        **{f"{name}_auc": Goal("closest", 0.5) for name in METRIC_NAMES.values()},
    }
    if benchmark == "tofu":
        kept = {f"{split}_{stat}": MAX for split in ("retain", "real_authors", "world_facts") for stat in ("prob", "rouge", "truth_ratio")}
        # the forget truth ratio is reported as mean(min(R, 1/R)): 1 when the answer is no likelier than its perturbations
        forget = {"forget_quality": MAX, "forget_prob": MIN, "forget_rouge": MIN, "forget_truth_ratio": MAX}
        return {**forget, "model_utility": MAX, **kept, **shared}
    return {"verbmem_f": MIN, "knowmem_f": MIN, "knowmem_r": MAX, **shared}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class BestCriterion:
    """The declared rule for the best evaluation (module docstring)."""

    metric: str
    goal: Goal
    utility_metric: str
    utility_floor: Optional[float] = None

    def score(self, metrics: Mapping[str, Any], baseline_utility: Optional[float]) -> Optional[float]:
        """The score of an evaluation at a step >= 1, or None when it is not eligible."""
        for name in (self.metric,) + ((self.utility_metric,) if self.utility_floor is not None else ()):
            if name not in metrics:
                raise ValueError(f"the evaluation returned no {name!r}, which the best-model criterion needs; it returned {sorted(metrics)}")
        value = metrics[self.metric]
        if not _finite(value):
            return None
        if self.utility_floor is not None:
            utility = metrics[self.utility_metric]
            if not (_finite(baseline_utility) and _finite(utility) and utility >= self.utility_floor * baseline_utility):
                return None
        return self.goal.score(float(value))

    def describe(self) -> str:
        text = f"{self.metric} ({self.goal.describe()})"
        if self.utility_floor is not None:
            text += f" among evaluations with {self.utility_metric} >= {self.utility_floor:g} x step 0's"
        return text


def best_criterion(config: UnlearnConfig) -> Optional[BestCriterion]:
    """The criterion of ``config.evaluation`` (None: no best model is kept)."""
    e = config.evaluation
    if e.best_metric is None:
        return None
    return BestCriterion(e.best_metric, metric_goals(e.benchmark)[e.best_metric], UTILITY_METRIC[e.benchmark], e.utility_floor)


# -------------------------------------------------------------------------------------- settings


def evaluation_data_dir(config: UnlearnConfig) -> Optional[str]:
    """evaluation.data_dir, else the training data's TOFU folder for a tofu evaluation of tofu data, else
    None (the benchmark's hub dataset)."""
    e = config.evaluation
    if e.data_dir is not None:
        return e.data_dir
    if e.benchmark == "tofu" and config.data.dataset == "tofu":
        return config.data.data_dir
    return None


def evaluation_tofu_split(config: UnlearnConfig) -> str:
    return config.evaluation.tofu_split or config.data.tofu_split


def scoring_settings(config: UnlearnConfig) -> dict[str, Any]:
    """The settings that change an evaluation's scores or the best decision: a resumed run must share them
    with the run whose best it continues (eval_every, data_dir and batch_size may change)."""
    e = config.evaluation
    return {
        "benchmark": e.benchmark, "tofu_split": evaluation_tofu_split(config) if e.benchmark == "tofu" else None,
        "max_samples": e.max_samples, "max_new_tokens": e.max_new_tokens, "mia": e.mia, "retain_reference": e.retain_reference,
        "chat_template": config.data.chat_template, "eval_at_start": e.eval_at_start, "best_metric": e.best_metric,
        "utility_floor": e.utility_floor,
    }


def _required_files(config: UnlearnConfig) -> list[str]:
    """The files of the benchmark folder that an evaluation reads."""
    e = config.evaluation
    if e.benchmark == "tofu":
        return tofu_required_files(evaluation_tofu_split(config), holdout=e.mia)
    return muse_required_files(privleak=e.mia)


def _check_reference(config: UnlearnConfig, data_dir: Optional[str]):
    """The retain reference of ``evaluation.retain_reference`` (or None), checked against the evaluation."""

    e = config.evaluation
    if e.retain_reference is None:
        return None
    try:
        reference = load_retain_reference(e.retain_reference)
    except ValueError as err:
        raise ConfigError(f"evaluation.retain_reference: {err}") from None
    if e.benchmark == "tofu":
        split = evaluation_tofu_split(config)
        if reference.truth_ratios is None:
            raise ConfigError(f"evaluation.retain_reference: {e.retain_reference} holds no forget truth ratios (not a TOFU evaluation log)")
        if reference.forget_split not in (None, split):
            raise ConfigError(f"evaluation.retain_reference: {e.retain_reference} is of {reference.forget_split}, the evaluation of {split}")
        if data_dir is not None:
            questions = len(read_json_records(Path(data_dir) / f"{split}_perturbed.json")[: e.max_samples])
            if questions != len(reference.truth_ratios):
                raise ConfigError(
                    f"evaluation.retain_reference: {len(reference.truth_ratios)} truth ratios for {questions} forget questions: "
                    "evaluate the retain model with the same split and max_samples"
                )
    return reference


def check_evaluation_config(config: UnlearnConfig) -> None:
    """The evaluation section against the rest of the config, before any work: the criterion names a known
    metric that this evaluation computes, its reference is there, the benchmark's files exist."""
    e = config.evaluation
    if not e.eval_every:
        if e.best_metric is not None or e.utility_floor is not None:
            raise ConfigError("evaluation.best_metric and utility_floor need evaluation.eval_every > 0 (--eval-every N)")
        return
    goals = metric_goals(e.benchmark)
    if e.best_metric is not None and e.best_metric not in goals:
        raise ConfigError(f"evaluation.best_metric: {e.best_metric!r} is not a {e.benchmark} metric; choose from {', '.join(goals)}")
    if e.utility_floor is not None:
        if e.best_metric is None:
            raise ConfigError("evaluation.utility_floor constrains the best model: give evaluation.best_metric too (--best-metric)")
        if not 0.0 < e.utility_floor <= 1.0:
            raise ConfigError(f"evaluation.utility_floor is a fraction of step 0's {UTILITY_METRIC[e.benchmark]} and must be in (0, 1], got {e.utility_floor}")
        if not e.eval_at_start:
            raise ConfigError("evaluation.utility_floor is relative to the step-0 evaluation: turn evaluation.eval_at_start back on")
    data_dir = evaluation_data_dir(config)
    if data_dir is not None:
        missing = [name for name in _required_files(config) if not (Path(data_dir) / name).is_file()]
        if missing:
            raise ConfigError(f"evaluation: the {e.benchmark} folder {data_dir} lacks {', '.join(missing)} (--eval-data-dir)")
    reference = _check_reference(config, data_dir)
    metric = e.best_metric
    if metric == "forget_quality" and reference is None:
        raise ConfigError("evaluation.best_metric=forget_quality needs a retain model's TOFU log: --eval-retain-reference FILE (sga eval --output)")
    if metric is not None and (metric == "privleak" or metric.startswith("mia_")) and not e.mia:
        raise ConfigError(f"evaluation.best_metric={metric} is a membership-inference metric: turn on evaluation.mia (--eval-mia)")
    if metric == "privleak" and (reference is None or reference.mia_min_k_auc is None):
        raise ConfigError("evaluation.best_metric=privleak needs a retain model's log with its Min-K AUC (mia_min_k): --eval-retain-reference FILE")


# ------------------------------------------------------------------------------------ evaluators


def scalar_metrics(results: Mapping[str, Any]) -> dict[str, Optional[float]]:
    """The numeric results of an evaluation as floats (None kept); lists, dicts, strings and booleans dropped."""
    return {
        key: None if value is None else float(value)
        for key, value in results.items()
        if value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool))
    }


def benchmark_evaluator(config: UnlearnConfig) -> Evaluator:
    """The evaluator of ``config.evaluation``'s benchmark, with the chat-template choice of the training data."""
    e = config.evaluation
    data_dir = evaluation_data_dir(config)
    chat = config.data.use_chat_template
    if e.benchmark == "tofu":
        split = evaluation_tofu_split(config)

        def tofu(model, tokenizer, step: int) -> Mapping[str, Any]:
            return evaluate_tofu(
                model, tokenizer, data_dir, split, max_samples=e.max_samples, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                use_chat_template=chat, retain_reference=e.retain_reference, membership_inference=e.mia,
            )

        return tofu
    reference = _check_reference(config, data_dir)
    retain_auc = reference.mia_min_k_auc if reference is not None and e.mia else None
    muse_metrics = ("verbmem_f", "knowmem_f", "knowmem_r", "memorization") + (("privleak",) if e.mia else ())

    def muse(model, tokenizer, step: int) -> Mapping[str, Any]:
        return evaluate_muse(
            model, tokenizer, data_dir, metrics_to_run=muse_metrics, retain_auc=retain_auc, max_samples=e.max_samples,
            batch_size=e.batch_size, verbmem_max_new_tokens=e.max_new_tokens, use_chat_template=chat,
        )

    return muse


# ------------------------------------------------------------------------------------ the state


def clear_best(output_dir: Path) -> None:
    """Delete a previous run's best model (a fresh run starts without one)."""
    for name in (BEST_DIR, f".tmp-{BEST_DIR}"):
        shutil.rmtree(output_dir / name, ignore_errors=True)


def read_best(output_dir: Path) -> Optional[dict[str, Any]]:
    """``best/best.json`` of a run, or None."""
    path = output_dir / BEST_DIR / BEST_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


class TrainingEvaluation:
    """The evaluation part of a run: when to evaluate, the evaluation itself across processes, the criterion
    and the best so far. The trainer calls it; its state travels in every checkpoint."""

    def __init__(self, config: UnlearnConfig, accelerator, evaluator: Optional[Evaluator] = None) -> None:
        from accelerate.utils import DistributedType

        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError("evaluation during training runs the model on the main process alone: use DDP or one process, not FSDP / DeepSpeed")
        self.accelerator = accelerator
        self.settings = config.evaluation
        self.evaluator = evaluator or benchmark_evaluator(config)
        self.criterion = best_criterion(config)
        self.scoring = {**scoring_settings(config), "evaluator": "benchmark" if evaluator is None else "custom"}
        self.baseline_utility: Optional[float] = None
        self.best: Optional[dict[str, Any]] = None  # {"step", "score", ...}: best.json
        self.candidates: list[tuple[Any, Any]] = []  # (metric, utility) of the evaluations after step 0, for the log

    def due(self, step: int, total_steps: int) -> bool:
        """Evaluate after step ``step``: every eval_every steps and after the last one."""
        return step % self.settings.eval_every == 0 or step == total_steps

    # ---------------------------------------------------------------- one evaluation

    def evaluate(self, model, tokenizer, step: int) -> dict[str, Optional[float]]:
        """The metrics of ``model`` at ``step``, computed on the main process and broadcast (call on every
        process). A failure on the main process raises on every process."""
        import torch
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        outcome: list[Any] = [None, None]  # [metrics, error]
        failure: Optional[BaseException] = None
        if acc.is_main_process:
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            try:
                with torch.random.fork_rng(devices=devices):  # the training RNG streams are left as they were
                    outcome[0] = scalar_metrics(self.evaluator(model, tokenizer, step))
            except BaseException as err:  # a second Ctrl-C too: the other processes must not wait for ever
                failure, outcome[1] = err, f"{type(err).__name__}: {err}"
        if acc.num_processes > 1:
            broadcast_object_list(outcome)
        if failure is not None:
            raise failure
        if outcome[1] is not None:
            raise RuntimeError(f"the evaluation at step {step} failed on the main process ({outcome[1]})")
        return outcome[0]

    def observe(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """Apply the criterion to the evaluation of ``step``; True when it is the new best. An evaluation of
        the adopted best's own step (a replay after a resume) is the best again."""
        if step == 0:
            self.baseline_utility = metrics.get(UTILITY_METRIC[self.settings.benchmark])
            return False
        if self.criterion is None:
            return False
        self.candidates.append((metrics.get(self.criterion.metric), metrics.get(self.criterion.utility_metric)))
        score = self.criterion.score(metrics, self.baseline_utility)
        if score is None:
            return False
        if self.best is not None and score <= self.best["score"] and step != self.best["step"]:
            return False
        self.best = {
            "step": step, "metric": self.criterion.metric, "value": metrics[self.criterion.metric], "score": score,
            "criterion": self.criterion.describe(), "baseline_utility": self.baseline_utility,
            "metrics": {k: v if v is None or math.isfinite(v) else json.dumps(v) for k, v in metrics.items()},  # strict JSON
            "settings": self.scoring,
        }
        return True

    def no_best_reason(self) -> str:
        """Why no evaluation became the best under the criterion (for a run whose ``best`` is None)."""
        c = self.criterion
        if not self.candidates:
            return f"no evaluation after step 0 ran (criterion: {c.describe()})"
        finite = [(v, u) for v, u in self.candidates if _finite(v)]
        if not finite:
            return f"{c.metric} was not a finite number at any of the {len(self.candidates)} evaluations after step 0"
        ratios = [u / self.baseline_utility for _, u in finite if _finite(u) and _finite(self.baseline_utility) and self.baseline_utility]
        best_ratio = f"; the highest was {max(ratios):.3g}x" if ratios else ""
        return (f"none of the {len(self.candidates)} evaluations after step 0 kept {c.utility_metric} >= "
                f"{c.utility_floor:g} x step 0's ({self.baseline_utility}){best_ratio}")

    def record(self, step: int, metrics: Mapping[str, Any], is_best: bool, seconds: float) -> dict[str, Any]:
        """The metrics.jsonl record of an evaluation."""
        identity = {"event": EVAL_EVENT, "step": step, "benchmark": self.settings.benchmark}
        record = {**identity, **metrics, **identity}  # identity first, and never replaced by a metric's name
        if self.criterion is not None:
            record["best"] = is_best
        record["eval_s"] = round(seconds, 3)
        return record

    # ---------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores (JSON)."""
        return {"scoring": self.scoring, "baseline_utility": self.baseline_utility, "best": self.best}

    def restore(self, saved: Optional[dict[str, Any]], step: int, output_dir: Path) -> None:
        """Continue from a checkpoint of ``step`` (module docstring: Resume)."""
        if saved is None:
            if self.settings.utility_floor is not None:
                raise ConfigError(
                    "the checkpoint was written without evaluation, so there is no step-0 utility for evaluation.utility_floor: "
                    "drop utility_floor or start a fresh run"
                )
            saved = {"scoring": self.scoring, "baseline_utility": None, "best": None}
        changed = [f"{k}: {saved['scoring'].get(k)!r} -> {v!r}" for k, v in self.scoring.items() if saved["scoring"].get(k) != v]
        if changed:
            raise ConfigError(
                f"the checkpoint's evaluations were scored with other settings ({'; '.join(changed)}): resume with those, "
                "or start a fresh run with --overwrite or another --output-dir"
            )
        self.baseline_utility, self.best = saved["baseline_utility"], saved["best"]
        on_disk = read_best(output_dir)
        if on_disk is not None and on_disk.get("step", 0) > step and on_disk.get("settings") == self.scoring:
            self.best = on_disk  # found after the checkpoint by a run that was killed; best/ holds its model
