"""The base of every unlearning method: :class:`Objective`, and the :class:`ObjectiveOutput` of one micro-batch.

Every objective is a mean over the forget samples of a per-sample loss; a micro-batch contributes

    loss = (1 / N) * sum_{b in micro-batch} L_b

where N is the number of forget samples in the whole accumulation window over all processes (the trainer
all-reduces it), so the gradient of a window is exactly that of one big batch. The methods themselves are in the
modules of this package, one per family; the registry of names is ``sga.methods.METHODS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from sga.config import DataConfig, MethodConfig
from sga.data.unlearning import UnlearningData


@dataclass
class ObjectiveOutput:
    """One micro-batch: its share of the window loss, and the per-sequence NLLs (detached) for logging.

    ``normal_nll`` is None when the normal sequences were not run (no normal data, or zero weight)."""

    loss: torch.Tensor
    forget_nll: torch.Tensor
    normal_nll: Optional[torch.Tensor] = None


class Objective:
    """Base class. Subclasses set ``name`` and implement :meth:`compute`.

    Class flags tell the trainer what a method needs: ``uses_normal`` (K-1 paired normal samples per
    forget sample), ``uses_reference_nll`` (each forget sample's summed NLL under the initial model, in
    ``batch["forget_reference_nll"]``), ``uses_reference_model`` (a frozen copy of the initial model in
    ``self.reference_model``).
    """

    name: ClassVar[str]
    # a smoothing rate the trainer may re-estimate during training (sga, sga_gls; ``adaptive_rate_every``)
    supports_adaptive_rate: ClassVar[bool] = False
    uses_normal: ClassVar[bool] = False
    uses_reference_nll: ClassVar[bool] = False
    uses_reference_model: ClassVar[bool] = False

    def __init__(self, *, backend: str = "auto") -> None:
        self.backend = backend
        self.reference_model: Optional[torch.nn.Module] = None
        self.rate: Optional[float] = None  # the smoothing rate of the methods that have one (logged each step)

    @classmethod
    def from_config(cls, config: MethodConfig, *, backend: str = "auto") -> "Objective":
        """Build the objective from the method section of a run config."""
        return cls(backend=backend)

    def compute(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], num_forget: torch.Tensor) -> ObjectiveOutput:
        """The micro-batch loss (sum of per-sample losses / ``num_forget``) and per-sequence NLLs.

        ``num_forget`` is the normalizer N (a 0-dim tensor on the batch's device); the trainer passes the
        window's forget count divided by the factors its backward pass and gradient averaging apply. The
        batch's labels are assumed checked against the model's vocabulary (``UnlearningData.check_labels``)."""
        raise NotImplementedError

    def describe(self) -> dict[str, float | str]:
        """The method's name and parameters, for logs."""
        return {"method": self.name}

    def implements(self, hook: str) -> bool:
        """Whether this method overrides the hook named ``hook`` (a trainer that cannot call a hook refuses the
        methods that implement it)."""
        return getattr(type(self), hook) is not getattr(Objective, hook)

    # Hooks: ``sga.engine.UnlearningTrainer`` calls each of them at its point of a run; the defaults do nothing.
    # ``sga.engine.hf_trainer.HFUnlearningTrainer`` cannot call prepare_data or after_step inside the HF Trainer's
    # loop, and refuses the methods that implement them (:meth:`implements`).

    def prepare_data(self, data: UnlearningData, tokenizer: Any, data_config: DataConfig) -> UnlearningData:
        """The training data this method needs, built from the run's data before training (e.g. dpo adds each
        forget sample's preferred answer). Default: the data unchanged."""
        return data

    def after_step(self, record: dict[str, Any], epochs_done: float) -> dict[str, Any]:
        """Called after every optimizer step with the step's logged record (all-reduced over processes); returns
        entries to add to it (e.g. pdu's dual variable). Default: nothing."""
        return {}

    def checkpoint_state(self) -> dict[str, Any]:
        """Mutable state a checkpoint must hold for an exact resume (e.g. pdu's dual variable). Default: none."""
        return {}

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` returned. Default: nothing to restore (refuses a non-empty state)."""
        if state:
            raise ValueError(f"method {self.name} keeps no checkpoint state, got {sorted(state)}")
