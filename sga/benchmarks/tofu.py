"""TOFU (Maini et al., 2024): fictitious-author QA, with forget quality and model utility.

Data: the JSON-lines files of the ``locuslab/TOFU`` dataset, read from a local folder (``<split>.json``)
or, when no folder is given, from the hub through ``datasets``.

Metrics (as TOFU's ``aggregate_eval_stat.py`` and open-unlearning compute them; formulas in
``metrics.py``), for the forget set, the retain set, real_authors and world_facts:
- probability: mean of P(a | q) = exp(-l(a)); on real_authors / world_facts normalized against the
  perturbed answers, P(a) / (P(a) + sum_j P(a_pert_j) + 1e-10);
- ROUGE-L recall (stemmer on) of the greedy answer against the answer;
- truth ratio: R = P(a_pert) / (P(a_para) + 1e-10), P(a_pert) = exp(-mean_j l(a_pert_j)), per question
  (the answer itself stands in for the paraphrase on real_authors / world_facts), reported as
  mean(min(R, 1/(R + 1e-10))) on the forget set and mean(max(0, 1 - R)) elsewhere;
- forget quality: KS-test p-value of the forget-set raw ratios R against a retain model's;
- model utility: harmonic mean of the nine non-forget statistics;
- exact memorization and extraction strength of the forget answers (``metrics``);
- membership inference (``mia``): the attacks' AUCs on the forget answers against the holdout split
  (forget01 -> holdout01), and privleak of the Min-K AUC against a retain model's.
Per-question values are kept under open-unlearning's metric names (``openunlearning_log``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import metrics, mia
from . import openunlearning_log as log
from .prompts import PLAIN_STOP_STRINGS, encode_qa, resolve_chat_template
from .scoring import greedy_generate, memorization, token_logprobs, token_statistics

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
# open-unlearning's names of each set: (metric-name prefix, truth-ratio metric name).
TOFU_SET_NAMES = {
    "forget": ("forget", "forget_truth_ratio"),
    "retain": ("retain", "retain_Truth_Ratio"),
    "real_authors": ("ra", "ra_Truth_Ratio"),
    "world_facts": ("wf", "wf_Truth_Ratio"),
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


def required_files(forget_split: str, *, holdout: bool) -> list[str]:
    """The files of a TOFU folder that :func:`evaluate_tofu` of ``forget_split`` reads (with ``holdout``: the
    membership-inference split too)."""
    names = [f"{forget_split}_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"]
    return [f"{name}.json" for name in names + ([forget_split.replace("forget", "holdout")] if holdout else [])]


def read_json_records(path: Path) -> list[dict]:
    """Records of a JSON-lines file (one object per line) or of a file holding one JSON array."""
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}): fix or re-save the file") from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:  # its line and column are the file's
            raise ValueError(f"{path} is not valid JSON ({err}): fix or re-save the file") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:  # the error's own position is within the line: name the file's line
            raise ValueError(
                f"{path} is not valid JSON lines: line {number}: {err.msg} (column {err.colno}); fix or re-save the file"
            ) from None
    return records


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
    """Answer NLLs, "correct"-answer NLLs, perturbed NLLs and raw truth ratios of one QA set, the encoded
    answers, plus the greedy answers and their ROUGE scores (stemmer on) unless ``max_new_tokens`` is None."""

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
        "answers": examples[:n],
        "answer_nll": answer_nll,
        "correct_nll": correct_nll,
        "perturbed_nll": perturbed_nll,
        "truth_ratios": metrics.truth_ratios(correct_nll, perturbed_nll),
    }
    if max_new_tokens is not None:
        prompts = [examples[i].prompt_ids for i in range(n)]
        generations = greedy_generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
            stop_strings=() if use_chat_template else PLAIN_STOP_STRINGS, desc=f"{name}: generating",
        )
        references = [r["answer"] for r in records]
        rouge = metrics.rouge_scores(generations, references, use_stemmer=True)
        scored["rouge"] = float(np.mean([score["rougeL_recall"] for score in rouge]))
        scored["rouge_records"] = [
            {**score, "input": tokenizer.decode(prompt, skip_special_tokens=True), "ground_truth": ref, "generation": gen}
            for score, prompt, ref, gen in zip(rouge, prompts, references, generations)
        ]
    return scored


def _probability_records(nll: np.ndarray | Sequence[np.ndarray]) -> tuple[float, list[dict]]:
    """open-unlearning's ``probability`` metric of per-index NLLs (or of lists of them): records
    {"prob": exp(-l), "avg_loss": l} and the mean probability (of each index's mean, for lists)."""
    records = [{"prob": np.exp(-np.asarray(l)).tolist(), "avg_loss": np.asarray(l).tolist()} for l in nll]
    return float(np.mean([np.mean(r["prob"]) for r in records])), records


def _per_item(name: str, scored: dict[str, Any], prob: np.ndarray, stats: dict[str, float]) -> dict[str, Any]:
    """The open-unlearning metrics of one QA set (TOFU_SET_NAMES): raw, paraphrased and perturbed
    probabilities, the reported probability, ROUGE and truth ratio, per index."""
    prefix, truth_ratio_name = TOFU_SET_NAMES[name]
    entries = {}
    if name in ("forget", "retain"):
        entries[f"{prefix}_Q_A_PARA_Prob"] = log.per_item(*_probability_records(scored["correct_nll"]))
    else:
        entries[f"{prefix}_Q_A_Prob_normalised"] = log.per_item(stats[f"{name}_prob"], [{"prob": p} for p in prob])
    entries[f"{prefix}_Q_A_Prob"] = log.per_item(*_probability_records(scored["answer_nll"]))
    entries[f"{prefix}_Q_A_PERT_Prob"] = log.per_item(*_probability_records(scored["perturbed_nll"]))
    entries[f"{prefix}_Q_A_ROUGE"] = log.per_item(stats[f"{name}_rouge"], scored["rouge_records"])
    entries[truth_ratio_name] = log.per_item(
        stats[f"{name}_truth_ratio"], [{"score": float(r)} for r in scored["truth_ratios"]]
    )
    return entries


def _retain_reference(
    retain_truth_ratios: Sequence[float] | str | os.PathLike | None,
    retain_reference: str | os.PathLike | None,
    retain_mia_auc: float | None,
    forget_split: str,
) -> tuple[list[float] | None, float | None]:
    """(retain truth ratios, retain Min-K AUC) from the arguments of ``evaluate_tofu``; a log path, of
    either format (``openunlearning_log.load_retain_reference``), must hold truth ratios."""
    if retain_reference is not None and (retain_truth_ratios is not None or retain_mia_auc is not None):
        raise ValueError("give retain_reference, or retain_truth_ratios / retain_mia_auc, not both")
    path = retain_reference if retain_reference is not None else retain_truth_ratios
    if isinstance(path, (str, os.PathLike)):
        reference = log.load_retain_reference(path)
        if reference.truth_ratios is None:
            key = "forget_truth_ratio" if reference.source_format == "open-unlearning" else "forget_truth_ratios"
            raise ValueError(f"{path} has no {key!r}: not a log of a TOFU evaluation")
        if reference.forget_split not in (None, forget_split):
            raise ValueError(f"{path} holds truth ratios of {reference.forget_split!r}, not of {forget_split!r}")
        ratios = reference.truth_ratios
        if retain_reference is not None:
            retain_mia_auc = reference.mia_min_k_auc
    else:
        ratios = None if retain_truth_ratios is None else [float(r) for r in retain_truth_ratios]
    if ratios is not None and not ratios:
        raise ValueError("retain_truth_ratios is empty")
    if retain_mia_auc is not None and not 0.0 <= retain_mia_auc <= 1.0:
        raise ValueError(f"retain_mia_auc must be in [0, 1], got {retain_mia_auc}")
    return ratios, retain_mia_auc


def _memorization_and_mia(
    model, tokenizer, forget: list, holdout: list, per_item: dict[str, Any], *, retain_auc: float | None,
    attacks: Sequence[str], k: float, reference_model, batch_size: int, extraction_convention: str,
) -> dict[str, Any]:
    """Exact memorization and extraction strength of the forget answers and, with holdout answers, the
    MIA AUCs and privleak (one forward pass over the forget answers serves both); the per-question
    values go into ``per_item``."""
    statistics = token_statistics(model, forget, batch_size=batch_size, desc="forget: token statistics")
    results: dict[str, Any] = {}
    for name, values in memorization(statistics, convention=extraction_convention).items():
        per_item[name] = log.scores_entry(values)
        results[name] = per_item[name]["agg_value"]
    results["privleak"] = None
    if holdout:
        found = mia.membership_inference(
            model, tokenizer, forget, holdout, attacks, forget_statistics=statistics, k=k,
            reference_model=reference_model, batch_size=batch_size,
        )
        per_item.update(log.mia_entries(found))
        results.update(mia.auc_results(found))
        results["privleak"] = mia.privleak_from(found, retain_auc)
    return results


def _holdout_split(forget_split: str, data_dir: str | os.PathLike | None, membership_inference: bool | None) -> str | None:
    """The holdout split that pairs with the forget split (forget01 -> holdout01) when the MIA metrics
    run: always for True, never for False, for None when the data has it (the hub always does)."""
    holdout = forget_split.replace("forget", "holdout")
    if membership_inference is False:
        return None
    available = data_dir is None or (Path(data_dir) / f"{holdout}.json").is_file()
    if membership_inference and not available:
        raise ValueError(f"membership inference needs {Path(data_dir) / f'{holdout}.json'}: TOFU's {holdout} split")
    return holdout if available else None


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
    retain_reference: str | os.PathLike | None = None,
    retain_mia_auc: float | None = None,
    membership_inference: bool | None = None,
    mia_attacks: Sequence[str] = mia.DEFAULT_ATTACKS,
    mia_k: float = 0.4,
    reference_model=None,
    extraction_convention: str = "open-unlearning",
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
            floats (``tofu_forget_truth_ratios``), or the path of a retain model's log (see
            ``retain_reference``). None leaves forget_quality as None.
        use_chat_template: None uses the tokenizer's chat template when it has one.
        retain_reference: the path of a retain model's log, either this function's saved result
            (``save_results``) or open-unlearning's ``TOFU_EVAL.json`` (detected from the content): its
            forget truth ratios give forget quality and its Min-K AUC (if logged) gives privleak.
        retain_mia_auc: the retain model's ``mia_min_k_auc``, for privleak without a log.
        membership_inference: run the MIA metrics on the forget answers (members) against the holdout
            split (forget01 -> holdout01): True, False, or None for "when the data has that split".
        mia_attacks: any of ``mia.ATTACKS``; "min_k" is the one privleak uses; "reference" needs
            ``reference_model``; "gradnorm" takes one backward pass per answer.
        mia_k: the k of Min-K% and Min-K%++ (open-unlearning: 0.4).
        extraction_convention: "open-unlearning" or "paper", see ``metrics.extraction_strength``.

    Returns a dict: ``forget_prob``, ``forget_rouge``, ``forget_truth_ratio``, ``forget_quality``,
    ``{retain,real_authors,world_facts}_{prob,rouge,truth_ratio}``, ``model_utility``,
    ``exact_memorization`` and ``extraction_strength`` of the forget answers, with the MIA metrics
    ``mia_<attack>_auc`` for each attack and ``privleak`` (None without a retain AUC), ``forget_truth_ratios``
    (the per-question raw R, for reuse as a retain model's log), ``per_item`` (the per-question values
    under open-unlearning's metric names, for ``openunlearning_log``) and ``settings``.
    """
    forget_split = _normalize_forget_split(forget_split)
    if retain_split != "retain_perturbed":
        raise ValueError(
            f"retain_split must be 'retain_perturbed' (the split with perturbed answers), got {retain_split!r}"
        )
    _check_counts(max_samples, batch_size, max_new_tokens)
    retain_ratios, retain_auc = _retain_reference(retain_truth_ratios, retain_reference, retain_mia_auc, forget_split)
    holdout_split = _holdout_split(forget_split, data_dir, membership_inference)
    if holdout_split is not None:
        mia.check_attacks(mia_attacks, reference_model)
    elif reference_model is not None:
        raise ValueError("reference_model is given but membership inference is off (no holdout split)")
    if extraction_convention not in metrics.EXTRACTION_CONVENTIONS:
        raise ValueError(f"unknown extraction_convention {extraction_convention!r}; expected one of {metrics.EXTRACTION_CONVENTIONS}")
    chat = resolve_chat_template(tokenizer, use_chat_template)
    sets = {
        "forget": (load_tofu_split(f"{forget_split}_perturbed", data_dir)[:max_samples], "paraphrased_answer"),
        "retain": (load_tofu_split(retain_split, data_dir)[:max_samples], "paraphrased_answer"),
        **{name: (load_tofu_split(split, data_dir)[:max_samples], key) for name, split, key in _UTILITY_SETS},
    }
    holdout = [] if holdout_split is None else load_tofu_split(holdout_split, data_dir)[:max_samples]
    if retain_ratios is not None and len(retain_ratios) != len(sets["forget"][0]):
        raise ValueError(
            f"{len(retain_ratios)} retain truth ratios for {len(sets['forget'][0])} forget questions: "
            "evaluate the retain model on the same questions (same forget_split and max_samples)"
        )

    stats: dict[str, float] = {}
    per_item: dict[str, Any] = {}
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
        per_item.update(_per_item(name, scored, prob, stats))
        if name == "forget":
            forget_ratios, forget_answers = scored["truth_ratios"], scored["answers"]
    utility_stats = {key: value for key, value in stats.items() if not key.startswith("forget_")}
    results: dict[str, Any] = {
        "forget_quality": None if retain_ratios is None else metrics.forget_quality(forget_ratios, retain_ratios),
        "model_utility": metrics.model_utility(utility_stats),
        **stats,
    }
    results.update(
        _memorization_and_mia(
            model, tokenizer, forget_answers, [encode_qa(tokenizer, r["question"], r["answer"], use_chat_template=chat) for r in holdout],
            per_item, retain_auc=retain_auc, attacks=mia_attacks, k=mia_k, reference_model=reference_model,
            batch_size=batch_size, extraction_convention=extraction_convention,
        )
    )
    results["forget_truth_ratios"] = forget_ratios.tolist()
    results["per_item"] = per_item
    results["settings"] = {
        "benchmark": "tofu",
        "forget_split": forget_split,
        "retain_split": retain_split,
        "holdout_split": holdout_split,
        "n_questions": {name: len(records) for name, (records, _) in sets.items()} | {"holdout": len(holdout)},
        "max_new_tokens": max_new_tokens,
        "chat_template": chat,
        "mia_attacks": list(mia_attacks) if holdout_split else [],
        "mia_k": mia_k,
        "extraction_convention": extraction_convention,
        "data": str(data_dir) if data_dir is not None else HUB_DATASET,
    }
    return results
