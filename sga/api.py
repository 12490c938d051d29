"""The short Python API: ``sga.unlearn`` and ``sga.evaluate``, over the same config objects as the command line.

    import sga
    result = sga.unlearn(model, tokenizer, forget=forget_records, retain=retain_records, method="sga",
                         rate=0.8, num_classes=3, learning_rate=1e-5, epochs=5)
    result.model            # the trained model (LoRA: the peft model)
    result.history          # the metrics.jsonl records: steps, rate estimates, evaluations
    sga.evaluate(result.model, tokenizer, benchmark="tofu", data_dir="tofu-data", retain_reference="retain.json")

A run made here is a run like any other: its folder holds config.yaml, metrics.jsonl and final/, and the forget
and retain records as JSON lines, so ``sga unlearn --config RUN/config.yaml`` repeats it from the command line.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from sga.benchmarks.harry_potter import evaluate_harry_potter
from sga.benchmarks.muse import evaluate_muse
from sga.benchmarks.tofu import evaluate_tofu, read_json_records
from sga.config import SECTIONS, ConfigError, UnlearnConfig, apply_overrides
from sga.data import check_records
from sga.engine import TrainerCallback, TrainResult, build_trainer, check_run_config
from sga.engine.run_config import check_normal_data
from sga.engine.run_folder import check_output_dir, resolve_output_dir
from sga.methods import build_objective

Records = Union[str, os.PathLike, Sequence[dict]]
# where unlearn() writes the records it was given, inside the run folder
DATA_DIR = "data"
IN_MEMORY_MODEL = "(in-memory model)"


@dataclass
class UnlearnResult:
    """What :func:`unlearn` returns: the trained model, the logged records, and how the run ended."""

    model: torch.nn.Module
    history: list[dict[str, Any]]
    result: TrainResult


def _records(records: Records, name: str) -> list[dict]:
    if isinstance(records, (str, os.PathLike)):
        return check_records(read_json_records(Path(records)), str(records))
    if isinstance(records, dict) or not isinstance(records, Iterable):
        raise TypeError(f"{name} must be a list of records ({{question, answer}} or {{text}}) or a JSON file, got {type(records).__name__}")
    return check_records(list(records), name)


def _option_fields() -> dict[str, list[str]]:
    """Config field name -> the sections that have it."""
    fields: dict[str, list[str]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, []).append(section)
    return fields


def config_from_options(base: Optional[UnlearnConfig] = None, **options: Any) -> UnlearnConfig:
    """A run config from keyword options named after config fields (``rate=0.8``, ``learning_rate=1e-5``); a name
    that two sections share is spelled ``section__field`` (``evaluation__batch_size``). Unknown names are errors."""
    config = base if base is not None else UnlearnConfig()
    fields = _option_fields()
    overrides = {}
    for name, value in options.items():
        if "__" in name:
            section, field_name = name.split("__", 1)
            if section not in SECTIONS or section not in fields.get(field_name, []):
                raise TypeError(f"unknown option {name!r}: no field {field_name!r} in section {section!r}")
        elif name not in fields:
            raise TypeError(f"unknown option {name!r}; options are the fields of sga.config's sections")
        elif len(fields[name]) > 1:
            spelled = ", ".join(f"{s}__{name}" for s in fields[name])
            raise TypeError(f"option {name!r} is a field of several sections: write one of {spelled}")
        else:
            section, field_name = fields[name][0], name
        overrides[f"{section}.{field_name}"] = value
    return apply_overrides(config, overrides)


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return str(path)


def unlearn(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    forget: Records,
    retain: Optional[Records] = None,
    method: str = "sga",
    config: Optional[UnlearnConfig] = None,
    callbacks: Sequence[TrainerCallback] = (),
    **options: Any,
) -> UnlearnResult:
    """Make ``model`` forget the ``forget`` records, as ``sga unlearn`` does.

    Args:
        model, tokenizer: a Hugging Face causal LM (trained in place) and its tokenizer.
        forget: the records to forget (``{"question", "answer"}`` or ``{"text"}``), or a JSON / JSON-lines file.
        retain: the normal (retain) records the method pairs with each forget sample (sga, grad_diff, ...), or a
            file; ``method="sft"`` with ``forget=retain_records`` fine-tunes the retain model that forget
            quality is measured against.
        method: a name of ``sga.methods.METHODS``.
        config: a run config to start from (default: ``UnlearnConfig()``'s defaults).
        callbacks: ``sga.engine.TrainerCallback`` objects told about every step and evaluation.
        **options: any config field by name (``rate``, ``num_classes``, ``learning_rate``, ``epochs``,
            ``output_dir``, ``eval_every``, ``report_to``, ...; ``section__field`` where two sections share a name).

    Returns:
        :class:`UnlearnResult`. Bad options, records or folders raise before any training starts.
    """
    config = config_from_options(config, method__name=method, **options)
    forget_records = _records(forget, "forget")
    retain_records = _records(retain, "retain") if retain is not None else None
    if not config.model.name_or_path:  # the fingerprint of a resumed run also reads the model's own config
        config.model.name_or_path = getattr(model, "name_or_path", "") or IN_MEMORY_MODEL
    output_dir = resolve_output_dir(config)
    check_output_dir(output_dir, resume=config.train.resume, overwrite=config.train.overwrite, model_path=config.model.name_or_path)
    config.data.dataset = "json"
    config.data.forget_file = _write_jsonl(output_dir / DATA_DIR / "forget.jsonl", forget_records)
    config.data.retain_file = _write_jsonl(output_dir / DATA_DIR / "retain.jsonl", retain_records) if retain_records else None
    check_run_config(config)
    objective = build_objective(config.method, backend=config.train.backend)
    check_normal_data(config, objective)
    trainer = build_trainer(model, tokenizer, config, objective=objective, callbacks=callbacks)
    result = trainer.train()
    return UnlearnResult(trainer.trained_model, result.history, result)


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    benchmark: str = "tofu",
    data_dir: Optional[str | os.PathLike] = None,
    **options: Any,
) -> dict[str, Any]:
    """The benchmark's metrics of ``model``, as ``sga eval`` computes them.

    ``benchmark``: "tofu" (:func:`sga.benchmarks.evaluate_tofu`: options ``split``, ``retain_reference``,
    ``max_samples``, ``membership_inference``, ...), "muse" (:func:`sga.benchmarks.evaluate_muse`) or "hp"
    (:func:`sga.benchmarks.evaluate_harry_potter`: options ``book``, ``heldout``). ``data_dir``: the benchmark's
    JSON files (None: the hub dataset). Options are those functions' keyword arguments.
    """
    if benchmark == "tofu":
        split = options.pop("split", "forget01")
        return evaluate_tofu(model, tokenizer, data_dir, split, **options)
    if benchmark == "muse":
        return evaluate_muse(model, tokenizer, data_dir, **options)
    if benchmark == "hp":
        return evaluate_harry_potter(model, tokenizer, options.pop("book"), options.pop("heldout"), **options)
    raise ConfigError(f"unknown benchmark {benchmark!r}; choose from tofu, muse, hp")
