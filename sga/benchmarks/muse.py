"""MUSE-News (Shi et al., 2024): unlearning BBC news articles.

Data: the layout of the ``muse-bench/MUSE-News`` hub dataset, one (subset, split) pair per file,
read from ``<data_dir>/<subset>/<split>.json`` (a JSON array or JSON lines; the MUSE repository's own
layout) or, when no folder is given, from the hub through ``datasets``:
- raw:      forget, retain1, retain2, holdout          {"text"}  (training corpora)
- verbmem:  forget                                     {"prompt", "gt"}
- knowmem:  forget_qa, retain_qa (+ _icl few-shot)     {"question", "answer"}
- privleak: forget, retain, holdout                    {"text"}

Metrics, as MUSE's ``eval.py`` computes them (ROUGE here on a 0-1 scale, MUSE prints x100):
- verbmem_f: mean ROUGE-L F1 of greedy continuations of the verbmem prompts (128 new tokens) against
  the ground-truth continuations; without the stemmer as MUSE's code scores (``rouge_convention="muse"``)
  or with it as open-unlearning does (``"open-unlearning"``);
- knowmem_f / knowmem_r: mean ROUGE-L F1 (same convention) of greedy answers (32 new tokens) to the
  forget / retain questions, prompted with the split's in-context examples;
- mia_<attack>_auc: AUC of each membership-inference attack (``mia``) separating privleak forget texts
  (members) from holdout texts, conventional orientation (1: forget set fully exposed); MUSE's PrivLeak
  uses Min-40% Prob (``mia_min_k_auc``);
- privleak: MUSE's PrivLeak in percent against the retain model's AUC (``metrics.privleak``), when
  ``retain_auc`` (that model's ``mia_min_k_auc``) is given;
- exact_memorization / extraction_strength of the verbmem continuations (open-unlearning's additions).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import metrics, mia
from . import openunlearning_log as log
from .prompts import (
    PLAIN_STOP_STRINGS,
    encode_continuation,
    encode_qa,
    encode_text,
    resolve_chat_template,
)
from .scoring import greedy_generate, memorization, token_statistics
from .tofu import read_json_records

HUB_DATASET = "muse-bench/MUSE-News"
# subset -> (splits, keys every record of the subset carries)
SUBSETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "raw": (("forget", "retain1", "retain2", "holdout"), ("text",)),
    "verbmem": (("forget",), ("prompt", "gt")),
    "knowmem": (("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"), ("question", "answer")),
    "privleak": (("forget", "retain", "holdout"), ("text",)),
}
METRICS = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak", "memorization")
# Whose ROUGE to report: MUSE's own evaluation code scores without the Porter stemmer, open-unlearning's
# MUSE evaluation with it (the two can differ in the second digit on inflected words).
ROUGE_STEMMER = {"muse": False, "open-unlearning": True}
# open-unlearning's metric name of each ROUGE metric.
_ROUGE_NAMES = {"verbmem_f": "forget_verbmem_ROUGE", "knowmem_f": "forget_knowmem_ROUGE", "knowmem_r": "retain_knowmem_ROUGE"}


def required_files(*, privleak: bool) -> list[str]:
    """The files of a MUSE-News folder that :func:`evaluate_muse` reads (with ``privleak``: its MIA splits too)."""
    names = ["verbmem/forget", "knowmem/forget_qa", "knowmem/forget_qa_icl", "knowmem/retain_qa", "knowmem/retain_qa_icl"]
    return [f"{name}.json" for name in names + (["privleak/forget", "privleak/holdout"] if privleak else [])]


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


def _rouge_item(
    model, tokenizer, prompts: list[list[int]], references: list[str], *, use_stemmer: bool, batch_size: int,
    max_new_tokens: int, stop_strings: Sequence[str], name: str,
) -> dict[str, Any]:
    """Greedy continuations of the prompts scored against the references: open-unlearning's per-index
    ROUGE records, aggregated as MUSE does (mean ROUGE-L F1)."""
    generations = greedy_generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop_strings=stop_strings,
        desc=f"{name}: generating",
    )
    scores = metrics.rouge_scores(generations, references, use_stemmer=use_stemmer)
    records = [
        {**score, "input": tokenizer.decode(prompt, skip_special_tokens=True), "ground_truth": ref, "generation": gen}
        for score, prompt, ref, gen in zip(scores, prompts, references, generations)
    ]
    return log.per_item(float(np.mean([score["rougeL_f1"] for score in scores])), records)


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
    rouge_convention: str = "muse",
    mia_attacks: Sequence[str] = mia.DEFAULT_ATTACKS,
    reference_model=None,
    extraction_convention: str = "open-unlearning",
) -> dict[str, Any]:
    """Evaluate a model on MUSE-News.

    Args:
        data_dir: folder laid out as ``<subset>/<split>.json``; None reads the hub dataset.
        metrics_to_run: any of "verbmem_f", "knowmem_f", "knowmem_r", "privleak" (the MIA attacks on
            privleak forget vs holdout texts: ``mia_<attack>_auc``, and with ``retain_auc`` the PrivLeak
            itself) and "memorization" (exact memorization and extraction strength of the verbmem
            continuations, as open-unlearning scores them).
        retain_auc: the retain model's ``mia_min_k_auc`` on the same data; None leaves privleak None.
        max_samples: use only the first N items of each evaluation split; None for all.
        verbmem_max_new_tokens / knowmem_max_new_tokens: MUSE's generation budgets (128 / 32).
        min_k: the k of Min-K% Prob and Min-K%++ (MUSE: 0.4).
        max_length: privleak texts are truncated to this many tokens (MUSE's texts are <= 2048 Llama
            tokens); None for no truncation.
        use_chat_template: for the knowmem prompts; None uses the tokenizer's chat template when it has
            one (verbmem and privleak are raw text).
        rouge_convention: "muse" (MUSE's own code: no stemmer; its published tables) or
            "open-unlearning" (Porter stemmer on; open-unlearning's MUSE numbers).
        mia_attacks: the attacks of "privleak" (``mia.ATTACKS``; it needs "min_k"); "reference" needs
            ``reference_model``.
        extraction_convention: "open-unlearning" or "paper", see ``metrics.extraction_strength``.

    Returns a dict with the requested metrics, ``per_item`` (per-item values under open-unlearning's
    metric names, for ``openunlearning_log``) and ``settings``.
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
    if rouge_convention not in ROUGE_STEMMER:
        raise ValueError(f"unknown rouge_convention {rouge_convention!r}; expected one of {sorted(ROUGE_STEMMER)}")
    if extraction_convention not in metrics.EXTRACTION_CONVENTIONS:
        raise ValueError(f"unknown extraction_convention {extraction_convention!r}; expected one of {metrics.EXTRACTION_CONVENTIONS}")
    if "privleak" in metrics_to_run:
        mia.check_attacks(mia_attacks, reference_model)
        if "min_k" not in mia_attacks:
            raise ValueError(f"'privleak' needs the 'min_k' attack among mia_attacks, got {list(mia_attacks)}")
    elif reference_model is not None:
        raise ValueError("reference_model is given but 'privleak' (the MIA metrics) is not among metrics_to_run")
    chat = resolve_chat_template(tokenizer, use_chat_template)

    def load(subset: str, split: str, cap: bool = True) -> list[dict]:
        records = load_muse_split(subset, split, data_dir)
        return records[:max_samples] if cap else records

    # Load everything first: a missing file fails before any model work.
    data = {}
    if "verbmem_f" in metrics_to_run or "memorization" in metrics_to_run:
        data["verbmem"] = load("verbmem", "forget")
    for name, split in (("knowmem_f", "forget"), ("knowmem_r", "retain")):
        if name in metrics_to_run:
            data[name] = (load("knowmem", f"{split}_qa"), load("knowmem", f"{split}_qa_icl", cap=False))
    if "privleak" in metrics_to_run:
        data["privleak"] = (load("privleak", "forget"), load("privleak", "holdout"))

    per_item: dict[str, Any] = {}
    rouge_args = dict(use_stemmer=ROUGE_STEMMER[rouge_convention], batch_size=batch_size)
    if "verbmem" in data:
        verbmem = [encode_continuation(tokenizer, r["prompt"], r["gt"]) for r in data["verbmem"]]
    if "verbmem_f" in metrics_to_run:
        per_item["forget_verbmem_ROUGE"] = _rouge_item(
            model, tokenizer, [e.prompt_ids for e in verbmem], [r["gt"] for r in data["verbmem"]],
            max_new_tokens=verbmem_max_new_tokens, stop_strings=(), name="verbmem", **rouge_args,
        )
    for name in ("knowmem_f", "knowmem_r"):
        if name in data:
            qa, icl = data[name]
            shots = [(shot["question"], shot["answer"]) for shot in icl]
            prompts = [
                encode_qa(tokenizer, r["question"], r["answer"], few_shot=shots, use_chat_template=chat).prompt_ids
                for r in qa
            ]
            per_item[_ROUGE_NAMES[name]] = _rouge_item(
                model, tokenizer, prompts, [r["answer"] for r in qa], max_new_tokens=knowmem_max_new_tokens,
                stop_strings=() if chat else PLAIN_STOP_STRINGS, name=name, **rouge_args,
            )
    results: dict[str, Any] = {
        name: per_item[ou_name]["agg_value"] for name, ou_name in _ROUGE_NAMES.items() if ou_name in per_item
    }
    if "memorization" in metrics_to_run:
        statistics = token_statistics(model, verbmem, batch_size=batch_size, desc="verbmem: token statistics")
        for name, values in memorization(statistics, convention=extraction_convention).items():
            per_item[name] = log.scores_entry(values)
            results[name] = per_item[name]["agg_value"]
    if "privleak" in data:
        forget, holdout = ([encode_text(tokenizer, r["text"], max_length=max_length) for r in texts] for texts in data["privleak"])
        found = mia.membership_inference(
            model, tokenizer, forget, holdout, mia_attacks, k=min_k, reference_model=reference_model, batch_size=batch_size
        )
        per_item.update(log.mia_entries(found))
        results.update(mia.auc_results(found))
        results["privleak"] = mia.privleak_from(found, retain_auc)
    results["per_item"] = per_item
    results["settings"] = {
        "benchmark": "muse-news",
        "metrics": list(metrics_to_run),
        "retain_auc": retain_auc,
        "max_samples": max_samples,
        "min_k": min_k,
        "mia_attacks": list(mia_attacks) if "privleak" in metrics_to_run else [],
        "rouge_convention": rouge_convention,
        "extraction_convention": extraction_convention,
        "verbmem_max_new_tokens": verbmem_max_new_tokens,
        "knowmem_max_new_tokens": knowmem_max_new_tokens,
        "chat_template": chat,
        "data": str(data_dir) if data_dir is not None else HUB_DATASET,
    }
    return results
