"""MUSE-News (Shi et al., 2024): unlearning BBC news articles.

Data: the layout of the ``muse-bench/MUSE-News`` hub dataset, one (subset, split) pair per file,
read from ``<data_dir>/<subset>/<split>.json`` (a JSON array or JSON lines; the MUSE repository's own
layout) or, when no folder is given, from the hub through ``datasets``:
- raw:      forget, retain1, retain2, holdout          {"text"}  (training corpora)
- verbmem:  forget                                     {"prompt", "gt"}
- knowmem:  forget_qa, retain_qa (+ _icl few-shot)     {"question", "answer"}
- privleak: forget, retain, holdout                    {"text"}

Metrics, as MUSE's ``eval.py`` computes them (ROUGE here on a 0-1 scale, MUSE prints x100):
- verbmem_f: mean ROUGE-L F1 (no stemmer) of greedy continuations of the verbmem prompts (128 new
  tokens) against the ground-truth continuations;
- knowmem_f / knowmem_r: mean ROUGE-L F1 of greedy answers (32 new tokens) to the forget / retain
  questions, prompted with the split's in-context examples;
- mia_min_k_auc: AUC of the Min-40% Prob score separating privleak forget texts (members) from holdout
  texts, conventional orientation (1: forget set fully exposed);
- privleak: MUSE's PrivLeak in percent against the retain model's AUC (``metrics.privleak``), when
  ``retain_auc`` (that model's ``mia_min_k_auc``) is given.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import metrics
from .prompts import PLAIN_STOP_STRINGS, encode_continuation, encode_qa, encode_text, resolve_chat_template
from .scoring import greedy_generate, token_logprobs
from .tofu import read_json_records

HUB_DATASET = "muse-bench/MUSE-News"
# subset -> (splits, keys every record of the subset carries)
SUBSETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "raw": (("forget", "retain1", "retain2", "holdout"), ("text",)),
    "verbmem": (("forget",), ("prompt", "gt")),
    "knowmem": (("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"), ("question", "answer")),
    "privleak": (("forget", "retain", "holdout"), ("text",)),
}
METRICS = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak")


def load_muse_split(subset: str, split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The records of one MUSE-News (subset, split): from ``<data_dir>/<subset>/<split>.json``, or from
    the ``muse-bench/MUSE-News`` hub dataset when ``data_dir`` is None (needs ``datasets``)."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown MUSE subset {subset!r}; expected one of {sorted(SUBSETS)}")
    splits, keys = SUBSETS[subset]
    if split not in splits:
        raise ValueError(f"unknown split {split!r} of MUSE subset {subset!r}; expected one of {splits}")
    if data_dir is not None:
        source = Path(data_dir) / subset / f"{split}.json"
        records = read_json_records(source)
    else:
        import datasets

        source = HUB_DATASET
        records = [dict(row) for row in datasets.load_dataset(HUB_DATASET, subset, split=split)]
    if not records:
        raise ValueError(f"MUSE {subset}/{split} from {source} is empty")
    for i, record in enumerate(records):
        missing = [key for key in keys if not isinstance(record.get(key), str)]
        if missing:
            raise ValueError(f"record {i} of MUSE {subset}/{split} ({source}) lacks text fields {missing}")
    return records


def _knowmem(
    model, tokenizer, qa: list[dict], icl: list[dict], *, chat: bool, batch_size: int, max_new_tokens: int, name: str
) -> float:
    shots = [(shot["question"], shot["answer"]) for shot in icl]
    prompts = [
        encode_qa(tokenizer, r["question"], r["answer"], few_shot=shots, use_chat_template=chat).prompt_ids for r in qa
    ]
    answers = greedy_generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        stop_strings=() if chat else PLAIN_STOP_STRINGS, desc=f"{name}: generating",
    )
    return float(np.mean(metrics.rouge_l(answers, [r["answer"] for r in qa], measure="fmeasure", use_stemmer=False)))


def _min_k_scores(
    model, tokenizer, records: list[dict], *, k: float, max_length: int | None, batch_size: int, name: str
) -> list[float]:
    examples = [encode_text(tokenizer, r["text"], max_length=max_length) for r in records]
    logprobs = token_logprobs(model, examples, batch_size=batch_size, desc=f"{name}: scoring")
    return [metrics.min_k_percent_prob(lp, k) for lp in logprobs]


def evaluate_muse(
    model,
    tokenizer,
    data_dir: str | os.PathLike | None = None,
    *,
    metrics_to_run: Sequence[str] = METRICS,
    retain_auc: float | None = None,
    max_samples: int | None = None,
    batch_size: int = 8,
    verbmem_max_new_tokens: int = 128,
    knowmem_max_new_tokens: int = 32,
    min_k: float = 0.4,
    max_length: int | None = 2048,
    use_chat_template: bool | None = None,
) -> dict[str, Any]:
    """Evaluate a model on MUSE-News.

    Args:
        data_dir: folder laid out as ``<subset>/<split>.json``; None reads the hub dataset.
        metrics_to_run: any of "verbmem_f", "knowmem_f", "knowmem_r", "privleak" ("privleak" computes
            ``mia_min_k_auc`` and, with ``retain_auc``, the PrivLeak itself).
        retain_auc: the retain model's ``mia_min_k_auc`` on the same data; None leaves privleak None.
        max_samples: use only the first N items of each evaluation split; None for all.
        verbmem_max_new_tokens / knowmem_max_new_tokens: MUSE's generation budgets (128 / 32).
        min_k: the k of Min-K% Prob (MUSE: 0.4).
        max_length: privleak texts are truncated to this many tokens (MUSE's texts are <= 2048 Llama
            tokens); None for no truncation.
        use_chat_template: for the knowmem prompts; None uses the tokenizer's chat template when it has
            one (verbmem and privleak are raw text).

    Returns a dict with the requested metrics and ``settings``.
    """
    unknown = [m for m in metrics_to_run if m not in METRICS]
    if unknown or not metrics_to_run:
        raise ValueError(f"unknown or no MUSE metrics {unknown or list(metrics_to_run)}; expected some of {METRICS}")
    if retain_auc is not None and not 0.0 <= retain_auc <= 1.0:
        raise ValueError(f"retain_auc must be in [0, 1], got {retain_auc}")
    if retain_auc is not None and "privleak" not in metrics_to_run:
        raise ValueError("retain_auc is given but 'privleak' is not among metrics_to_run")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive or None, got {max_samples}")
    if min(verbmem_max_new_tokens, knowmem_max_new_tokens, batch_size) < 1:
        raise ValueError("batch_size and the generation budgets must be positive")
    if not 0.0 < min_k <= 1.0:
        raise ValueError(f"min_k must be in (0, 1], got {min_k}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 or None, got {max_length}")
    chat = resolve_chat_template(tokenizer, use_chat_template)

    def load(subset: str, split: str, cap: bool = True) -> list[dict]:
        records = load_muse_split(subset, split, data_dir)
        return records[:max_samples] if cap else records

    # Load everything first: a missing file fails before any model work.
    data = {}
    if "verbmem_f" in metrics_to_run:
        data["verbmem"] = load("verbmem", "forget")
    for name, split in (("knowmem_f", "forget"), ("knowmem_r", "retain")):
        if name in metrics_to_run:
            data[name] = (load("knowmem", f"{split}_qa"), load("knowmem", f"{split}_qa_icl", cap=False))
    if "privleak" in metrics_to_run:
        data["privleak"] = (load("privleak", "forget"), load("privleak", "holdout"))

    results: dict[str, Any] = {}
    if "verbmem" in data:
        records = data["verbmem"]
        prompts = [encode_continuation(tokenizer, r["prompt"], r["gt"]).prompt_ids for r in records]
        continuations = greedy_generate(
            model, tokenizer, prompts, max_new_tokens=verbmem_max_new_tokens, batch_size=batch_size,
            desc="verbmem: generating",
        )
        results["verbmem_f"] = float(
            np.mean(metrics.rouge_l(continuations, [r["gt"] for r in records], measure="fmeasure", use_stemmer=False))
        )
    for name in ("knowmem_f", "knowmem_r"):
        if name in data:
            qa, icl = data[name]
            results[name] = _knowmem(
                model, tokenizer, qa, icl, chat=chat, batch_size=batch_size,
                max_new_tokens=knowmem_max_new_tokens, name=name,
            )
    if "privleak" in data:
        forget, holdout = data["privleak"]
        kwargs = dict(k=min_k, max_length=max_length, batch_size=batch_size)
        auc = metrics.mia_auc(
            _min_k_scores(model, tokenizer, forget, name="privleak forget", **kwargs),
            _min_k_scores(model, tokenizer, holdout, name="privleak holdout", **kwargs),
        )
        results["mia_min_k_auc"] = auc
        results["privleak"] = None if retain_auc is None else metrics.privleak(auc, retain_auc)
    results["settings"] = {
        "benchmark": "muse-news",
        "metrics": list(metrics_to_run),
        "retain_auc": retain_auc,
        "max_samples": max_samples,
        "min_k": min_k,
        "verbmem_max_new_tokens": verbmem_max_new_tokens,
        "knowmem_max_new_tokens": knowmem_max_new_tokens,
        "chat_template": chat,
        "data": str(data_dir) if data_dir is not None else HUB_DATASET,
    }
    return results
