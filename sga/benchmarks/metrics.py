"""Metric functions shared by the benchmarks (TOFU, MUSE, Harry Potter).

Pure functions of numbers and strings: no model in here (``scoring.py`` turns a model into the numbers).
Each formula is written beside the code that computes it. Probabilities of a sequence are always
*length-normalized*: ``P(x) = exp(-l(x))`` with ``l(x)`` the token-mean negative log-likelihood of the
sequence's answer tokens, as TOFU and open-unlearning define them.

rouge-score, sacrebleu, scipy and scikit-learn are imported inside the functions that use them.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

# open-unlearning's guard against division by zero in its ratios (truth ratio, normalized probability,
# PrivLeak); kept so that the same model outputs give the same numbers to the last digit.
OPEN_UNLEARNING_EPS = 1e-10


def _as_1d(values: Iterable[float], name: str) -> np.ndarray:
    array = np.asarray(list(values), dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values")
    return array


def _ragged(values: Sequence[Sequence[float]], n: int, name: str) -> list[np.ndarray]:
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} rows, expected {n} (one per question)")
    rows = [np.asarray(row, dtype=np.float64) for row in values]
    for i, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"{name}[{i}] must be a non-empty sequence of numbers")
        if not np.all(np.isfinite(row)):
            raise ValueError(f"{name}[{i}] contains non-finite values")
    return rows


# --------------------------------------------------------------------------------------------------
# Text overlap
# --------------------------------------------------------------------------------------------------

_ROUGE_MEASURES = ("recall", "precision", "fmeasure")


def rouge_scores(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool) -> list[dict[str, float]]:
    """Per-pair ROUGE-1 recall, ROUGE-L F-measure and ROUGE-L recall (``rouge-score``), the three numbers
    open-unlearning logs for each generation: ``{"rouge1_recall", "rougeL_f1", "rougeL_recall"}``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=use_stemmer)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return [
        {"rouge1_recall": s["rouge1"].recall, "rougeL_f1": s["rougeL"].fmeasure, "rougeL_recall": s["rougeL"].recall}
        for s in scores
    ]


