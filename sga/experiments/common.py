"""What ``sga demo`` and ``sga study`` share: the checks of their common options, the torch thread count, and the
trainer that tells them about every step."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from sga.config import ConfigError, UnlearnConfig
from sga.engine.evaluation import TrainerCallback
from sga.engine.trainer import UnlearningTrainer, build_trainer


def check_out_and_threads(out: Path, threads: Optional[int]) -> None:
    """The --out and --threads checks (ConfigError, one line)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a folder")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")


@contextmanager
def torch_threads(count: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` (None: left as it is) inside the block, restored after."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class OnStep(TrainerCallback):
    """Calls ``on_step(step, objective)`` after every optimizer step."""

    def __init__(self, on_step: Callable[[int, Any], None]) -> None:
        self.on_step = on_step

    def on_step_end(self, trainer, step: int, record: dict[str, Any]) -> None:
        self.on_step(step, trainer.objective)


def evaluating_trainer(
    model, tokenizer, config: UnlearnConfig, on_step: Optional[Callable[[int, Any], None]] = None
) -> UnlearningTrainer:
    """An UnlearningTrainer for ``config``; ``on_step(step, objective)`` runs after every optimizer step."""
    return build_trainer(model, tokenizer, config, callbacks=[OnStep(on_step)] if on_step is not None else [])
