"""Run a set of attacks on models that share forget data and a tokenizer: the unlearned model, the retain model (the
reference of relearning and of forget quality) and any other (the target, for context).

``ATTACKS`` names every attack: ``relearn_<set>`` (``sga.attacks.relearn``), ``quantize_<nf4|int8>``
(``sga.attacks.quantize``) and ``probe_<probe>`` (``sga.attacks.probes``). :class:`AttackRunner` measures a model
before any attack (:meth:`AttackRunner.measure`), after each attack (:meth:`AttackRunner.attacked`, one attack at a
time so that a caller can record each as it comes), and scores them (:meth:`AttackRunner.score`).
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from sga.attacks.measure import (
    STANDARD,
    Measurement,
    PromptStyle,
    check_qa_records,
    measure,
)
from sga.attacks.probes import PROBES, probe_style
from sga.attacks.quantize import QUANTIZATIONS, bitsandbytes_installed, fake_quantized, load_quantized
from sga.attacks.relearn import RELEARN_SETS, RelearnSettings, relearn, relearn_plan
from sga.attacks.results import AttackResult, score_attack
from sga.config import ConfigError

ATTACKS = (
    *(f"relearn_{s}" for s in RELEARN_SETS), *(f"quantize_{q}" for q in QUANTIZATIONS), *(f"probe_{p}" for p in PROBES),
)
QUANTIZE_WITH = ("load", "weights")  # load_quantized (bitsandbytes' own layers) or fake_quantized (the weights' rounding)


def attack_kind(name: str) -> str:
    """relearn, quantize or probe: the kind of attack ``name`` (a ValueError for an unknown name)."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    return name.split("_", 1)[0]


