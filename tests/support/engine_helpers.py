"""Shared pieces of the unlearning-engine tests: tiny data, a tiny model that has memorized it, configs.

The "memorized" model is a tiny random Llama trained by plain descent on the forget and retain answers
until their NLL is low, so that unlearning has something to remove (on a random model every answer is
near log V and methods such as SimNPO have a vanishing gradient there).
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

from sga.benchmarks.synthetic import generate_synthetic_tofu
from sga.config import UnlearnConfig
from sga.data.pairing import pair_normal_samples
from sga.data.unlearning import UnlearningData, encode_record, record_text
from sga.methods.sequence_nll import examples_nll, joint_sequence_nll
from sga.models import tiny_random_model, tiny_tokenizer


@functools.lru_cache(maxsize=None)
def records() -> tuple[list[dict], list[dict]]:
    """Forget (one fictitious author, 10 QA) and retain (3 authors, 30 QA) records."""
    splits = generate_synthetic_tofu(4, seed=0)
    return splits["forget10"], splits["retain90"]


def tokenizer():
    return tiny_tokenizer()


def unlearning_data(tok, num_classes: int = 2, *, normal: bool = True, max_length: int = 128) -> UnlearningData:
    """Encoded forget / retain data with TF-IDF pairs (no cache)."""
    forget_records, retain_records = records()
    forget = [encode_record(tok, r, max_length=max_length) for r in forget_records]
    if not normal:
        return UnlearningData(forget, [])
    retain = [encode_record(tok, r, max_length=max_length) for r in retain_records]
    pairs = pair_normal_samples(
        [record_text(r) for r in forget_records], [record_text(r) for r in retain_records], num_classes, method="tfidf", cache_dir=None
    )
    return UnlearningData(forget, retain, pairs)


@functools.lru_cache(maxsize=None)
def _memorized_state(arch: str, steps: int) -> dict[str, torch.Tensor]:
    tok = tokenizer()
    model = tiny_random_model(arch, tok, seed=0)
    data = unlearning_data(tok)
    everything = UnlearningData(data.forget + data.normal, [])
    batch = everything.batch(list(range(len(everything))), tok.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(steps):
            (nll,) = joint_sequence_nll(model, batch, ("forget",), smoothing=0.0, backend="torch")
            optimizer.zero_grad()
            nll.mean().backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def memorized_model(arch: str = "llama", steps: int = 40):
    """A fresh copy of a tiny model trained on the forget and retain answers (cached per process)."""
    tok = tokenizer()
    model = tiny_random_model(arch, tok, seed=0)
    model.load_state_dict(copy.deepcopy(_memorized_state(arch, steps)))
    return model.eval()


def make_config(output_dir: Path, method: str = "sga", **settings) -> UnlearnConfig:
    """A small run config; ``settings`` are ``field=value`` of any section (names are unique)."""
    config = UnlearnConfig()
    config.model.name_or_path = "tiny"
    config.method.name = method
    config.train.output_dir = str(output_dir)
    config.train.batch_size = 4
    config.train.max_steps = 3
    config.train.learning_rate = 1e-3
    config.train.max_grad_norm = None
    config.train.progress = False
    config.train.backend = "torch"
    config.data.pairing = "tfidf"
    for key, value in settings.items():
        for section in ("model", "data", "method", "train"):
            if hasattr(getattr(config, section), key):
                setattr(getattr(config, section), key, value)
                break
        else:
            raise KeyError(key)
    return config.validate()


def mean_nll(model, examples, tok) -> float:
    """Mean over examples of the token-mean answer NLL."""
    return examples_nll(model, examples, pad_token_id=tok.pad_token_id, backend="torch").mean().item()
