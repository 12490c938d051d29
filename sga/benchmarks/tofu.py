"""TOFU (Maini et al., 2024): fictitious-author QA, with forget quality and model utility.

Data: the JSON-lines files of the ``locuslab/TOFU`` dataset, read from a local folder (``<split>.json``)
or, when no folder is given, from the hub through ``datasets``.

Metrics (as TOFU's ``aggregate_eval_stat.py`` and open-unlearning compute them; formulas in
``metrics.py``), for the forget set, the retain set, real_authors and world_facts:
- probability: mean of P(a | q) = exp(-l(a)); on real_authors / world_facts normalized against the
  perturbed answers, P(a) / (P(a) + sum_j P(a_pert_j));
- ROUGE-L recall (stemmer on) of the greedy answer against the answer;
- truth ratio: R = exp(l(a_para) - mean_j l(a_pert_j)) = P(a_pert) / P(a_para) per question (the
  answer itself stands in for the paraphrase on real_authors / world_facts), reported as
  mean(min(R, 1/R)) on the forget set and mean(max(0, 1 - R)) elsewhere;
- forget quality: KS-test p-value of the forget-set raw ratios R against a retain model's;
- model utility: harmonic mean of the nine non-forget statistics.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import metrics
from .prompts import PLAIN_STOP_STRINGS, encode_qa, resolve_chat_template
from .report import load_results
from .scoring import greedy_generate, token_logprobs

HUB_DATASET = "locuslab/TOFU"
FORGET_SPLITS = ("forget01", "forget05", "forget10")
RETAIN_SPLITS = ("retain90", "retain95", "retain99")
HOLDOUT_SPLITS = ("holdout01", "holdout05", "holdout10")
_QA_KEYS = ("question", "answer")
_PERTURBED_KEYS = ("question", "answer", "paraphrased_answer", "perturbed_answer")
_FACT_KEYS = ("question", "answer", "perturbed_answer")
# Every split TOFU publishes, with the keys each record must carry.
SPLITS: dict[str, tuple[str, ...]] = {
    "full": _QA_KEYS,
    **{name: _QA_KEYS for name in FORGET_SPLITS + RETAIN_SPLITS + HOLDOUT_SPLITS},
    **{f"{name}_perturbed": _PERTURBED_KEYS for name in FORGET_SPLITS},
    "retain_perturbed": _PERTURBED_KEYS,
    "real_authors": _QA_KEYS,
    "real_authors_perturbed": _FACT_KEYS,
    "world_facts": _QA_KEYS,
    "world_facts_perturbed": _FACT_KEYS,
}
# The three model-utility sets: (result prefix, split, key of the "correct" answer of the truth ratio).
_UTILITY_SETS = (
    ("real_authors", "real_authors_perturbed", "answer"),
    ("world_facts", "world_facts_perturbed", "answer"),
)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown TOFU split {split!r}; expected one of {sorted(SPLITS)}")


def _check_records(records: list[dict], split: str, source: str) -> list[dict]:
    if not records:
        raise ValueError(f"TOFU split {split!r} from {source} is empty")
    for i, record in enumerate(records):
        missing = [key for key in SPLITS[split] if key not in record]
        if missing:
            raise ValueError(f"record {i} of TOFU split {split!r} ({source}) lacks keys {missing}")
        if "perturbed_answer" in SPLITS[split] and (
            not isinstance(record["perturbed_answer"], list) or not record["perturbed_answer"]
        ):
            raise ValueError(f"record {i} of TOFU split {split!r} ({source}) has no perturbed answers")
    return records


def read_json_records(path: Path) -> list[dict]:
    """Records of a JSON-lines file (one object per line) or of a file holding one JSON array."""
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        kind = "UTF-8 text" if isinstance(err, UnicodeDecodeError) else "valid JSON / JSON lines"
        raise ValueError(f"{path} is not {kind} ({err}): fix or re-save the file") from None


def load_tofu_split(split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The records of one TOFU split: from ``<data_dir>/<split>.json`` (JSON lines or a JSON array), or
    from the ``locuslab/TOFU`` hub dataset when ``data_dir`` is None (needs ``datasets`` and a network)."""
    _check_split(split)
    if data_dir is not None:
        path = Path(data_dir) / f"{split}.json"
        return _check_records(read_json_records(path), split, str(path))
    import datasets

    rows = datasets.load_dataset(HUB_DATASET, split, split="train")
    return _check_records([dict(row) for row in rows], split, HUB_DATASET)


