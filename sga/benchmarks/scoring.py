"""Model-side helpers: batched per-token log-probabilities of labelled tokens and batched greedy
generation. Both sort their inputs by length so batches carry little padding, show a tqdm progress bar
(silence it with ``TQDM_DISABLE=1``), run under ``torch.inference_mode`` with the model in eval mode,
and hand the model back in the mode it came in.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .prompts import IGNORE_INDEX, EncodedExample


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; the model's previous train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def token_logprobs(
    model: torch.nn.Module,
    examples: Sequence[EncodedExample],
    *,
    batch_size: int = 8,
    desc: str = "scoring",
) -> list[np.ndarray]:
    """Log-probability log p(x_t | x_<t) of every labelled token of every example, in input order.

    Batches are right-padded with an attention mask; logits at position t score the label at t + 1.
    The token-mean NLL of example i (TOFU's "avg loss") is ``-result[i].mean()``.
    """
    for i, example in enumerate(examples):
        if not any(label != IGNORE_INDEX for label in example.labels[1:]):
            raise ValueError(f"example {i} has no labelled token to score")
    device = _device(model)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    results: list[np.ndarray | None] = [None] * len(examples)
    with evaluating(model):
        for batch in tqdm(_batches(order, batch_size), desc=desc, leave=False):
            width = len(examples[batch[0]].input_ids)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(examples[i].input_ids)
                input_ids[row, :n] = torch.tensor(examples[i].input_ids)
                labels[row, :n] = torch.tensor(examples[i].labels)
                attention_mask[row, :n] = 1
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
            ).logits
            targets = labels[:, 1:].to(device)
            for row, i in enumerate(batch):
                keep = targets[row] != IGNORE_INDEX
                # log p(label_{t+1} | x_<=t) = -CE(logits_t, label_{t+1}); fp32 row by row.
                nll = F.cross_entropy(logits[row, :-1][keep].float(), targets[row][keep], reduction="none")
                results[i] = (-nll).cpu().numpy().astype(np.float64)
    return results  # type: ignore[return-value]


def _generation_config(model, tokenizer, max_new_tokens: int, stop_strings: Sequence[str]):
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    if pad is None:
        raise ValueError("batched generation needs a pad or EOS token id: the tokenizer and model have neither")
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        stop_strings=list(stop_strings) or None,
    )


def greedy_generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    stop_strings: Sequence[str] = (),
    desc: str = "generating",
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens, in input order.

    Batches are left-padded so that every prompt ends where generation starts. A continuation stops
    at EOS, after ``max_new_tokens`` tokens, or at the first of ``stop_strings``; the text is cut before
    that stop string and stripped of surrounding whitespace.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    config = _generation_config(model, tokenizer, max_new_tokens, stop_strings)
    device = _device(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str | None] = [None] * len(prompts)
    with evaluating(model):
        for batch in tqdm(_batches(order, batch_size), desc=desc, leave=False):
            width = len(prompts[batch[0]])
            input_ids = torch.full((len(batch), width), config.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(prompts[i])
                input_ids[row, width - n :] = torch.tensor(list(prompts[i]))
                attention_mask[row, width - n :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                tokenizer=tokenizer,  # used for the stop strings
            )
            decoded = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            for i, text in zip(batch, decoded):
                for stop in stop_strings:
                    text = text.split(stop)[0]
                texts[i] = text.strip()
    return texts  # type: ignore[return-value]
