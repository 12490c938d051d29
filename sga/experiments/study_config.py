"""The configuration of ``sga study`` (a YAML file; the default protocol ships as
``sga/experiments/configs/study_default.yaml``, the tiny test version as ``sga/experiments/configs/study_quick.yaml``).

Layout of the file (every key is a field of the dataclass of its section; unknown keys are errors)::

    model: smollm2                   # smollm2 | tiny | a local Hugging Face model folder
    data: {...}                      # DataSection
    finetune: {...}                  # FinetuneSection: the target and the retain model
    unlearn: {...}                   # UnlearnSection: every run of the grid
    evaluation: {...}                # EvalSection
    selection: {utility_fraction: 0.9}
    seeds: [0, 1, 2]
    grid: [{method: ga}, {method: sga, num_classes: [2, 3], rate: [0.2, 0.5]}, ...]
    robustness: {...}                # RobustnessSection (optional): attacks on the runs' models

A grid entry holds ``method`` and any other ``sga.config.MethodConfig`` field; a list value is a
dimension of the grid (the entry expands to the product of its lists). ``rate`` also takes
``estimate`` (r* of ``sga.methods.rate`` at the target model, once per K) or ``adaptive`` (r* re-estimated every
``adaptive_rate_every`` steps during the run). ``validate`` raises ``ConfigError`` with one line naming
the key, the value and the fix, before any model is loaded.

The ``robustness`` section has a digest of its own (:meth:`StudyConfig.robustness_digest`); the study's digest
covers everything else, so adding or changing the section keeps a folder's trajectories valid.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sga.attacks.relearn import RelearnSettings
from sga.attacks.suite import ATTACKS, AttackSuite
from sga.config import ConfigError, MethodConfig, read_yaml
from sga.methods import METHODS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "study_default.yaml"
QUICK_CONFIG = CONFIG_DIR / "study_quick.yaml"
BASELINES_CONFIG = CONFIG_DIR / "study_baselines.yaml"  # the default protocol with open-unlearning's methods
MODEL_CHOICES = ("smollm2", "tiny")
RATE_ESTIMATE = "estimate"
RATE_ADAPTIVE = "adaptive"
# Methods whose rate the estimator can set (sga.methods.rate readings).
RATE_METHODS = ("sga", "sga_gls")


@dataclass
class DataSection:
    """Which TOFU records are trained on and evaluated."""

    forget_split: str = "forget01"  # forget01 | forget05 | forget10
    forget_questions: int = 40  # the first N records of <forget_split>_perturbed: trained on and evaluated
    retain_records: int = 80  # the first N records of retain_perturbed: fine-tuned on (target and retain model)
    eval_questions: int = 20  # questions of each model-utility set: retain (the first trained-on), real authors, world facts
    holdout_split: str = "holdout01"  # non-member QA for the Min-K membership test (never trained on)
    holdout_questions: int = 40
    synthetic_authors: int = 0  # > 0: generate this many fictitious authors instead of reading --data-dir
    max_length: int = 256


@dataclass
class FinetuneSection:
    """Fine-tuning (sft) of the target model (forget + retain records) and the retain model (retain only)."""

    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 8
    seed: int = 0


@dataclass
class UnlearnSection:
    """Optimization shared by every run of the grid (the same for every method)."""

    epochs: int = 5
    lr: float = 3e-5
    batch_size: int = 4
    evals_per_epoch: int = 1  # evaluations per epoch (the trajectory's resolution)
    rate_batches: int = 4  # batches per r* estimate (rate: estimate / adaptive)


@dataclass
class EvalSection:
    """Evaluation settings (TOFU metrics and the Min-K membership test)."""

    max_new_tokens: int = 32  # greedy generation budget for ROUGE-L
    batch_size: int = 16
    min_k: float = 0.4  # Min-K% Prob's k


@dataclass
class SelectionSection:
    """The selection rule, fixed before the run: per run, the last evaluation (the target itself, epoch 0,
    included) whose model utility is at least ``utility_fraction`` times the target's."""

    utility_fraction: float = 0.9


ROBUSTNESS_POINTS = ("final", "selected")


