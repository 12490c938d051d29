"""Model-side helpers: batched per-token log-probabilities (and the richer ``TokenStatistics``) of
labelled tokens, per-example gradient norms, memorization scores, and batched greedy generation.
Scoring and generation sort their inputs by length so batches carry little padding, show a tqdm
progress bar on a terminal (none in a log file; silence it with ``TQDM_DISABLE=1``), run under ``torch.inference_mode`` with the model in
eval mode, and hand the model back in the mode it came in.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics
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


def _labelled_logits(
    model: torch.nn.Module, examples: Sequence[EncodedExample], batch_size: int, desc: str
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(example index, fp32 logits [T, V] at the positions that predict its T labelled tokens, those
    labels [T]) for every example, batched by length under ``evaluating``. Right padding with an
    attention mask; logits at position t score the label at t + 1."""
    for i, example in enumerate(examples):
        if not any(label != IGNORE_INDEX for label in example.labels[1:]):
            raise ValueError(f"example {i} has no labelled token to score")
    device = _device(model)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    with evaluating(model):
        for batch in tqdm(_batches(order, batch_size), desc=desc, leave=False, disable=None):
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
                yield i, logits[row, :-1][keep].float(), targets[row][keep]


def token_logprobs(
    model: torch.nn.Module,
    examples: Sequence[EncodedExample],
    *,
    batch_size: int = 8,
    desc: str = "scoring",
) -> list[np.ndarray]:
    """Log-probability log p(x_t | x_<t) of every labelled token of every example, in input order.

    The token-mean NLL of example i (TOFU's "avg loss") is ``-result[i].mean()``.
    """
    results: list[np.ndarray | None] = [None] * len(examples)
    for i, logits, targets in _labelled_logits(model, examples, batch_size, desc):
        # log p(label_{t+1} | x_<=t) = -CE(logits_t, label_{t+1}), in fp32.
        nll = F.cross_entropy(logits, targets, reduction="none")
        results[i] = (-nll).cpu().numpy().astype(np.float64)
    return results  # type: ignore[return-value]


_STATISTICS_CHUNK = 512  # token rows per softmax in token_statistics


@dataclass(frozen=True)
class TokenStatistics:
    """What the memorization and membership-inference metrics need of each labelled token t of one
    example, with p = softmax(z_t) the model's next-token distribution there:
    ``logprobs`` log p(y_t), ``predictions`` argmax_v p_v (teacher-forced greedy), ``labels`` y_t,
    ``expected_logprob`` mu_t = sum_v p_v log p_v and ``logprob_variance``
    sigma_t^2 = sum_v p_v (log p_v)^2 - mu_t^2 (Min-K%++'s normalizers)."""

    logprobs: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray
    expected_logprob: np.ndarray
    logprob_variance: np.ndarray

    def without_last(self) -> "TokenStatistics":
        """The same statistics without the last labelled token (open-unlearning's token-wise metrics,
        Min-K, Min-K++, gradient norm, exact memorization and extraction strength, leave it out)."""
        return TokenStatistics(*(getattr(self, f.name)[:-1] for f in fields(self)))


def token_statistics(
    model: torch.nn.Module,
    examples: Sequence[EncodedExample],
    *,
    batch_size: int = 8,
    desc: str = "scoring",
) -> list[TokenStatistics]:
    """``TokenStatistics`` of every example, in input order (one forward pass per batch)."""
    results: list[TokenStatistics | None] = [None] * len(examples)
    for i, logits, targets in _labelled_logits(model, examples, batch_size, desc):
        columns: list[list[np.ndarray]] = [[], [], [], [], []]
        for start in range(0, len(targets), _STATISTICS_CHUNK):  # bounded [chunk, V] fp32 temporaries
            z, y = logits[start : start + _STATISTICS_CHUNK], targets[start : start + _STATISTICS_CHUNK]
            logp = torch.log_softmax(z, dim=-1)
            p = logp.exp()
            mu = (p * logp).sum(-1)
            variance = (p * logp.square()).sum(-1) - mu.square()
            for column, value in zip(columns, (logp.gather(1, y[:, None])[:, 0], z.argmax(-1), y, mu, variance)):
                column.append(value.cpu().numpy())
        logprobs, predictions, labels, mu, variance = (np.concatenate(c) for c in columns)
        results[i] = TokenStatistics(
            logprobs.astype(np.float64), predictions, labels, mu.astype(np.float64), variance.astype(np.float64)
        )
    return results  # type: ignore[return-value]


def gradient_norms(
    model: torch.nn.Module, examples: Sequence[EncodedExample], *, p: float = 2.0, desc: str = "gradient norms"
) -> list[float]:
    """Per example: the mean over the model's trainable parameters W of ||dl/dW||_p, with l the
    token-mean NLL of the example's labelled tokens but the last (open-unlearning's gradient-norm MIA
    statistic, one example per backward pass). Parameters that get no gradient are skipped. The
    model's ``.grad`` buffers are left untouched (``torch.autograd.grad``); dropout is off (eval mode)."""
    if p not in (1.0, 2.0, float("inf")):
        raise ValueError(f"p must be 1, 2 or inf, got {p}")
    params = [w for w in model.parameters() if w.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to take gradient norms of")
    device = _device(model)
    norms = []
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for i, example in enumerate(tqdm(examples, desc=desc, leave=False, disable=None)):
                labels = torch.tensor(example.labels[1:], device=device)
                positions = torch.nonzero(labels != IGNORE_INDEX)[:, 0][:-1]
                if positions.numel() == 0:
                    raise ValueError(f"example {i} needs at least two labelled tokens for a gradient norm")
                ids = torch.tensor([example.input_ids], device=device)
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
                loss = F.cross_entropy(logits[positions].float(), labels[positions])
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                norms.append(float(torch.stack([g.norm(p=p) for g in grads if g is not None]).mean()))
    finally:
        model.train(was_training)
    return norms


def memorization(examples_statistics: Sequence[TokenStatistics], *, convention: str = "open-unlearning") -> dict[str, list]:
    """Exact memorization and extraction strength (``metrics``) of each example from its token
    statistics, the last labelled token left out as open-unlearning does. An example left with no token
    gets EM None (left out of the mean) and ES 0, again as open-unlearning does."""
    em: list[float | None] = []
    es: list[float] = []
    for stats in examples_statistics:
        kept = stats.without_last()
        if kept.labels.size == 0:
            em.append(None)
            es.append(0.0)
            continue
        em.append(metrics.exact_memorization(kept.predictions, kept.labels))
        es.append(metrics.extraction_strength(kept.predictions, kept.labels, convention=convention))
    return {"exact_memorization": em, "extraction_strength": es}


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
        for batch in tqdm(_batches(order, batch_size), desc=desc, leave=False, disable=None):
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
