"""Unlearning inside Hugging Face's ``transformers.Trainer``: any registered objective, switched by name.

:class:`HFUnlearningTrainer` is a ``Trainer`` whose training samples are forget samples of an
:class:`sga.data.unlearning.UnlearningData` (each with its K-1 paired normal samples) and whose loss is an objective of
:mod:`sga.methods` (``ga``, ``sga``, ``npo``, ...), so frameworks built on the HF Trainer (callbacks,
logging, checkpoints, DeepSpeed / FSDP through accelerate) run these methods by name::

    trainer = HFUnlearningTrainer(model, TrainingArguments(...), data=data, method="sga", pad_token_id=0)
    trainer.train()

Normalization is the one of :mod:`sga.methods.base`: a micro-batch contributes (sum of its per-sample losses) / N
with N the forget samples of the whole gradient-accumulation window over all processes (the Trainer's
``num_items_in_batch``, counted here in forget samples instead of label tokens), so a window's gradient is that
of the mean loss over its samples whatever the accumulation and the number of processes.

Logs. Beside the Trainer's ``loss`` and ``learning_rate``, every logging step carries the objective's
``forget_nll`` and ``normal_nll`` (means over the sequences since the last log, all processes) and its
smoothing ``rate`` when it has one; with ``evaluator`` and ``eval_every`` the evaluator's metrics are logged as
``eval_<metric>`` every ``eval_every`` steps. They reach every integration of ``TrainingArguments.report_to``
(TensorBoard, W&B, MLflow, trackio), as the same values reach ``sga unlearn --report-to``.

For plain fine-tuning with the fused loss under any HF Trainer, :func:`sga.hf.fused_causal_lm_loss` patches the
model instead (the Trainer's ``num_items_in_batch`` reaches it as the normalizer).
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch
from transformers import Trainer, TrainerCallback

from sga.config import MethodConfig
from sga.data.unlearning import UnlearningData
from sga.engine.evaluation import Evaluator, scalar_metrics
from sga.hf.distributed import call_inside
from sga.methods import Objective, build_objective
from sga.methods.sequence_nll import reference_sequence_nll


class ForgetIndexDataset(torch.utils.data.Dataset):
    """The forget-sample indices 0..n-1; the collator turns a list of them into an unlearning batch."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> int:
        return index


class UnlearningCollator:
    """Collates forget indices into :meth:`sga.data.unlearning.UnlearningData.batch` (forget and paired normal tensors)."""

    def __init__(self, data: UnlearningData, pad_token_id: int) -> None:
        self.data = data
        self.pad_token_id = pad_token_id

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.data.batch(indices, self.pad_token_id)


def _needs_the_engine(objective: Objective) -> Optional[str]:
    """Why an objective needs a hook of sga's own trainer that this Trainer lacks, or None: extra data built
    before training (dpo / idk_dpo: preferred answers), an update after each optimizer step (pdu: the dual
    variable), or forward passes of its own through a frozen copy and the model (undial, rmu, grad_diff with
    KL), which cannot run while the model's forward is the objective (``call_inside``)."""
    if objective.implements("prepare_data"):
        return "builds extra training data before training (prepare_data)"
    if objective.implements("after_step"):
        return "updates its own state after every optimizer step (after_step)"
    if objective.uses_reference_model:
        return "runs forward passes of the model and a frozen reference copy of its own"
    return None


def _objective_from(method: Union[str, MethodConfig, Objective], backend: str) -> Objective:
    if isinstance(method, Objective):
        return method
    if isinstance(method, str):
        method = MethodConfig(name=method)
    if not isinstance(method, MethodConfig):
        raise TypeError(f"method must be a method name, a MethodConfig or an Objective, got {type(method).__name__}")
    method.validate()
    return build_objective(method, backend=backend)


class _EvaluateEvery(TrainerCallback):
    """Runs the trainer's evaluator after every ``eval_every``-th optimizer step (on the main process, the metrics
    broadcast) and logs its metrics as ``eval_<name>``."""

    def __init__(self, trainer: "HFUnlearningTrainer", evaluator: Evaluator, eval_every: int) -> None:
        self.trainer, self.evaluator, self.eval_every = trainer, evaluator, eval_every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_every:
            return control
        from accelerate.utils import broadcast_object_list

        trainer = self.trainer
        outcome: list[Any] = [None]
        if trainer.is_world_process_zero():
            model = trainer.accelerator.unwrap_model(trainer.model)
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
                outcome[0] = scalar_metrics(self.evaluator(model, trainer.processing_class, state.global_step))
        if trainer.args.world_size > 1:
            broadcast_object_list(outcome)
        should_log = control.should_log  # the Trainer's log of this step's loss comes after; logging resets the flag
        trainer.log({f"eval_{name}": value for name, value in outcome[0].items() if value is not None})
        control.should_log = should_log
        return control