def parse_attacks(text: str) -> tuple[str, ...]:
    """Comma-separated attack names, or ``all``; a ConfigError (one line) names the unknown ones."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if names == ("all",):
        return ATTACKS
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise ConfigError(f"unknown or no attacks {unknown or list(names)}; choose from all, {', '.join(ATTACKS)}")
    return names


@dataclass(frozen=True)
class AttackData:
    """The records the attacks use: ``forget`` (TOFU ``_perturbed`` records: measured, relearned by relearn_forget
    and relearn_split), ``related`` (relearned by relearn_related; for TOFU, retain authors' questions) and
    ``context`` (the retain questions the retain_context probe pairs the forget questions with)."""

    forget: list[dict]
    related: list[dict] = field(default_factory=list)
    context: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class AttackSuite:
    """Which attacks run and how: ``attacks`` (names of ``ATTACKS``, in order), the relearning settings shared by
    the relearning attacks (the set comes from the name), how quantized models are built (``QUANTIZE_WITH``), and
    the measurement's generation budget and batch size."""

    attacks: tuple[str, ...] = ATTACKS
    relearn: RelearnSettings = field(default_factory=RelearnSettings)
    quantize_with: str = "load"
    max_new_tokens: int = 32
    batch_size: int = 8

    def validate(self, data: Optional[AttackData] = None) -> "AttackSuite":
        """ConfigError (one line) on a bad setting, or on data the chosen attacks cannot use."""
        for name in self.attacks:
            if name not in ATTACKS:
                raise ConfigError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
        self.relearn.validate()
        if self.quantize_with not in QUANTIZE_WITH:
            raise ConfigError(f"quantize_with must be one of {', '.join(QUANTIZE_WITH)}; got {self.quantize_with!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("the attacks' max_new_tokens and batch_size must be >= 1")
        quantizing = [name for name in self.attacks if attack_kind(name) == "quantize"]
        if quantizing and not bitsandbytes_installed():
            raise ConfigError(f"{', '.join(quantizing)} need bitsandbytes: pip install 'sga[robustness]'")
        if data is not None:
            check_qa_records(data.forget, truth_ratio=True)
            if "probe_paraphrased_question" in self.attacks:
                check_qa_records(data.forget, truth_ratio=True, question_key="paraphrased_question")
            if "relearn_split" in self.attacks and len(data.forget) < 2:
                raise ConfigError("relearn_split needs at least 2 forget questions")
            if "relearn_related" in self.attacks and not data.related:
                raise ConfigError("relearn_related needs related records (for TOFU: retain authors' questions)")
            if "probe_retain_context" in self.attacks and not data.context:
                raise ConfigError("probe_retain_context needs retain QA records to pair the forget questions with")
        return self


class AttackRunner:
    """Measures and attacks models for one suite and one data set (module docstring). ``work_dir`` holds the
    relearning runs and the folders quantized models are loaded from while they run (a temporary folder when None)."""

    def __init__(
        self, suite: AttackSuite, data: AttackData, tokenizer, *, work_dir: Optional[Path] = None,
        use_chat_template: bool = False, backend: str = "auto",
    ) -> None:
        self.suite = suite.validate(data)
        self.data = data
        self.tokenizer = tokenizer
        self.work_dir = work_dir
        self.use_chat_template = use_chat_template
        self.backend = backend

    def relearn_settings(self, name: str) -> RelearnSettings:
        """The suite's relearning settings with the set of attack ``name`` (relearn_<set>)."""
        return RelearnSettings(**{**self.suite.relearn.to_dict(), "relearn_set": name.removeprefix("relearn_")})

    def measured(self, name: str) -> list[int]:
        """The forget questions attack ``name`` measures (a relearning split measures one half)."""
        if attack_kind(name) == "relearn":
            return relearn_plan(self.relearn_settings(name), self.data.forget, self.data.related)[1]
        return list(range(len(self.data.forget)))

    def measure(
        self, model, style: PromptStyle = STANDARD, indices: Optional[Sequence[int]] = None, *, truth_ratio: bool = True,
    ) -> Measurement:
        """The measurement of ``model`` on the forget questions ``indices`` (all when None) under ``style``."""
        records = self.data.forget if indices is None else [self.data.forget[i] for i in indices]
        return measure(
            model, self.tokenizer, records, style=style, truth_ratio=truth_ratio, max_new_tokens=self.suite.max_new_tokens,
            batch_size=self.suite.batch_size, use_chat_template=self.use_chat_template,
        )

    def attacked(self, model, *, model_dir: Optional[os.PathLike] = None, skip: Sequence[str] = ()) -> Iterator[tuple[str, Measurement]]:
        """(attack name, measurement after it) for every attack of the suite not in ``skip``, in order, one at a time.
        ``model`` is never changed. Quantization loads from ``model_dir`` when given (a model folder), else from a
        copy of ``model`` saved in the work folder for the time of the attack."""
        for name in self.suite.attacks:
            if name in skip:
                continue
            kind = attack_kind(name)
            if kind == "relearn":
                settings = self.relearn_settings(name)
                records, indices = relearn_plan(settings, self.data.forget, self.data.related)
                learner = relearn(model, self.tokenizer, records, settings, work_dir=self.work_dir, use_chat_template=self.use_chat_template, backend=self.backend)
                yield name, self.measure(learner, indices=indices)
                del learner
            elif kind == "quantize":
                quantized = self._quantized(model, name.removeprefix("quantize_"), model_dir)
                yield name, self.measure(quantized)
                del quantized
            else:  # a probe scores the answers it extracts (probability, ROUGE-L): no truth ratio, 1/7 of the scoring
                yield name, self.measure(model, probe_style(name.removeprefix("probe_"), self.data.context), truth_ratio=False)
            gc.collect()

    def _quantized(self, model, quantization: str, model_dir: Optional[os.PathLike]):
        if self.suite.quantize_with == "weights":
            return fake_quantized(model, quantization)
        if model_dir is not None:
            return load_quantized(model_dir, quantization)
        folder = Path(tempfile.mkdtemp(prefix="sga-quantize-", dir=self.work_dir))
        try:
            model.save_pretrained(str(folder), safe_serialization=True)
            return load_quantized(folder, quantization, device=str(next(model.parameters()).device))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def score(
        self, name: str, before: Measurement, after: Measurement, retain_before: Measurement,
        retain_after: Optional[Measurement] = None,
    ) -> AttackResult:
        """The result of attack ``name`` from the measurements (``sga.attacks.results.score_attack``)."""
        kind = attack_kind(name)
        settings = {"relearn": self.relearn_settings(name).to_dict()} if kind == "relearn" else {}
        if kind == "quantize":
            settings["quantize_with"] = self.suite.quantize_with
        return score_attack(name, kind, before, after, self.measured(name), retain_before=retain_before,
                            retain_after=retain_after, settings=settings)


def attack_models(
    runner: AttackRunner, model, retain_model, *, model_dir: Optional[os.PathLike] = None,
    retain_dir: Optional[os.PathLike] = None,
) -> tuple[list[AttackResult], dict[str, dict[str, Measurement]]]:
    """Every attack of ``runner``'s suite on ``model`` and on ``retain_model``, scored; returns the results and, per
    attack, the measurements behind them (``before``, ``after``, ``retain_before``, ``retain_after``) for the logs."""
    before, retain_before = runner.measure(model), runner.measure(retain_model)
    retain_after = dict(runner.attacked(retain_model, model_dir=retain_dir))
    results, measurements = [], {}
    for name, after in runner.attacked(model, model_dir=model_dir):
        results.append(runner.score(name, before, after, retain_before, retain_after[name]))
        measurements[name] = {"before": before, "after": after, "retain_before": retain_before, "retain_after": retain_after[name]}
    return results, measurements