def rouge_l(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    measure: str = "recall",
    use_stemmer: bool = True,
) -> list[float]:
    """Per-pair ROUGE-L (longest common subsequence) scores from ``rouge-score``.

    With LCS the length of the longest common token subsequence of prediction p and reference r:
    recall = LCS / |r|, precision = LCS / |p|, fmeasure = 2 * recall * precision / (recall + precision).
    TOFU reports the recall with the Porter stemmer on; MUSE's own code reports the F-measure without
    it, open-unlearning's MUSE evaluation with it.
    """
    if measure not in _ROUGE_MEASURES:
        raise ValueError(f"unknown ROUGE measure {measure!r}; expected one of {_ROUGE_MEASURES}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    return [getattr(scorer.score(ref, pred)["rougeL"], measure) for pred, ref in zip(predictions, references)]


def sentence_bleu(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-pair sentence BLEU from ``sacrebleu`` on its usual 0-100 scale (13a tokenizer, exp smoothing).

    BLEU = BP * exp(mean_{n=1..4} log p_n), p_n the (smoothed) modified n-gram precision and
    BP = min(1, exp(1 - |r| / |p|)) the brevity penalty.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    import sacrebleu

    return [sacrebleu.sentence_bleu(pred, [ref]).score for pred, ref in zip(predictions, references)]


# --------------------------------------------------------------------------------------------------
# TOFU
# --------------------------------------------------------------------------------------------------


def answer_probability(mean_nll: Iterable[float]) -> np.ndarray:
    """Length-normalized answer probability per question: P(a | q) = exp(-l(a)), l the token-mean NLL."""
    return np.exp(-_as_1d(mean_nll, "mean_nll"))


def normalized_probability(answer_nll: Iterable[float], perturbed_nll: Sequence[Sequence[float]]) -> np.ndarray:
    """TOFU's probability for real_authors / world_facts, per question.

    P_norm = P(a) / (P(a) + sum_j P(a_pert_j) + 1e-10), each P the length-normalized probability exp(-l)
    (the 1e-10 as in open-unlearning's ``probability_w_options``).
    """
    correct = _as_1d(answer_nll, "answer_nll")
    wrong = _ragged(perturbed_nll, correct.size, "perturbed_nll")
    p_true = np.exp(-correct)
    p_wrong = np.array([np.exp(-row).sum() for row in wrong])
    return p_true / (p_true + p_wrong + OPEN_UNLEARNING_EPS)


def truth_ratios(correct_nll: Iterable[float], perturbed_nll: Sequence[Sequence[float]]) -> np.ndarray:
    """TOFU's raw truth ratio per question, as open-unlearning computes it.

    R_truth = P_pert / (P_para + 1e-10),  P_pert = exp(-mean_j l(a_pert_j)),  P_para = exp(-l(a_para)),
    with l the token-mean NLL, so P^(1/|a|) = exp(-l): P_pert is the geometric mean of the k perturbed
    answers' normalized probabilities (the mean taken in log space, as TOFU's ``aggregate_eval_stat.py``
    and open-unlearning do). The 1e-10 is open-unlearning's; it moves R only when P_para is tiny (a
    world-facts answer with P ~ 1e-7 shifts in the sixth digit). ``correct_nll`` is the paraphrased
    answer's NLL for the forget and retain sets and the answer's own NLL for real_authors / world_facts.
    R < 1: the model prefers the correct answer; R ~ 1: it cannot tell them apart.
    """
    correct = _as_1d(correct_nll, "correct_nll")
    wrong = _ragged(perturbed_nll, correct.size, "perturbed_nll")
    p_wrong = np.exp(-np.array([row.mean() for row in wrong]))
    return p_wrong / (np.exp(-correct) + OPEN_UNLEARNING_EPS)


def truth_ratio_score(ratios: Iterable[float], *, forget: bool) -> float:
    """Aggregate per-question truth ratios into TOFU's reported "Truth Ratio" statistic.

    forget set:  mean(min(R, 1 / (R + 1e-10)))   (1 when correct and perturbed answers are equally likely)
    other sets:  mean(max(0, 1 - R))             (1 when the correct answer dominates; a model-utility term)
    (open-unlearning's ``closer_to_1_better`` and ``true_better`` aggregators.)
    """
    r = _as_1d(ratios, "ratios")
    if np.any(r < 0):
        raise ValueError("truth ratios must be non-negative")
    if forget:
        return float(np.mean(np.minimum(r, 1.0 / (r + OPEN_UNLEARNING_EPS))))
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def forget_quality(unlearned_ratios: Iterable[float], retain_ratios: Iterable[float]) -> float:
    """TOFU forget quality: the p-value of the two-sample Kolmogorov-Smirnov test (scipy ``ks_2samp``)
    between the unlearned model's raw forget-set truth ratios and a retain model's (a model never
    trained on the forget set). High (near 1): indistinguishable from the retain model."""
    from scipy.stats import ks_2samp

    a = _as_1d(unlearned_ratios, "unlearned_ratios")
    b = _as_1d(retain_ratios, "retain_ratios")
    return float(ks_2samp(a, b).pvalue)


def model_utility(statistics: Mapping[str, float] | Sequence[float]) -> float:
    """TOFU model utility: the harmonic mean (scipy ``hmean``) of the nine statistics
    {probability, ROUGE-L recall, truth ratio} x {retain, real_authors, world_facts}.

    MU = n / sum_i (1 / s_i); any statistic equal to 0 makes MU = 0.
    """
    values = list(statistics.values()) if isinstance(statistics, Mapping) else list(statistics)
    array = _as_1d(values, "statistics")
    if np.any(array < 0):
        raise ValueError("model utility statistics must be non-negative")
    if np.any(array == 0):
        return 0.0
    from scipy.stats import hmean

    return float(hmean(array))


# --------------------------------------------------------------------------------------------------
# MUSE privacy leakage
# --------------------------------------------------------------------------------------------------


def min_k_percent_prob(token_logprobs: Iterable[float], k: float = 0.4) -> float:
    """Min-K% Prob membership score of one text (Shi et al., 2024): the mean log-probability of the
    k fraction of its tokens the model finds least likely,
        score = (1 / m) * sum of the m smallest log p(x_t | x_<t),  m = max(1, floor(k * T)).
    Higher means more likely to be a training member. MUSE's PrivLeak uses k = 0.4."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    logprobs = np.sort(_as_1d(token_logprobs, "token_logprobs"))
    m = max(1, int(math.floor(k * logprobs.size)))
    return float(logprobs[:m].mean())


def mia_auc(member_scores: Iterable[float], nonmember_scores: Iterable[float]) -> float:
    """ROC AUC (scikit-learn) of a membership-inference score separating members (label 1, e.g. the
    forget set) from non-members (label 0, e.g. the holdout set). 1: members fully exposed;
    0.5: indistinguishable. This is the conventional orientation (open-unlearning's ``mia_min_k``)."""
    from sklearn.metrics import roc_auc_score

    members = _as_1d(member_scores, "member_scores")
    nonmembers = _as_1d(nonmember_scores, "nonmember_scores")
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    return float(roc_auc_score(labels, np.concatenate([members, nonmembers])))


def privleak(auc_unlearned: float, auc_retain: float) -> float:
    """MUSE PrivLeak, in percent, from two conventional MIA AUCs (see ``mia_auc``).

    MUSE computes its AUC with the opposite orientation, AUC_muse = 1 - AUC, and reports
        PrivLeak = (AUC_muse(unlearned) - AUC_muse(retain)) / (AUC_muse(retain) + 1e-10) * 100,
    so the target model (forget set fully exposed, AUC ~ 1) scores about -100, a good unlearning
    about 0 and over-unlearning a large positive value, matching MUSE's published numbers. The 1e-10 is
    open-unlearning's (its ``privleak``); a retain AUC of exactly 1 gives a huge value rather than an error.
    """
    for name, value in (("auc_unlearned", auc_unlearned), ("auc_retain", auc_retain)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    ref = 1.0 - auc_retain
    return ((1.0 - auc_unlearned) - ref) / (ref + OPEN_UNLEARNING_EPS) * 100.0


# --------------------------------------------------------------------------------------------------
# Memorization (from teacher-forced greedy predictions)
# --------------------------------------------------------------------------------------------------

EXTRACTION_CONVENTIONS = ("open-unlearning", "paper")


def _predictions_and_labels(predictions: Sequence[int], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(predictions, dtype=np.int64).reshape(-1)
    gold = np.asarray(labels, dtype=np.int64).reshape(-1)
    if pred.size != gold.size or gold.size == 0:
        raise ValueError(f"predictions and labels must be non-empty and of one length, got {pred.size} and {gold.size}")
    return pred, gold


def exact_memorization(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Exact memorization (Tirumala et al., 2022) of one answer: the fraction of its tokens that the
    model's greedy next-token prediction gets right given the true prefix,
        EM = (1 / n) * sum_t [argmax_v p(v | x, y_<t) == y_t]."""
    pred, gold = _predictions_and_labels(predictions, labels)
    return float(np.mean(pred == gold))


def extraction_strength(
    predictions: Sequence[int], labels: Sequence[int], *, convention: str = "open-unlearning"
) -> float:
    """Extraction strength (Carlini et al., 2021; as in open-unlearning) of one answer y of n tokens:
    how short a prefix of y the model needs to reproduce the rest of it greedily,
        ES = 1 - k* / n,  k* = min { k : argmax p(. | x, y_<t) == y_t for every t >= k }.
    With teacher-forced predictions this equals greedy generation from the prefix y_<k.
    ``convention`` says what happens when not even the last token is reproduced: "paper" lets k*
    reach n (the empty suffix), so ES = 0; "open-unlearning" searches k in 0..n-1 only and ends at
    k = n - 1, so ES = 1 / n (its ``extraction_strength`` does this)."""
    if convention not in EXTRACTION_CONVENTIONS:
        raise ValueError(f"unknown extraction-strength convention {convention!r}; expected one of {EXTRACTION_CONVENTIONS}")
    pred, gold = _predictions_and_labels(predictions, labels)
    n = gold.size
    wrong = np.flatnonzero(pred != gold)
    k = 0 if wrong.size == 0 else int(wrong[-1]) + 1  # the suffix after the last mistake is reproduced
    if convention == "open-unlearning":
        k = min(k, n - 1)
    return 1.0 - k / n


# --------------------------------------------------------------------------------------------------
# Language modeling
# --------------------------------------------------------------------------------------------------


def perplexity(token_logprobs: Iterable[Iterable[float]]) -> float:
    """Corpus perplexity over all scored tokens of all windows: PPL = exp(-sum_t log p_t / N)."""
    rows = [np.asarray(list(row), dtype=np.float64) for row in token_logprobs]
    total = sum(row.size for row in rows)
    if total == 0:
        raise ValueError("perplexity needs at least one scored token")
    return float(math.exp(-sum(row.sum() for row in rows) / total))