def _score_qa_set(
    model, tokenizer, records: list[dict], *, correct_key: str, use_chat_template: bool, batch_size: int,
    max_new_tokens: int | None, name: str,
) -> dict[str, Any]:
    """Answer NLLs, perturbed NLLs and raw truth ratios of one QA set, plus the ROUGE-L recall of its
    greedy answers unless ``max_new_tokens`` is None."""

    def encode(question: str, answer: str):
        return encode_qa(tokenizer, question, answer, use_chat_template=use_chat_template)

    n = len(records)
    examples = [encode(r["question"], r["answer"]) for r in records]
    if correct_key != "answer":
        examples += [encode(r["question"], r[correct_key]) for r in records]
    pert_counts = [len(r["perturbed_answer"]) for r in records]
    pert_bounds = np.cumsum([len(examples)] + pert_counts)
    examples += [encode(r["question"], p) for r in records for p in r["perturbed_answer"]]
    logprobs = token_logprobs(model, examples, batch_size=batch_size, desc=f"{name}: scoring")
    mean_nll = np.array([-lp.mean() for lp in logprobs])
    answer_nll = mean_nll[:n]
    correct_nll = answer_nll if correct_key == "answer" else mean_nll[n : 2 * n]
    perturbed_nll = [mean_nll[pert_bounds[i] : pert_bounds[i + 1]] for i in range(n)]
    scored = {
        "answer_nll": answer_nll,
        "perturbed_nll": perturbed_nll,
        "truth_ratios": metrics.truth_ratios(correct_nll, perturbed_nll),
    }
    if max_new_tokens is not None:
        generations = greedy_generate(
            model, tokenizer, [examples[i].prompt_ids for i in range(n)], max_new_tokens=max_new_tokens,
            batch_size=batch_size, stop_strings=() if use_chat_template else PLAIN_STOP_STRINGS,
            desc=f"{name}: generating",
        )
        rouge = metrics.rouge_l(generations, [r["answer"] for r in records], measure="recall", use_stemmer=True)
        scored["rouge"] = float(np.mean(rouge))
    return scored


def _retain_ratios_from(value: Sequence[float] | str | os.PathLike, forget_split: str) -> list[float]:
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        log = load_results(path)
        if "forget_truth_ratios" not in log:
            raise ValueError(f"{path} has no 'forget_truth_ratios': not a log written from evaluate_tofu")
        logged_split = log.get("settings", {}).get("forget_split")
        if logged_split != forget_split:
            raise ValueError(f"{path} holds truth ratios of {logged_split!r}, not of {forget_split!r}")
        value = log["forget_truth_ratios"]
    ratios = [float(r) for r in value]
    if not ratios:
        raise ValueError("retain_truth_ratios is empty")
    return ratios


def tofu_forget_truth_ratios(
    model, tokenizer, data_dir: str | os.PathLike | None = None, forget_split: str = "forget01", *,
    max_samples: int | None = None, batch_size: int = 8, use_chat_template: bool | None = None,
) -> list[float]:
    """The raw per-question truth ratios R of a model on a forget set, e.g. of a retain model, to pass
    as ``retain_truth_ratios`` to ``evaluate_tofu`` without a full evaluation (no generation)."""
    forget_split = _normalize_forget_split(forget_split)
    _check_counts(max_samples, batch_size)
    records = load_tofu_split(f"{forget_split}_perturbed", data_dir)[:max_samples]
    scored = _score_qa_set(
        model, tokenizer, records, correct_key="paraphrased_answer",
        use_chat_template=resolve_chat_template(tokenizer, use_chat_template), batch_size=batch_size,
        max_new_tokens=None, name="forget",
    )
    return scored["truth_ratios"].tolist()


def _normalize_forget_split(forget_split: str) -> str:
    name = forget_split.removesuffix("_perturbed")
    if name not in FORGET_SPLITS:
        raise ValueError(f"unknown forget split {forget_split!r}; expected one of {FORGET_SPLITS}")
    return name


