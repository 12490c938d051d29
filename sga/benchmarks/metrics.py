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
    TOFU reports the recall with the Porter stemmer on; MUSE reports the F-measure without it.
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

    P_norm = P(a) / (P(a) + sum_j P(a_pert_j)), each P the length-normalized probability exp(-l).
    """
    correct = _as_1d(answer_nll, "answer_nll")
    wrong = _ragged(perturbed_nll, correct.size, "perturbed_nll")
    p_true = np.exp(-correct)
    p_wrong = np.array([np.exp(-row).sum() for row in wrong])
    return p_true / (p_true + p_wrong)


def truth_ratios(correct_nll: Iterable[float], perturbed_nll: Sequence[Sequence[float]]) -> np.ndarray:
    """TOFU's raw truth ratio per question.

    R_truth = (prod_j P(a_pert_j)^(1/|a_pert_j|))^(1/k) / P(a_para)^(1/|a_para|)
            = exp(l(a_para) - mean_j l(a_pert_j)),
    with l the token-mean NLL, so P^(1/|a|) = exp(-l). The mean over the k perturbed answers is taken
    in log space (a geometric mean of their normalized probabilities), as TOFU's
    ``aggregate_eval_stat.py`` and open-unlearning compute it. ``correct_nll`` is the paraphrased
    answer's NLL for the forget and retain sets and the answer's own NLL for real_authors / world_facts.
    R < 1: the model prefers the correct answer; R ~ 1: it cannot tell them apart.
    """
    correct = _as_1d(correct_nll, "correct_nll")
    wrong = _ragged(perturbed_nll, correct.size, "perturbed_nll")
    return np.exp(correct - np.array([row.mean() for row in wrong]))


def truth_ratio_score(ratios: Iterable[float], *, forget: bool) -> float:
    """Aggregate per-question truth ratios into TOFU's reported "Truth Ratio" statistic.

    forget set:  mean(min(R, 1/R))     (1 when correct and perturbed answers are equally likely)
    other sets:  mean(max(0, 1 - R))   (1 when the correct answer dominates; the model-utility term)
    """
    r = _as_1d(ratios, "ratios")
    if np.any(r <= 0):
        raise ValueError("truth ratios must be positive")
    if forget:
        return float(np.mean(np.minimum(r, 1.0 / r)))
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
        PrivLeak = (AUC_muse(unlearned) - AUC_muse(retain)) / AUC_muse(retain) * 100,
    so the target model (forget set fully exposed, AUC ~ 1) scores about -100, a good unlearning
    about 0 and over-unlearning a large positive value, matching MUSE's published numbers.
    """
    for name, value in (("auc_unlearned", auc_unlearned), ("auc_retain", auc_retain)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    ref = 1.0 - auc_retain
    if ref == 0.0:
        raise ValueError("auc_retain = 1 makes PrivLeak undefined (division by zero)")
    return ((1.0 - auc_unlearned) - ref) / ref * 100.0


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