@dataclass
class RobustnessSection:
    """The attacks of ``sga.attacks`` on the runs of the grid settings labelled in ``settings``: every attack of
    ``attacks`` on each run's model at each point of ``points`` (``final``: the last step; ``selected``: the model
    the selection rule picks, where that is neither the untouched target nor the final model), on the target and
    on the retain model (the reference of relearning). Relearning: ``relearn_epochs`` at ``relearn_lr``, effective
    batch ``relearn_batch_size``, seed ``relearn_seed``; ``related_records``: the first N records of the study's
    retain set, relearned by relearn_related and paired with the forget questions by probe_retain_context.
    ``quantize_with``: load (bitsandbytes' layers) or weights (the weights' rounding alone)."""

    settings: list[str] = field(default_factory=list)
    points: list[str] = field(default_factory=lambda: list(ROBUSTNESS_POINTS))
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    relearn_epochs: int = 1
    relearn_lr: float = 2e-5
    relearn_batch_size: int = 32
    relearn_seed: int = 0
    related_records: int = 20
    quantize_with: str = "load"

    def suite(self, max_new_tokens: int, batch_size: int) -> AttackSuite:
        """The attack suite of this section, measuring with the study's generation budget and batch size."""
        relearn = RelearnSettings(epochs=self.relearn_epochs, lr=self.relearn_lr, batch_size=self.relearn_batch_size, seed=self.relearn_seed)
        return AttackSuite(tuple(self.attacks), relearn, self.quantize_with, max_new_tokens, batch_size)


@dataclass(frozen=True)
class RunSetting:
    """One point of the grid: a label, the method's settings and how its rate is set."""

    label: str
    method: dict[str, Any]  # MethodConfig fields (rate is a number, or absent for estimate / adaptive)
    rate_mode: str  # "fixed", "estimate", "adaptive" or "none" (the method has no rate)