class HFUnlearningTrainer(Trainer):
    """A ``transformers.Trainer`` that runs an unlearning objective of :mod:`sga.methods.base` on forget samples.

    Args:
        model: the causal LM (a verified family of :mod:`sga.hf`; peft-wrapped works).
        args: ``TrainingArguments``; ``per_device_train_batch_size`` counts forget samples.
        data: forget sequences and, for methods with normal data, their pairs (``sga.data.unlearning.build_unlearning_data``).
        method: a registered method name (defaults of :class:`sga.config.MethodConfig`), a ``MethodConfig``, or an
            :class:`sga.methods.base.Objective`.
        pad_token_id: the id batches are padded with.
        backend: the loss kernel backend ("auto", "triton", "torch").
        evaluator: ``(model, tokenizer, step) -> metrics`` (e.g. ``sga.engine.evaluation.benchmark_evaluator(config)``),
            run every ``eval_every`` optimizer steps; its metrics are logged as ``eval_<name>``.
        eval_every: the evaluator's period in optimizer steps (with ``evaluator``).
        **kwargs: passed to ``Trainer`` (callbacks, optimizers, processing_class, ...); ``train_dataset`` and
            ``data_collator`` are this class's own.

    For ``npo`` the forget samples' reference NLLs under the initial model are computed here, before training,
    unless ``data.reference_nll`` is set; for ``grad_diff`` with ``retain_loss="kl"`` a frozen copy of the initial
    model is kept. Logged ``loss`` values are the objective's.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args,
        *,
        data: UnlearningData,
        method: Union[str, MethodConfig, Objective] = "sga",
        pad_token_id: int,
        backend: str = "auto",
        evaluator: Optional[Evaluator] = None,
        eval_every: int = 0,
        **kwargs: Any,
    ) -> None:
        if (evaluator is None) != (eval_every == 0) or eval_every < 0:
            raise ValueError(f"evaluator and eval_every > 0 go together, got evaluator={evaluator!r}, eval_every={eval_every}")
        for own in ("train_dataset", "data_collator"):
            if own in kwargs:
                raise TypeError(f"HFUnlearningTrainer builds {own} from `data`; do not pass it")
        if not isinstance(data, UnlearningData):
            raise TypeError(f"data must be an sga.data.unlearning.UnlearningData, got {type(data).__name__}")
        objective = _objective_from(method, backend)
        unsupported = _needs_the_engine(objective)
        if unsupported:
            raise NotImplementedError(
                f"HFUnlearningTrainer cannot run method {objective.name!r} yet: it {unsupported}; run it with "
                "`sga unlearn` (sga.engine.trainer.UnlearningTrainer), which has those hooks"
            )
        if objective.uses_normal and data.pairs is None:
            raise ValueError(f"method {objective.name} needs normal data: build the data with pairs")
        if objective.uses_reference_model and objective.reference_model is None:
            objective.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        if objective.uses_reference_nll and data.reference_nll is None:
            data.reference_nll = reference_sequence_nll(
                model, data.forget, pad_token_id=pad_token_id, batch_size=args.per_device_train_batch_size, backend=backend
            )
        self.objective = objective
        super().__init__(
            model=model,
            args=args,
            train_dataset=ForgetIndexDataset(len(data)),
            data_collator=UnlearningCollator(data, pad_token_id),
            **kwargs,
        )
        # compute_loss returns the window-normalized loss: the Trainer must not divide it by the accumulation steps
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        # forget NLL sum and count, normal NLL sum and count since the last log (training steps only)
        self._nll_sums = torch.zeros(4, dtype=torch.float64, device=self.args.device)
        if evaluator is not None:
            self.add_callback(_EvaluateEvery(self, evaluator, eval_every))

    def _get_collator_with_removed_columns(self, data_collator, description: Optional[str] = None):
        return data_collator  # the batches' keys are the objective's, not the model forward's arguments

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """N: the forget samples of the accumulation window, summed over all processes."""
        count = torch.tensor(float(sum(batch["forget_input_ids"].shape[0] for batch in batch_samples)), device=device)
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return count

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if num_items_in_batch is None:  # evaluation / prediction steps: the micro-batch is the whole window
            forget = inputs["forget_input_ids"]
            num_items_in_batch = torch.tensor(float(forget.shape[0]), device=forget.device)
        # distributed backends average the gradients over processes: normalizing by N / P makes the average that
        # of the window's mean loss (and leaves the fused loss a grad_output of exactly 1)
        normalizer = num_items_in_batch / self.accelerator.num_processes
        inner = self.accelerator.unwrap_model(model)

        def objective_forward(batch):
            out = self.objective.compute(inner, batch, normalizer)
            normal = out.normal_nll if out.normal_nll is not None else out.forget_nll.new_zeros(0)
            return out.loss, out.forget_nll, normal

        # the objective runs as the model's forward, called through the Trainer's wrapper (DDP, FSDP, DeepSpeed), so
        # the wrapper prepares its gradient reduction as for any forward
        loss, forget_nll, normal_nll = call_inside(inner, objective_forward, inputs, through=model)
        if model.training:
            self._nll_sums += torch.stack([
                forget_nll.detach().double().sum(), torch.tensor(float(forget_nll.numel()), dtype=torch.float64, device=forget_nll.device),
                normal_nll.detach().double().sum(), torch.tensor(float(normal_nll.numel()), dtype=torch.float64, device=forget_nll.device),
            ]).to(self._nll_sums.device)
        return (loss, {"forget_nll": forget_nll}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with the objective's forget / normal NLL since the last log and its rate added to
        every training log (module docstring)."""
        if "loss" in logs:
            sums = self._nll_sums
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            forget_sum, forget_count, normal_sum, normal_count = sums.tolist()
            if forget_count:
                logs["forget_nll"] = forget_sum / forget_count
            if normal_count:
                logs["normal_nll"] = normal_sum / normal_count
            if self.objective.rate is not None:
                logs["rate"] = self.objective.rate
            self._nll_sums.zero_()
        super().log(logs, *args, **kwargs)
