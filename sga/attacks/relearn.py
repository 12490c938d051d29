"""Relearning attacks: fine-tune a copy of a model on a small set, through the engine's own fine-tuning (the ``sft``
method of ``sga.engine``: deterministic in the seed), and measure the forget set again.

Three relearning sets (``RELEARN_SETS``):

- ``forget``: the forget set itself, every question measured (open-unlearning's meta-evaluation as the UDS paper
  reimplements it: 1 epoch, lr 2e-5, effective batch 32);
- ``split``: half of the forget questions, the other half measured (RTT, Deeb & Roger, arXiv 2410.08827): the
  halves are a permutation of the questions seeded by the relearning seed, the first floor(n/2) relearned;
- ``related``: a small related set, the forget set measured (benign relearning, Hu et al., arXiv 2406.13356; for
  TOFU, questions about retain authors).

The retain model (never trained on the forget set) is relearned the same way; the score of each metric is R of
``sga.attacks.scores`` on the two changes d = after - before.
"""
from __future__ import annotations

import copy
import gc
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from sga.config import (
    ConfigError,
    DataConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
    UnlearnConfig,
)
from sga.data.records import check_records, encode_record
from sga.data.unlearning import UnlearningData
from sga.engine.trainer import UnlearningTrainer

RELEARN_SETS = ("forget", "split", "related")


@dataclass(frozen=True)
class RelearnSettings:
    """One relearning attack: the set (``RELEARN_SETS``), epochs, learning rate, effective batch (capped at the
    set's size, so that an epoch is one pass over it), seed and the tokens kept per sequence."""

    relearn_set: str = "forget"
    epochs: int = 1
    lr: float = 2e-5
    batch_size: int = 32
    seed: int = 0
    max_length: int = 256

    @property
    def name(self) -> str:
        """The attack's name in results and logs: ``relearn_<set>``."""
        return f"relearn_{self.relearn_set}"

    def validate(self) -> "RelearnSettings":
        """ConfigError (one line) on a bad value; returns self."""
        if self.relearn_set not in RELEARN_SETS:
            raise ConfigError(f"relearn set must be one of {', '.join(RELEARN_SETS)}; got {self.relearn_set!r}")
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"relearn {name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ConfigError(f"relearn lr must be a positive number, got {self.lr}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def split_halves(n: int, seed: int) -> tuple[list[int], list[int]]:
    """(relearned, measured) question indices of the ``split`` set: a permutation of range(n) seeded by ``seed``,
    its first floor(n / 2) relearned and the rest measured, each half in ascending order."""
    if n < 2:
        raise ValueError(f"the split relearning set needs at least 2 forget questions, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[: n // 2]), sorted(order[n // 2 :])


def relearn_plan(settings: RelearnSettings, forget: Sequence[dict], related: Sequence[dict] = ()) -> tuple[list[dict], list[int]]:
    """(records to relearn on, indices of the forget questions to measure) for ``settings`` (module docstring)."""
    if settings.relearn_set == "forget":
        return list(forget), list(range(len(forget)))
    if settings.relearn_set == "split":
        learned, measured = split_halves(len(forget), settings.seed)
        return [forget[i] for i in learned], measured
    if not related:
        raise ValueError("the related relearning set needs related records (for TOFU: retain authors' questions)")
    return list(related), list(range(len(forget)))


def relearn(
    model: torch.nn.Module, tokenizer, records: Sequence[dict], settings: RelearnSettings, *,
    work_dir: Optional[Path] = None, use_chat_template: bool = False, backend: str = "auto",
) -> torch.nn.Module:
    """A copy of ``model`` fine-tuned on ``records`` ({question, answer} or {text}) with ``settings``: the ``sft``
    objective of ``sga.methods`` in ``sga.engine``'s trainer, batch min(batch_size, len(records)), AdamW, linear
    decay without warmup, the gradient clipped at norm 1. ``model`` itself is not changed. The trainer's files go
    to a temporary folder (inside ``work_dir`` when given), deleted after; the copy is returned in eval mode."""
    settings.validate()
    records = check_records(list(records), "the relearning set")
    examples = [encode_record(tokenizer, r, max_length=settings.max_length, use_chat_template=use_chat_template) for r in records]
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="sga-relearn-", dir=work_dir))
    config = UnlearnConfig(
        model=ModelConfig(name_or_path="(in memory)"),
        data=DataConfig(dataset="json", max_length=settings.max_length, chat_template="yes" if use_chat_template else "no"),
        method=MethodConfig(name="sft"),
        train=TrainConfig(
            output_dir=str(folder), seed=settings.seed, epochs=settings.epochs, batch_size=min(settings.batch_size, len(records)),
            learning_rate=settings.lr, progress=False, backend=backend,
        ),
    )
    learner = copy.deepcopy(model)
    try:
        result = UnlearningTrainer(learner, tokenizer, UnlearningData(examples, []), config).train()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        gc.collect()
    if result.status == "interrupted":
        raise KeyboardInterrupt(f"relearning interrupted at step {result.step}")
    if result.status != "completed":
        raise RuntimeError(f"relearning ended with status {result.status} at step {result.step}: {result.reason}")
    return learner.eval()
