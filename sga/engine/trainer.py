"""The unlearning training loop, on ``accelerate``: the same code on CPU, one GPU, or many GPUs
(DDP, FSDP, DeepSpeed through ``accelerate launch``; ``torchrun`` with gloo on CPU).

Normalization. Each optimizer step consumes a window of ``grad_accum`` global micro-batches. Before the
window's forward passes, the forget samples of the whole window are counted on every process and
all-reduced: N. Each micro-batch's loss is (sum of its per-sample losses) / N, so the summed gradient of
the window equals the gradient of the mean loss over the window's samples, whatever the number of
micro-batches and processes. Distributed backends average gradients over processes (and accelerate's
backward divides by the accumulation steps, where it is used), so the objectives are given the normalizer
N / (num_processes * divisor) instead of N, divisor being what the backward pass divides by: 1 where the
step calls ``loss.backward()`` itself (no GradScaler, no DeepSpeed), so the fused loss gets a grad_output of
exactly 1 and its gradient, built in the forward pass, is handed over untouched; ``grad_accum`` otherwise.

No host sync inside a step's forward and backward passes: labels are checked against the model's
vocabulary once, in the constructor; the batches carry the rows that reach the LM head (built on the host);
the logged statistics stay on the device until the one read at the end of the step.

Exact resume. The batch order is a function of (seed, step) (``sga.data.unlearning.BatchSchedule``), checkpoints
hold model, optimizer, scheduler and RNG states, the step and the adaptive rate, so a resumed run
produces the same weights as an uninterrupted one. Ctrl-C (SIGINT) or SIGTERM finishes the current
step, writes a checkpoint and returns; a second Ctrl-C aborts at once, except while the final model is
written (a second Ctrl-C there leaves a checkpoint instead). Checkpoints carry the run fingerprint: every
setting that changes the trajectory (``UnlearnConfig.trajectory_settings``), the step count, the model's
identity and a SHA-256 of the token data; a resume with any of them changed is refused, naming them.

Divergence. A non-finite loss, NLL or gradient norm (computed every step, one fused norm) stops the run
with status "diverged" before anything of that step is saved: no final model, no checkpoint; the last
good checkpoint stays. metrics.jsonl stays strict JSON: a non-finite number is written as the string
"NaN", "Infinity" or "-Infinity".

Evaluation and callbacks. ``evaluation.eval_every`` evaluates a benchmark during training and keeps the
best model under a declared criterion (``sga.engine.evaluation``); ``callbacks`` (``TrainerCallback``) are told
about every step and evaluation.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from sga.config import ConfigError, UnlearnConfig
from sga.data.unlearning import (
    BatchSchedule,
    UnlearningData,
    build_unlearning_data,
    data_fingerprint,
)
from sga.engine import checkpoint
from sga.engine.evaluation import (
    BEST_FILE,
    Evaluator,
    TrainerCallback,
    TrainingEvaluation,
    clear_best,
)
from sga.engine.progress import RunLog, format_evaluation
from sga.engine.run_folder import (
    BEST_DIR,
    CONFIG_FILE,
    FINAL_MODEL_DIR,
    LOGS_DIR,
    METRICS_FILE,
    RUN_FILE,
    check_output_dir,
    clear_run,
    resolve_output_dir,
)
from sga.hf.distributed import is_dtensor
from sga.methods import Objective, build_objective
from sga.methods.rate import clip_rate, estimate_rate
from sga.methods.sequence_nll import reference_sequence_nll

# metrics checked for finiteness after every step
WATCHED_METRICS = ("loss", "forget_nll", "normal_nll", "grad_norm")


@dataclass
class TrainResult:
    """How a run ended: ``status`` is "completed", "interrupted" (checkpoint written, resumable) or
    "diverged" (the forget NLL passed ``max_forget_nll``: the final model is saved; or a non-finite loss or
    gradient norm: nothing of that step is saved, ``checkpoint`` is the last good one or None). ``reason``
    says why a diverged run stopped."""

    status: str
    step: int
    total_steps: int
    output_dir: Path
    checkpoint: Optional[Path] = None
    final_model: Optional[Path] = None
    history: list[dict[str, Any]] = field(default_factory=list)
    reason: Optional[str] = None
    best_model: Optional[Path] = None  # output_dir/best when evaluation kept a best model
    best_model_reason: Optional[str] = None  # why no best model was kept, under a criterion


def _strict_json(record: dict[str, Any]) -> dict[str, Any]:
    """A record with its non-finite floats as the strings "NaN", "Infinity", "-Infinity" (strict JSON has no
    such numbers; Python's json module would write bare NaN tokens)."""
    return {k: (json.dumps(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def tracker_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record as tracker scalars: ``train/<key>`` for a step, ``eval/<key>`` for an
    evaluation, ``rate/<key>`` for a rate estimate (the step itself, booleans and strings left out)."""
    group = {"eval": "eval", "rate": "rate"}.get(record.get("event"), "train")
    return {
        f"{group}/{key}": float(value)
        for key, value in record.items()
        if key not in ("step", "event") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _head_rows(model: torch.nn.Module) -> int:
    """V: the rows of the model's LM head (what labels index), else ``config.vocab_size``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0]
    return int(model.config.vocab_size)


class ObjectiveModule(torch.nn.Module):
    """The causal LM and an objective as one module, so the loss is computed inside ``forward``:
    distributed wrappers (DDP, FSDP, DeepSpeed) and accelerate's autocast see the whole computation."""

    def __init__(self, model: torch.nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        # FSDP's auto-wrap policy looks for the decoder-layer classes here
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, batch: dict[str, torch.Tensor], num_forget: torch.Tensor):
        out = self.objective.compute(self.model, batch, num_forget)
        normal = out.normal_nll if out.normal_nll is not None else out.forget_nll.new_zeros(0)
        return out.loss, out.forget_nll, normal


def make_accelerator(config: UnlearnConfig):
    """An ``Accelerator`` for the run. mixed_precision "auto" takes the launcher's setting
    (``accelerate launch --mixed_precision``) or bf16 autocast on a CUDA GPU that supports it; without a
    GPU it runs on CPU (gloo across processes)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    precision = config.train.mixed_precision
    cuda = torch.cuda.is_available()
    if precision == "auto":
        # `accelerate launch --mixed_precision X` sets this; otherwise bf16 where the GPU has it
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
        precision = launched or ("bf16" if cuda and torch.cuda.is_bf16_supported() else "no")
    if precision != "no" and not cuda:
        raise ConfigError(f"train.mixed_precision={precision} needs a CUDA GPU")
    if not cuda and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # accelerate drops FSDP on CPU
        raise ConfigError("FSDP (accelerate launch --use_fsdp) needs CUDA GPUs: on CPU accelerate trains unsharded (DDP); drop --use_fsdp")
    trackers = config.train.trackers()
    out = str(config.train.output_dir)
    return Accelerator(
        cpu=not cuda,
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.grad_accum,
        step_scheduler_with_optimizer=False,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=out, logging_dir=str(Path(out) / LOGS_DIR)) if trackers else None,
    )


class _InterruptFlag:
    """Within the block, the first SIGINT / SIGTERM only sets ``raised``; a second SIGINT aborts (raises
    KeyboardInterrupt) unless ``abortable`` is False."""

    def __init__(self) -> None:
        self.raised = False
        self.abortable = True
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.raised and self.abortable and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = True

    def __enter__(self) -> "_InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class UnlearningTrainer:
    """Runs one unlearning job.

    Args:
        model: a Hugging Face causal LM (trainable; LoRA adapters are added here when the config asks).
        tokenizer: its tokenizer (pad id for batches; saved with the final model).
        data: tokenized forget / normal sequences and pairs (``sga.data.unlearning.build_unlearning_data``).
        config: the run config (model section: LoRA, gradient checkpointing; method; train).
        objective: defaults to ``build_objective(config.method)``.
        accelerator: defaults to :func:`make_accelerator`.
        callbacks: ``TrainerCallback`` objects told about every step and evaluation.
        evaluator: replaces the benchmark of ``config.evaluation`` (``sga.engine.evaluation.Evaluator``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        data: UnlearningData,
        config: UnlearnConfig,
        *,
        objective: Optional[Objective] = None,
        accelerator=None,
        callbacks: Sequence[TrainerCallback] = (),
        evaluator: Optional[Evaluator] = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.data = data
        self.objective = objective or build_objective(config.method, backend=config.train.backend)
        self.data = data = self.objective.prepare_data(data, tokenizer, config.data)  # e.g. dpo's preferred answers
        self.output_dir = resolve_output_dir(config)
        self.accelerator = accelerator or make_accelerator(config)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        if self.objective.uses_normal and data.pairs is None:
            raise ValueError(f"method {self.objective.name} needs normal data: build the data with pairs")
        self._check_adaptive()
        self.schedule = BatchSchedule(len(data), config.train.batch_size, config.train.seed, self.accelerator.num_processes)
        micro_total = self.schedule.batches_for(config.train.epochs)
        self.total_steps = config.train.max_steps or math.ceil(micro_total / config.train.grad_accum)
        if config.train.warmup_steps > self.total_steps:
            raise ConfigError(f"train.warmup_steps ({config.train.warmup_steps}) exceeds the {self.total_steps} steps of the run")
        self.model = model
        data.check_labels(_head_rows(model))
        self.callbacks = list(callbacks)
        self.evaluation = TrainingEvaluation(config, self.accelerator, evaluator) if config.evaluation.eval_every else None

    def _check_adaptive(self) -> None:
        from accelerate.utils import DistributedType

        if not self.config.method.adaptive_rate_every:
            return
        if not self.objective.supports_adaptive_rate:
            raise ConfigError(f"adaptive rate applies to sga and sga_gls, not {self.objective.name}")
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError("the adaptive rate needs full gradients on every process: use DDP, not FSDP / DeepSpeed")

    # ---------------------------------------------------------------- setup

    def _prepare_model(self) -> torch.nn.Module:
        model_cfg = self.config.model
        model = self.model
        if model_cfg.gradient_checkpointing:
            model.config.use_cache = False
            # transformers >= 5.2x names it activation checkpointing; earlier releases only have the old name
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if model_cfg.lora:
                # frozen embeddings: the embedding output must require grad, or (reentrant) checkpointed layers give
                # the adapters no gradient (peft 0.21's get_peft_model installs it too; explicit here, not left to peft)
                model.enable_input_require_grads()
        if model_cfg.lora:
            from peft import LoraConfig, get_peft_model

            targets = model_cfg.lora_target_modules
            lora = LoraConfig(
                r=model_cfg.lora_r,
                lora_alpha=model_cfg.lora_alpha,
                lora_dropout=model_cfg.lora_dropout,
                target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
        model.train()
        return model

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        # Weight decay on matrices only (not on biases, norms' gains or other vectors).
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        if not decay and not no_decay:
            raise ValueError("the model has no trainable parameters")
        groups = [{"params": decay, "weight_decay": self.config.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.config.train.learning_rate)

    def _fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint (JSON-normalized): the
        trajectory settings, the step count, the model's identity and the data hash. Computed once."""
        if getattr(self, "_fingerprint_cache", None) is None:
            model = self.model
            identity = {
                "model_type": getattr(model.config, "model_type", None),
                "architectures": getattr(model.config, "architectures", None),
                "num_parameters": sum(p.numel() for p in model.parameters()),
            }
            fingerprint = {
                **self.config.trajectory_settings(),
                "total_steps": self.total_steps,
                "model.identity": identity,
                "data.sha256": data_fingerprint(self.data),
            }
            self._fingerprint_cache = json.loads(json.dumps(fingerprint))
        return self._fingerprint_cache

    def _check_fingerprint(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint whose run fingerprint differs from this run's, naming what changed."""
        saved = state.get("fingerprint")
        ours = self._fingerprint()
        if saved == ours:
            return
        saved = saved if isinstance(saved, dict) else {}
        changed = [f"{key}: {saved.get(key, '(absent)')!r} -> {ours.get(key, '(absent)')!r}" for key in sorted(set(saved) | set(ours)) if saved.get(key) != ours.get(key)]
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise ConfigError(
            f"checkpoint {path} was written by a run with other settings ({shown}): resume with the settings of that run, "
            "or start a fresh run with --overwrite or another --output-dir"
        )

    # ---------------------------------------------------------------- batches

    def _local_batch(self, schedule: BatchSchedule, micro_step: int) -> dict[str, torch.Tensor]:
        indices = schedule.local_batch(micro_step, self.accelerator.process_index)
        batch = self.data.batch(indices, self.pad_token_id)
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

    def _window(self, step: int) -> list[dict[str, torch.Tensor]]:
        accum = self.config.train.grad_accum
        return [self._local_batch(self.schedule, step * accum + j) for j in range(accum)]

    def _rate_batches(self, estimate_index: int) -> Iterator[dict[str, torch.Tensor]]:
        # A schedule of its own (seed + 1) so the estimate never shifts the training batches.
        schedule = BatchSchedule(len(self.data), self.config.train.batch_size, self.config.train.seed + 1, self.accelerator.num_processes)
        n = self.config.method.rate_batches
        for j in range(n):
            yield self._local_batch(schedule, estimate_index * n + j)

    # ---------------------------------------------------------------- logging

    def _open_metrics(self, resumed_step: int):
        path = self.output_dir / METRICS_FILE
        if not self.accelerator.is_main_process:
            return None
        if resumed_step and path.is_file():
            # Drop records the resumed run writes again: steps and evaluations past the checkpoint, and rate
            # estimates made at or after its step (an estimate at step s is logged before step s + 1 runs).
            def before_checkpoint(record: dict) -> bool:
                return record["step"] < resumed_step if record.get("event") == "rate" else record["step"] <= resumed_step

            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [line for line in lines if before_checkpoint(json.loads(line))]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif not resumed_step:
            path.write_text("", encoding="utf-8")
        return path.open("a", encoding="utf-8")

    # ---------------------------------------------------------------- the loop

    def train(self) -> TrainResult:
        """Run (or resume) the job; returns how it ended."""
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        acc = self.accelerator
        train_cfg = self.config.train
        set_seed(train_cfg.seed)
        self._fingerprint()  # of the model as given, before LoRA adapters are added
        # on every process, so that a refusal stops all of them (none waits at a barrier)
        check_output_dir(self.output_dir, resume=train_cfg.resume, overwrite=train_cfg.overwrite, model_path=self.config.model.name_or_path)
        acc.wait_for_everyone()
        if acc.is_main_process and train_cfg.overwrite:
            clear_run(self.output_dir)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._record_batch_layout()
        acc.wait_for_everyone()

        resume_path = self._resume_path()
        resume_state = None
        if resume_path is not None:
            # before any state is loaded: another architecture or a LoRA / full mismatch is named, not a traceback
            resume_state = checkpoint.read_state(resume_path)
            self._check_fingerprint(resume_path, resume_state)
            if self.evaluation is not None:
                self.evaluation.restore(resume_state.get("evaluation"), int(resume_state["step"]), self.output_dir)
        elif acc.is_main_process:
            clear_best(self.output_dir)  # a previous run's best model is not this run's
        if acc.is_main_process:
            self._write_config()

        # The frozen reference (initial model) is taken before any training or resume.
        if self.objective.uses_reference_model:
            reference = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.objective.reference_model = reference.to(acc.device)
        if self.objective.uses_reference_nll and resume_path is None:
            self.data.reference_nll = reference_sequence_nll(
                self.model.to(acc.device), getattr(self.data, "reference_examples", self.data.forget), pad_token_id=self.pad_token_id, batch_size=train_cfg.batch_size, backend=train_cfg.backend
            )

        model = self._prepare_model()
        optimizer = self._optimizer(model)
        scheduler = get_scheduler(train_cfg.scheduler, optimizer, num_warmup_steps=train_cfg.warmup_steps, num_training_steps=self.total_steps)
        module, optimizer, scheduler = acc.prepare(ObjectiveModule(model, self.objective), optimizer, scheduler)
        self._module = module
        self.trained_model = acc.unwrap_model(module).model  # the model being trained (LoRA: its peft wrapper)

        step = 0
        if resume_path is not None:
            tensors = checkpoint.load_checkpoint(acc, resume_path)
            step = int(resume_state["step"])
            if "rate" in resume_state:
                self.objective.rate = float(resume_state["rate"])
            self.objective.restore_checkpoint_state(resume_state.get("objective_state", {}))
            if "reference_nll" in tensors:
                self.data.reference_nll = tensors["reference_nll"]

        metrics_file = self._open_metrics(step)
        history: list[dict[str, Any]] = []
        status, reason = "completed", None
        bad_step = False  # the last step is non-finite: nothing of it may be saved
        checkpoint_path: Optional[Path] = None
        final_model: Optional[Path] = None
        self.log = progress = RunLog(self.total_steps, step, f"training ({self.objective.name})",
                                     progress=train_cfg.progress, enabled=acc.is_main_process)
        if step:
            progress.say(f"resumed from {resume_path} at step {step}/{self.total_steps}")
        self._start_trackers()
        start = time.monotonic()
        try:
            # the guard covers the final save too: a signal there must not lose the run
            with _InterruptFlag() as interrupt:
                if self.evaluation is not None and step == 0 and self.config.evaluation.eval_at_start:
                    self._evaluate(0, module, metrics_file, history)  # the model before unlearning
                while step < self.total_steps:
                    every = self.config.method.adaptive_rate_every
                    if every and step % every == 0:
                        record = self._adapt_rate(step)
                        self._log(record, metrics_file, history)
                    record = self._step(step, module, optimizer, scheduler, interrupt)
                    step += 1
                    # e.g. pdu's dual update, on the all-reduced record
                    epochs_done = step * train_cfg.batch_size * train_cfg.grad_accum / len(self.data)
                    record.update(self.objective.after_step(record, epochs_done))
                    record.update(step=step, time_s=round(time.monotonic() - start, 3))
                    logged = self._log(record, metrics_file, history)
                    for callback in self.callbacks:
                        callback.on_step_end(self, step, logged)
                    progress.update(step, record)
                    non_finite = self._non_finite(record)
                    if non_finite:
                        status, reason, bad_step = "diverged", f"non-finite {', '.join(non_finite)} at step {step}", True
                        break
                    if self.evaluation is not None and self.evaluation.due(step, self.total_steps):
                        self._evaluate(step, module, metrics_file, history)  # before an interrupt: its checkpoint has it
                    if record.pop("_interrupted") and step < self.total_steps:
                        status = "interrupted"
                        break
                    bound = train_cfg.max_forget_nll
                    if bound is not None and not record["forget_nll"] <= bound:
                        status, reason = "diverged", f"forget NLL {record['forget_nll']:.4g} > max_forget_nll {bound:g} at step {step}"
                        break
                    if train_cfg.save_every and step % train_cfg.save_every == 0 and step < self.total_steps:
                        checkpoint_path = self._save_checkpoint(step)
                progress.close()
                if status == "interrupted":
                    checkpoint_path = self._save_checkpoint(step)
                elif bad_step:
                    # nothing of the diverged step is saved; the last good checkpoint (if any) stays
                    checkpoint_path = checkpoint.latest_checkpoint(self.output_dir)
                else:
                    final_model, checkpoint_path, status = self._save_final_or_checkpoint(module, step, status, interrupt)
        finally:
            progress.close()
            if metrics_file is not None:
                metrics_file.close()
            for tracker in acc.trackers:  # their files complete; not end_training(), which ends the process group too
                tracker.finish()
        best_model, best_reason = None, None
        if self.evaluation is not None and self.evaluation.best is not None:
            best_model = self.output_dir / BEST_DIR
        elif self.evaluation is not None and self.evaluation.criterion is not None:
            best_reason = self.evaluation.no_best_reason()
            progress.say(f"no best model kept: {best_reason}")
        return TrainResult(status, step, self.total_steps, self.output_dir, checkpoint_path, final_model, history, reason,
                           best_model, best_reason)

    def _save_final_or_checkpoint(self, module, step: int, status: str, interrupt: _InterruptFlag):
        """Write final/; if that fails or a second Ctrl-C aborts it, write a checkpoint (signals deferred)
        so the run is not lost. Returns (final model, checkpoint, status)."""
        try:
            return self._save_final(module), None, status
        except KeyboardInterrupt:
            interrupt.abortable = False
            return None, self._save_checkpoint(step), "interrupted"
        except Exception as err:
            interrupt.abortable = False
            checkpoint_path = self._save_checkpoint(step)
            raise RuntimeError(f"saving the final model failed ({err}); the run's state is in {checkpoint_path}") from err

    def _non_finite(self, record: dict[str, Any]) -> list[str]:
        """Names of the watched metrics of a step that are NaN or infinite. Under fp16 a gradient overflow
        that the grad scaler skipped (and answers by lowering its scale) is not a divergence."""
        bad = [key for key in WATCHED_METRICS if key in record and not math.isfinite(record[key])]
        if bad == ["grad_norm"] and self.accelerator.mixed_precision == "fp16" and self.accelerator.optimizer_step_was_skipped:
            return []
        return bad

    def _resume_path(self) -> Optional[Path]:
        """The checkpoint to resume from, verified against its manifest (``--resume auto``: the newest that
        verifies, older ones with a warning). Decided on the main process and broadcast, so the files are
        hashed once."""
        from accelerate.utils import broadcast_object_list

        resume = self.config.train.resume
        outcome: list[Optional[str]] = [None, None]  # [path, error]
        if self.accelerator.is_main_process and resume is not None:
            try:
                if resume == "auto":
                    found = checkpoint.latest_verified_checkpoint(self.output_dir)
                else:
                    checkpoint.verify_checkpoint(resume)
                    found = Path(resume)
                outcome[0] = None if found is None else str(found)
            except checkpoint.CheckpointError as err:
                outcome[1] = str(err)
        broadcast_object_list(outcome)
        if outcome[1] is not None:
            raise checkpoint.CheckpointError(outcome[1])
        return None if outcome[0] is None else Path(outcome[0])

    def _write_config(self) -> None:
        """config.yaml of the run, written once a resume is known to use the same trajectory settings."""
        import yaml

        (self.output_dir / CONFIG_FILE).write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False), encoding="utf-8")

    def _save_final(self, module) -> Path:
        return self._export_model(module, self.output_dir / FINAL_MODEL_DIR)

    def _export_model(self, module, path: Path, **options) -> Path:
        """The trained model (unwrapped, gathered) and the tokenizer as a model folder (every process)."""
        acc = self.accelerator
        inner = acc.unwrap_model(module).model
        state_dict = acc.get_state_dict(module)
        state_dict = {key.removeprefix("model."): value for key, value in state_dict.items()} if state_dict else state_dict
        return checkpoint.save_final_model(acc, inner, state_dict, self.tokenizer, path, **options)

    def _evaluate(self, step: int, module, metrics_file, history: list[dict[str, Any]]) -> None:
        """Evaluate the model after ``step`` (on the main process, the others waiting), log the record, write
        best/ when the criterion says so, then tell the callbacks (``sga.engine.evaluation``)."""
        began = time.monotonic()
        with self.log.paused():  # evaluation time is not training time in the progress estimate
            metrics = self.evaluation.evaluate(self.accelerator.unwrap_model(module).model, self.tokenizer, step)
            is_best = self.evaluation.observe(step, metrics)
            if is_best:
                self._export_model(module, self.output_dir / BEST_DIR, json_files={BEST_FILE: self.evaluation.best}, manifest=True)
        self.log.say(format_evaluation(step, self.total_steps, metrics, is_best if self.evaluation.criterion else None))
        record = self._log(self.evaluation.record(step, metrics, is_best, time.monotonic() - began), metrics_file, history)
        for callback in self.callbacks:
            callback.on_evaluate(self, step, record)

    def _record_batch_layout(self) -> None:
        """Print where the run writes, the step's batch sizes (per device x accumulation x processes = effective)
        and the normal-data pairing; store them, with the distributed setup, in output_dir/run.json."""
        layout = self.schedule.layout(self.config.train.grad_accum)
        layout["distributed_type"] = str(self.accelerator.distributed_type)
        layout["pairing"] = self.data.pairing
        low, high = layout["per_device_batch_min"], layout["per_device_batch_max"]
        per_device = str(low) if low == high else f"{low}-{high}"
        print(f"[sga] run folder: {self.output_dir}", flush=True)
        print(
            f"[sga] batch per optimizer step: {per_device} per device x {layout['grad_accum']} accumulation x "
            f"{layout['num_processes']} processes = {layout['effective_batch']} forget samples"
            + (f"; normal-data pairing: {self.data.pairing}" if self.data.pairing else ""),
            flush=True,
        )
        (self.output_dir / RUN_FILE).write_text(json.dumps(layout, indent=1) + "\n", encoding="utf-8")

    def _needs_accelerate_backward(self) -> bool:
        """A GradScaler (fp16) or DeepSpeed / Megatron must see the backward pass; otherwise accelerate's backward
        would only divide the loss by the accumulation steps, and the step calls ``loss.backward()`` itself."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        return acc.scaler is not None or acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)

    def _backward_divisor(self) -> int:
        """What the backward pass divides the loss by: accelerate's accumulation steps, or 1 for ``loss.backward()``."""
        return self.config.train.grad_accum if self._needs_accelerate_backward() else 1

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` (grad_output exactly 1, so the fused loss hands its gradient over untouched), or
        accelerate's backward where it must run (:meth:`_needs_accelerate_backward`)."""
        if self._needs_accelerate_backward():
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _step(self, step: int, module, optimizer, scheduler, interrupt: _InterruptFlag) -> dict[str, Any]:
        acc = self.accelerator
        window = self._window(step)
        local_count = sum(batch["forget_input_ids"].shape[0] for batch in window)
        num_forget = acc.reduce(torch.tensor(float(local_count), device=acc.device), reduction="sum")
        loss_factor = acc.num_processes * self._backward_divisor()  # undone by gradient averaging and backward
        normalizer = num_forget / loss_factor
        sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # loss, forget NLL, normal NLL (on device)
        counts = [0, 0]  # forget / normal sequences (host)
        grad_norm = None
        step_lr = scheduler.get_last_lr()[0]  # the rate this step's optimizer update uses (the scheduler moves after it)
        for batch in window:
            with acc.accumulate(module):
                loss, forget_nll, normal_nll = module(batch, normalizer)
                self._backward(loss)
                sums += torch.stack([loss.detach().double(), forget_nll.double().sum(), normal_nll.double().sum()])
                counts[0] += forget_nll.numel()
                counts[1] += normal_nll.numel()
                if acc.sync_gradients:
                    grad_norm = self._gradient_norm(module)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        # read after the work: a signal during the step counts now
        host = torch.tensor([*counts, float(interrupt.raised)], dtype=torch.float64, device=acc.device)
        sums = acc.reduce(torch.cat([sums, host]), reduction="sum")
        if grad_norm is not None:  # the same global norm on every process: appended after the reduction
            sums = torch.cat([sums, torch.as_tensor(grad_norm, dtype=torch.float64, device=sums.device).reshape(1)])
        return self._step_record(sums, loss_factor, step_lr)

    def _step_record(self, sums: torch.Tensor, loss_factor: int, step_lr: float) -> dict[str, Any]:
        """The step's log record from the all-reduced [loss, forget NLL sum, normal NLL sum, forget count,
        normal count, interrupted] and, when the window ended in an optimizer step, the gradient norm (the
        step's one device-to-host read)."""
        values = sums.tolist()
        loss, forget_sum, normal_sum, forget_count, normal_count, interrupted = values[:6]
        record: dict[str, Any] = {
            "loss": loss / loss_factor,
            "forget_nll": forget_sum / forget_count,
            "lr": step_lr,
            "_interrupted": interrupted > 0,
        }
        if normal_count > 0:
            record["normal_nll"] = normal_sum / normal_count
        if len(values) > 6:
            record["grad_norm"] = values[6]
        if self.objective.rate is not None:
            record["rate"] = self.objective.rate
        return record

    def _gradient_norm(self, module) -> Optional[torch.Tensor]:
        """||g||_2 of the window's gradient as a device tensor (no host sync), clipped to max_grad_norm when
        set. Without clipping, one fused norm over the local gradients, which are the full gradients except
        under FSDP / DeepSpeed (there accelerate computes the global norm; DeepSpeed's may be None)."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        max_norm = self.config.train.max_grad_norm
        if max_norm is not None or acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            norm = acc.clip_grad_norm_(module.parameters(), max_norm if max_norm is not None else math.inf)
            return norm.full_tensor() if is_dtensor(norm) else norm  # FSDP2's norm of DTensor gradients is a DTensor
        acc.unscale_gradients()
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None

    def _adapt_rate(self, step: int) -> dict[str, Any]:
        """Re-estimate r* (``sga.methods.rate``) on batches of a separate schedule and clip it to the user range."""
        acc = self.accelerator
        method = self.config.method
        inner = acc.unwrap_model(self._module).model
        reading = self.objective.name
        raw, stats = estimate_rate(
            inner,
            self._rate_batches(step // method.adaptive_rate_every),
            self.objective.num_classes,
            reading=reading,
            backend=self.config.train.backend,
            all_reduce_sum=lambda t: acc.reduce(t, reduction="sum"),
        )
        self.objective.rate = clip_rate(raw, method.rate_min, method.rate_max)
        return {"event": "rate", "step": step, "rate_estimate": raw, "rate": self.objective.rate, "grad_ff": stats.ff, "grad_fn": stats.fn, "grad_nn": stats.nn}

    def _log(self, record: dict[str, Any], metrics_file, history: list[dict[str, Any]]) -> dict[str, Any]:
        """Append the record (its public keys) to the history, metrics.jsonl and the experiment trackers; returns
        what was logged."""
        public = {k: v for k, v in record.items() if not k.startswith("_")}
        history.append(public)
        if metrics_file is not None:
            metrics_file.write(json.dumps(_strict_json(public), allow_nan=False) + "\n")
            metrics_file.flush()
        if self.accelerator.trackers:
            self.accelerator.log(tracker_scalars(public), step=public["step"])
        return public

    def _start_trackers(self) -> None:
        """The experiment trackers of ``train.report_to`` (accelerate's), named after the run folder, with every
        setting of the run as their config."""
        if not self.config.train.trackers():
            return
        settings = {
            f"{section}.{name}": value if isinstance(value, (int, float, str, bool)) else str(value)
            for section, values in self.config.to_dict().items() for name, value in values.items()
        }
        self.accelerator.init_trackers(self.output_dir.name, config=settings)

    def _save_checkpoint(self, step: int) -> Path:
        state: dict[str, Any] = {"fingerprint": self._fingerprint()}
        if self.objective.rate is not None:
            state["rate"] = self.objective.rate
        state["objective_state"] = self.objective.checkpoint_state()  # e.g. pdu's dual variable
        if self.evaluation is not None:
            state["evaluation"] = self.evaluation.state()
        tensors = {"reference_nll": self.data.reference_nll} if self.data.reference_nll is not None else {}
        return checkpoint.save_checkpoint(self.accelerator, self.output_dir, step, state, tensors, keep=self.config.train.save_total_limit)


def build_trainer(
    model: torch.nn.Module,
    tokenizer: Any,
    config: UnlearnConfig,
    *,
    objective: Optional[Objective] = None,
    accelerator=None,
    callbacks: Sequence[TrainerCallback] = (),
    evaluator: Optional[Evaluator] = None,
) -> UnlearningTrainer:
    """An :class:`UnlearningTrainer` for ``config``: its objective (unless given), and its data loaded, paired and
    tokenized (on the main process first, so that a pairing cache is computed once)."""
    objective = objective or build_objective(config.method, backend=config.train.backend)
    accelerator = accelerator or make_accelerator(config)
    normal = config.method.num_classes - 1 if objective.uses_normal else 0
    with accelerator.main_process_first():
        data = build_unlearning_data(config.data, tokenizer, normal_per_sample=normal)
    return UnlearningTrainer(
        model, tokenizer, data, config, objective=objective, accelerator=accelerator, callbacks=callbacks, evaluator=evaluator
    )

