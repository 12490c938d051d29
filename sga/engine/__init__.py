"""The unlearning engine: the training loop (``trainer``), the same objectives inside Hugging Face's Trainer
(``hf_trainer``, imported on its own), checkpoints (``checkpoint``), evaluation during training (``evaluation``)
and the whole check of a run configuration (``run_config``)."""
from sga.engine.evaluation import TrainerCallback
from sga.engine.run_config import check_run_config
from sga.engine.trainer import (
    TrainResult,
    UnlearningTrainer,
    build_trainer,
    make_accelerator,
)

__all__ = ["TrainResult", "TrainerCallback", "UnlearningTrainer", "build_trainer", "check_run_config", "make_accelerator"]
