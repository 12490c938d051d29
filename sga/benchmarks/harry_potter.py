"""The Harry Potter completion protocol for copyrighted-text unlearning.

We ship no book: the user supplies the text to forget as a plain-text file. It is cut into
consecutive windows of ``prompt_tokens + continuation_tokens`` tokens; the model continues each prompt
greedily for ``continuation_tokens`` tokens, and forgetting is scored by how much of the true
continuation it reproduces:
- bleu: mean sentence BLEU (sacrebleu, 0-100) of continuation vs ground truth;
- rouge_l_recall: mean ROUGE-L recall (stemmer on) of continuation vs ground truth.
Utility is the perplexity of the model on a held-out text (``metrics.perplexity``), scored in
consecutive windows of ``ppl_window`` tokens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .prompts import encode_continuation, encode_text_windows
from .scoring import greedy_generate, token_logprobs


@dataclass(frozen=True)
class CompletionPair:
    """A prompt cut from the book and the text that follows it there."""

    prompt: str
    continuation: str


def _read_text(source: str | os.PathLike, what: str) -> str:
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{what} file is empty: {path}")
    return text


def make_completion_pairs(
    text: str,
    tokenizer,
    *,
    prompt_tokens: int = 200,
    continuation_tokens: int = 200,
    max_pairs: int | None = 100,
) -> list[CompletionPair]:
    """Cut ``text`` into consecutive non-overlapping windows of ``prompt_tokens + continuation_tokens``
    tokens and split each into a prompt and its continuation (decoded back to text). With more windows
    than ``max_pairs``, ``max_pairs`` windows evenly spaced over the whole text are kept."""
    if prompt_tokens < 1 or continuation_tokens < 1:
        raise ValueError("prompt_tokens and continuation_tokens must be positive")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be positive or None, got {max_pairs}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    size = prompt_tokens + continuation_tokens
    n_windows = len(ids) // size
    if n_windows == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {size}")
    starts = [w * size for w in range(n_windows)]
    if max_pairs is not None and n_windows > max_pairs:
        starts = [starts[i] for i in np.linspace(0, n_windows - 1, max_pairs).round().astype(int)]
    return [
        CompletionPair(
            prompt=tokenizer.decode(ids[s : s + prompt_tokens]),
            continuation=tokenizer.decode(ids[s + prompt_tokens : s + size]),
        )
        for s in starts
    ]


def evaluate_harry_potter(
    model,
    tokenizer,
    book: str | os.PathLike,
    heldout: str | os.PathLike,
    *,
    prompt_tokens: int = 200,
    continuation_tokens: int = 200,
    max_pairs: int | None = 100,
    batch_size: int = 8,
    ppl_window: int = 512,
) -> dict[str, Any]:
    """Score forgetting of a book (completion BLEU and ROUGE-L recall) and utility (held-out perplexity).

    Args:
        book: path of a UTF-8 plain-text file with the text to forget.
        heldout: path of a UTF-8 plain-text file the model should still model well.
        prompt_tokens / continuation_tokens: window split; the model generates ``continuation_tokens``.
        max_pairs: number of completion pairs (evenly spaced over the book); None for all windows.
        ppl_window: tokens per perplexity window.

    Returns ``bleu``, ``rouge_l_recall``, ``perplexity``, ``n_pairs`` and ``settings``.
    """
    if batch_size < 1 or ppl_window < 1:
        raise ValueError("batch_size and ppl_window must be positive")
    book_text = _read_text(book, "book")
    heldout_text = _read_text(heldout, "held-out text")
    pairs = make_completion_pairs(
        book_text, tokenizer, prompt_tokens=prompt_tokens, continuation_tokens=continuation_tokens, max_pairs=max_pairs
    )
    windows = encode_text_windows(tokenizer, heldout_text, window=ppl_window)
    prompts = [encode_continuation(tokenizer, p.prompt, p.continuation).prompt_ids for p in pairs]
    generations = greedy_generate(
        model, tokenizer, prompts, max_new_tokens=continuation_tokens, batch_size=batch_size, desc="book: generating"
    )
    references = [p.continuation for p in pairs]
    return {
        "bleu": float(np.mean(metrics.sentence_bleu(generations, references))),
        "rouge_l_recall": float(np.mean(metrics.rouge_l(generations, references, measure="recall", use_stemmer=True))),
        "perplexity": metrics.perplexity(
            token_logprobs(model, windows, batch_size=batch_size, desc="held-out: scoring")
        ),
        "n_pairs": len(pairs),
        "settings": {
            "benchmark": "harry_potter",
            "book": os.fspath(book),
            "heldout": os.fspath(heldout),
            "prompt_tokens": prompt_tokens,
            "continuation_tokens": continuation_tokens,
            "ppl_window": ppl_window,
        },
    }