@dataclass
class StudyConfig:
    """Everything a study needs (module docstring)."""

    model: str = "smollm2"
    data: DataSection = field(default_factory=DataSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    unlearn: UnlearnSection = field(default_factory=UnlearnSection)
    evaluation: EvalSection = field(default_factory=EvalSection)
    selection: SelectionSection = field(default_factory=SelectionSection)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    grid: list[dict[str, Any]] = field(default_factory=lambda: [{"method": "ga"}])
    robustness: Optional[RobustnessSection] = None

    def to_dict(self) -> dict[str, Any]:
        """The trajectory protocol: every section but ``robustness`` (see :meth:`robustness_dict`)."""
        protocol = dataclasses.asdict(self)
        protocol.pop("robustness")
        return protocol

    def digest(self) -> str:
        """A hash of the protocol (:meth:`to_dict`): a study folder holds the trajectories of one protocol only."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def robustness_dict(self) -> Optional[dict[str, Any]]:
        """The robustness section as a dict (None without one)."""
        return None if self.robustness is None else dataclasses.asdict(self.robustness)

    def robustness_digest(self) -> Optional[str]:
        """A hash of the protocol's digest and the robustness section: the attacks recorded in a folder belong to one."""
        if self.robustness is None:
            return None
        value = {"config_hash": self.digest(), "robustness": self.robustness_dict()}
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> "StudyConfig":
        """Raise ConfigError on the first bad value; returns self."""
        if self.model not in MODEL_CHOICES:
            path = Path(self.model)
            if not (path / "config.json").is_file():
                raise ConfigError(f"model must be one of {', '.join(MODEL_CHOICES)} or a Hugging Face model folder; got {self.model!r}")
        d = self.data
        if d.forget_split not in ("forget01", "forget05", "forget10"):
            raise ConfigError(f"data.forget_split must be forget01, forget05 or forget10; got {d.forget_split!r}")
        for section, names in (
            ("data", ("forget_questions", "retain_records", "eval_questions", "holdout_questions", "max_length")),
            ("finetune", ("epochs", "batch_size")),
            ("unlearn", ("epochs", "batch_size", "evals_per_epoch", "rate_batches")),
            ("evaluation", ("max_new_tokens", "batch_size")),
        ):
            for name in names:
                value = getattr(getattr(self, section), name)
                if value < 1:
                    raise ConfigError(f"{section}.{name} must be >= 1, got {value}")
        if d.eval_questions > d.retain_records:
            raise ConfigError(f"data.eval_questions ({d.eval_questions}) exceeds data.retain_records ({d.retain_records}): the retain set is evaluated on trained-on records")
        if d.synthetic_authors < 0:
            raise ConfigError(f"data.synthetic_authors must be >= 0, got {d.synthetic_authors}")
        for section in ("finetune", "unlearn"):
            lr = getattr(self, section).lr
            if not (lr > 0 and math.isfinite(lr)):
                raise ConfigError(f"{section}.lr must be a positive number, got {lr}")
        if not 0.0 < self.evaluation.min_k <= 1.0:
            raise ConfigError(f"evaluation.min_k must be in (0, 1], got {self.evaluation.min_k}")
        if not 0.0 < self.selection.utility_fraction <= 1.0:
            raise ConfigError(f"selection.utility_fraction must be in (0, 1], got {self.selection.utility_fraction}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {self.seeds!r}")
        settings = self.settings()
        labels = [s.label for s in settings]
        duplicated = sorted({label for label in labels if labels.count(label) > 1})
        if duplicated:
            raise ConfigError(f"grid: the settings {duplicated} appear twice; remove the duplicates")
        if self.robustness is not None:
            _check_robustness(self.robustness, labels, d.retain_records)
            self.robustness.suite(self.evaluation.max_new_tokens, self.evaluation.batch_size).validate()
        return self

    def settings(self) -> list[RunSetting]:
        """The grid expanded into its points, in file order."""
        if not isinstance(self.grid, list) or not self.grid:
            raise ConfigError("grid must be a non-empty list of entries such as {method: ga}")
        points: list[RunSetting] = []
        for i, entry in enumerate(self.grid):
            points.extend(_expand_entry(i, entry))
        return points

    def eval_steps(self, num_forget: int) -> list[int]:
        """Optimizer steps after which a run is evaluated (``evaluation_steps``)."""
        u = self.unlearn
        return evaluation_steps(num_forget, u.batch_size, u.epochs, u.evals_per_epoch)


def evaluation_steps(num_samples: int, batch_size: int, epochs: int, evals_per_epoch: int = 1) -> list[int]:
    """The optimizer steps that end the epoch fractions j / evals_per_epoch, j = 1 .. epochs * evals_per_epoch:
    step_j = ceil(j / evals_per_epoch * num_samples / batch_size) (batches run across epoch boundaries, as
    ``sga.data.unlearning.BatchSchedule`` cuts them); the last is the run's final step."""
    points = epochs * evals_per_epoch
    return sorted({math.ceil(j / evals_per_epoch * num_samples / batch_size) for j in range(1, points + 1)})


_METHOD_FIELDS = {f.name: f for f in dataclasses.fields(MethodConfig)}


def _expand_entry(index: int, entry: Any) -> list[RunSetting]:
    where = f"grid[{index}]"
    if not isinstance(entry, dict) or "method" not in entry:
        raise ConfigError(f"{where} must be a mapping with a 'method' key, e.g. {{method: sga, rate: 0.5}}; got {entry!r}")
    unknown = sorted(set(entry) - set(_METHOD_FIELDS) - {"method"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected fields of the method section ({', '.join(_METHOD_FIELDS)})")
    keys = list(entry)
    values = [v if isinstance(v, list) else [v] for v in (entry[k] for k in keys)]
    if any(not v for v in values):
        raise ConfigError(f"{where}: an empty list gives no grid point")
    return [_setting(where, dict(zip(keys, combo))) for combo in itertools.product(*values)]


def _setting(where: str, values: dict[str, Any]) -> RunSetting:
    method = {"name" if k == "method" else k: v for k, v in values.items()}
    if method["name"] not in METHODS or method["name"] == "sft":
        unlearning = ", ".join(m for m in METHODS if m != "sft")
        raise ConfigError(f"{where}: method must be one of {unlearning}; got {method['name']!r}")
    rate = method.get("rate")
    mode = "fixed" if method["name"] in (*RATE_METHODS, "sga_token") else "none"  # the others have no smoothing rate
    if rate in (RATE_ESTIMATE, RATE_ADAPTIVE):
        if method["name"] not in RATE_METHODS:
            raise ConfigError(f"{where}: rate: {rate} applies to {' and '.join(RATE_METHODS)}, not {method['name']}")
        mode = rate
        method.pop("rate")
        if rate == RATE_ADAPTIVE and not method.get("adaptive_rate_every"):
            raise ConfigError(f"{where}: rate: adaptive needs adaptive_rate_every (re-estimate every N steps), e.g. 5")
    elif method.get("adaptive_rate_every"):
        raise ConfigError(f"{where}: adaptive_rate_every is set but rate is not 'adaptive'")
    try:
        config = MethodConfig(**{k: _coerce_method(k, v) for k, v in method.items()})
        config.validate()
    except (TypeError, ConfigError) as err:
        raise ConfigError(f"{where}: {err}") from None
    return RunSetting(_label(config, mode), method, mode)


def _coerce_method(name: str, value: Any) -> Any:
    kind = str(_METHOD_FIELDS[name].type)
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in ("float", "int") and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if kind == "str" and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _label(config: MethodConfig, mode: str) -> str:
    """A readable, unique name for a grid point: the method and the settings that differ from defaults."""
    parts = [config.name]
    if config.name in ("sga", "sga_gls", "grad_diff"):
        parts.append(f"K{config.num_classes}")
    if mode == "fixed":
        parts.append(f"r{config.rate:g}")
    elif mode == "estimate":
        parts.append("r*")
    elif mode == "adaptive":
        parts.append(f"r-adaptive{config.adaptive_rate_every}")
    defaults = MethodConfig()
    for name in ("beta", "gamma", "retain_weight", "retain_loss"):
        if getattr(config, name) != getattr(defaults, name):
            parts.append(f"{name}{getattr(config, name):g}" if isinstance(getattr(config, name), float) else f"{name}-{getattr(config, name)}")
    return "_".join(parts)


_SECTIONS = {"data": DataSection, "finetune": FinetuneSection, "unlearn": UnlearnSection, "evaluation": EvalSection, "selection": SelectionSection}


def _section(name: str, cls: type, values: Any) -> Any:
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bad = sorted(set(values) - set(fields))
    if bad:
        raise ConfigError(f"unknown key(s) {bad} in section {name!r}; expected {', '.join(fields)}")
    typed = {}
    for key, value in values.items():
        kind = fields[key].type
        if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        expected = {"int": int, "float": float, "str": str}[kind]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ConfigError(f"{name}.{key} must be a{'n' if kind == 'int' else ''} {kind}, got {value!r}")
        typed[key] = value
    return cls(**typed)


def _check_robustness(section: RobustnessSection, labels: list[str], retain_records: int) -> None:
    r = section
    unknown = [label for label in r.settings if label not in labels]
    if not r.settings or unknown:
        raise ConfigError(f"robustness.settings: {'unknown settings ' + ', '.join(unknown) if unknown else 'empty'}; the grid's settings are {', '.join(labels)}")
    bad = [p for p in r.points if p not in ROBUSTNESS_POINTS]
    if not r.points or bad:
        raise ConfigError(f"robustness.points must be a non-empty list of {', '.join(ROBUSTNESS_POINTS)}; got {r.points!r}")
    bad = [a for a in r.attacks if a not in ATTACKS]
    if not r.attacks or bad:
        raise ConfigError(f"robustness.attacks: {'unknown ' + ', '.join(map(str, bad)) if bad else 'empty'}; choose from {', '.join(ATTACKS)}")
    if not 1 <= r.related_records <= retain_records:
        raise ConfigError(f"robustness.related_records must be in [1, data.retain_records = {retain_records}], got {r.related_records}")


def _robustness_section(values: Any) -> RobustnessSection:
    """The robustness section from YAML: lists of strings for settings / points / attacks ("all": every attack)."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section 'robustness' must be a mapping, got {values!r}")
    lists = {"settings", "points", "attacks"}
    scalars = {k: v for k, v in values.items() if k not in lists}
    section = _section("robustness", RobustnessSection, scalars)
    for key in lists & set(values):
        value = values[key]
        if key == "attacks" and value == "all":
            value = list(ATTACKS)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"robustness.{key} must be a list of names, got {value!r}")
        setattr(section, key, list(value))
    return section


def config_from_dict(data: Any) -> StudyConfig:
    """A StudyConfig from nested mappings (as read from YAML); not yet validated."""
    if not isinstance(data, dict):
        raise ConfigError(f"a study config must be a mapping, got {type(data).__name__}")
    known = {"model", "seeds", "grid", "robustness", *_SECTIONS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown study config key(s) {unknown}; expected {', '.join(sorted(known))}")
    model = data.get("model", "smollm2")
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"model must be a string, got {model!r}")
    config = StudyConfig(model=os.fspath(model), **{name: _section(name, cls, data.get(name)) for name, cls in _SECTIONS.items()})
    if "seeds" in data:
        config.seeds = data["seeds"] if isinstance(data["seeds"], list) else [data["seeds"]]
    if "grid" in data:
        config.grid = data["grid"]
    if data.get("robustness") is not None:
        config.robustness = _robustness_section(data["robustness"])
    return config


def load_study_config(path: Optional[str | os.PathLike] = None) -> StudyConfig:
    """Read and validate a study config (the default protocol when ``path`` is None)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    return config_from_dict(read_yaml(path)).validate()