def _check_counts(max_samples: int | None, batch_size: int, max_new_tokens: int | None = None) -> None:
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive or None, got {max_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")


def evaluate_tofu(
    model,
    tokenizer,
    data_dir: str | os.PathLike | None = None,
    forget_split: str = "forget01",
    retain_split: str = "retain_perturbed",
    max_samples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    retain_truth_ratios: Sequence[float] | str | os.PathLike | None = None,
    *,
    use_chat_template: bool | None = None,
) -> dict[str, Any]:
    """Evaluate a model on TOFU and return every metric.

    Args:
        model, tokenizer: a Hugging Face causal LM and its (fast) tokenizer.
        data_dir: folder of TOFU JSON files; None reads ``locuslab/TOFU`` from the hub.
        forget_split: "forget01", "forget05" or "forget10" (its ``_perturbed`` file is read).
        retain_split: the retain QA set with paraphrased and perturbed answers, "retain_perturbed".
        max_samples: use only the first N questions of each set (quick runs); None for all.
        batch_size: sequences per forward pass / generation batch.
        max_new_tokens: greedy generation budget for the ROUGE answers.
        retain_truth_ratios: a retain model's raw forget truth ratios for forget quality: a list of
            floats (``tofu_forget_truth_ratios``), or the path of a JSON log saved from this function's
            result for the retain model (``save_results``). None leaves forget_quality as None.
        use_chat_template: None uses the tokenizer's chat template when it has one.

    Returns a dict: ``forget_prob``, ``forget_rouge``, ``forget_truth_ratio``, ``forget_quality``,
    ``{retain,real_authors,world_facts}_{prob,rouge,truth_ratio}``, ``model_utility``,
    ``forget_truth_ratios`` (the per-question raw R, for reuse as a retain model's log) and ``settings``.
    """
    forget_split = _normalize_forget_split(forget_split)
    if retain_split != "retain_perturbed":
        raise ValueError(
            f"retain_split must be 'retain_perturbed' (the split with perturbed answers), got {retain_split!r}"
        )
    _check_counts(max_samples, batch_size, max_new_tokens)
    chat = resolve_chat_template(tokenizer, use_chat_template)
    sets = {
        "forget": (load_tofu_split(f"{forget_split}_perturbed", data_dir)[:max_samples], "paraphrased_answer"),
        "retain": (load_tofu_split(retain_split, data_dir)[:max_samples], "paraphrased_answer"),
        **{name: (load_tofu_split(split, data_dir)[:max_samples], key) for name, split, key in _UTILITY_SETS},
    }
    retain_ratios = None
    if retain_truth_ratios is not None:
        retain_ratios = _retain_ratios_from(retain_truth_ratios, forget_split)
        if len(retain_ratios) != len(sets["forget"][0]):
            raise ValueError(
                f"{len(retain_ratios)} retain truth ratios for {len(sets['forget'][0])} forget questions: "
                "evaluate the retain model on the same questions (same forget_split and max_samples)"
            )

    stats: dict[str, float] = {}
    for name, (records, correct_key) in sets.items():
        scored = _score_qa_set(
            model, tokenizer, records, correct_key=correct_key, use_chat_template=chat, batch_size=batch_size,
            max_new_tokens=max_new_tokens, name=name,
        )
        if name in ("forget", "retain"):
            prob = metrics.answer_probability(scored["answer_nll"])
        else:
            prob = metrics.normalized_probability(scored["answer_nll"], scored["perturbed_nll"])
        stats[f"{name}_prob"] = float(np.mean(prob))
        stats[f"{name}_rouge"] = scored["rouge"]
        stats[f"{name}_truth_ratio"] = metrics.truth_ratio_score(scored["truth_ratios"], forget=name == "forget")
        if name == "forget":
            forget_ratios = scored["truth_ratios"]
    utility_stats = {key: value for key, value in stats.items() if not key.startswith("forget_")}
    results: dict[str, Any] = {
        "forget_quality": None if retain_ratios is None else metrics.forget_quality(forget_ratios, retain_ratios),
        "model_utility": metrics.model_utility(utility_stats),
        **stats,
        "forget_truth_ratios": forget_ratios.tolist(),
    }
    results["settings"] = {
        "benchmark": "tofu",
        "forget_split": forget_split,
        "retain_split": retain_split,
        "n_questions": {name: len(records) for name, (records, _) in sets.items()},
        "max_new_tokens": max_new_tokens,
        "chat_template": chat,
        "data": str(data_dir) if data_dir is not None else HUB_DATASET,
    }
    return results
