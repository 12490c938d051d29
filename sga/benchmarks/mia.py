"""Membership-inference attacks (MIA): per-text scores and the AUC that separates forget from holdout.

Scores follow open-unlearning's sign convention: *loss-like*, higher means "less likely a training
member". The AUC is taken with the forget texts labelled 0 and the holdout texts 1 (scikit-learn
``roc_auc_score``), so AUC = P(score(holdout) > score(forget)): 1 when the forget set is fully exposed,
0.5 when the model cannot tell the two apart, the orientation of open-unlearning's ``mia_*`` metrics and
of ``metrics.mia_auc``. ``metrics.privleak`` turns the Min-K AUC into MUSE's PrivLeak.

The attacks, with l(x) the token-mean NLL of a text's labelled tokens:
- ``loss``      (Yeom et al., 2018):       s = l(x)
- ``zlib``      (Carlini et al., 2021):    s = l(x) / len(zlib.compress(text))
- ``min_k``     (Shi et al., 2024):        s = -mean of the k fraction of smallest log p(x_t)
- ``min_k++``   (Zhang et al., 2025):      s = -mean of the k fraction of smallest
                                           (log p(x_t) - mu_t) / sqrt(max(sigma_t^2, 1e-6))
- ``reference`` (Carlini et al., 2022):    s = l_target(x) - l_reference(x)
- ``gradnorm``  (Wang et al., 2024):       s = mean over parameters W of ||dl/dW||_p
Token sets as in open-unlearning: loss, zlib and reference score every labelled token; min_k,
min_k++ and gradnorm leave the last labelled token out.
"""
from __future__ import annotations

import zlib
from typing import Any, Iterable, Sequence

import numpy as np

from . import metrics
from .prompts import IGNORE_INDEX, EncodedExample
from .scoring import TokenStatistics, gradient_norms, token_logprobs, token_statistics

ATTACKS = ("loss", "zlib", "min_k", "min_k++", "reference", "gradnorm")
# The attacks one forward pass of the evaluated model gives (``reference`` and ``gradnorm`` cost more).
DEFAULT_ATTACKS = ("loss", "zlib", "min_k", "min_k++")
# open-unlearning's metric name of each attack.
METRIC_NAMES = {
    "loss": "mia_loss",
    "zlib": "mia_zlib",
    "min_k": "mia_min_k",
    "min_k++": "mia_min_k_plus_plus",
    "reference": "mia_reference",
    "gradnorm": "mia_gradnorm",
}
MIN_K_PLUS_PLUS_MIN_VARIANCE = 1e-6


def _logprobs(values: Iterable[float]) -> np.ndarray:
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"token log-probabilities must be one-dimensional, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("token log-probabilities contain non-finite values")
    return array


def loss_score(logprobs: Iterable[float]) -> float:
    """LOSS attack: s = l(x) = -mean_t log p(x_t)."""
    lp = _logprobs(logprobs)
    if lp.size == 0:
        raise ValueError("the LOSS score needs at least one token")
    return float(-lp.mean())


def zlib_score(logprobs: Iterable[float], text: str) -> float:
    """ZLib attack: s = l(x) / len(zlib.compress(text.encode("utf-8"))), the NLL over the text's
    zlib entropy (its compressed size in bytes)."""
    return loss_score(logprobs) / len(zlib.compress(text.encode("utf-8")))


def min_k_score(logprobs: Iterable[float], k: float = 0.4) -> float:
    """Min-K% Prob attack: s = -(1/m) sum of the m smallest log p(x_t), m = max(1, floor(k T));
    0 for a text with no token (open-unlearning's value). Equals ``-metrics.min_k_percent_prob``."""
    lp = _logprobs(logprobs)
    return 0.0 if lp.size == 0 else -metrics.min_k_percent_prob(lp, k)


def min_k_plus_plus_score(
    logprobs: Iterable[float], expected_logprob: Iterable[float], logprob_variance: Iterable[float], k: float = 0.4
) -> float:
    """Min-K%++ attack: each token's log-probability standardized by the model's own next-token
    distribution, z_t = (log p(x_t) - mu_t) / sqrt(max(sigma_t^2, 1e-6)) with mu_t = E_v[log p_v] and
    sigma_t^2 = Var_v[log p_v] under p; s = -(mean of the k fraction of smallest z_t); 0 for no token."""
    lp, mu, var = _logprobs(logprobs), _logprobs(expected_logprob), _logprobs(logprob_variance)
    if not lp.size == mu.size == var.size:
        raise ValueError(f"logprobs, expected_logprob and logprob_variance differ in length: {lp.size}, {mu.size}, {var.size}")
    if lp.size == 0:
        return 0.0
    z = (lp - mu) / np.sqrt(np.maximum(var, MIN_K_PLUS_PLUS_MIN_VARIANCE))
    return -metrics.min_k_percent_prob(z, k)


def reference_score(logprobs: Iterable[float], reference_logprobs: Iterable[float]) -> float:
    """Reference-model attack: s = l_target(x) - l_reference(x), each the token-mean NLL."""
    return loss_score(logprobs) - loss_score(reference_logprobs)


def attack_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """ROC AUC of loss-like attack scores with forget = 0 and holdout = 1:
    AUC = P(s_holdout > s_forget) + P(s_holdout = s_forget) / 2 (1: forget set fully exposed)."""
    # metrics.mia_auc labels its first argument 1 and wants higher = member: negate the scores.
    return metrics.mia_auc(-np.asarray(forget_scores, float), -np.asarray(holdout_scores, float))


def check_attacks(attacks: Sequence[str], reference_model) -> None:
    """A ValueError for unknown attacks, or for a reference model given without the reference attack
    or missing for it."""
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"unknown or no MIA attacks {unknown or list(attacks)}; expected some of {ATTACKS}")
    if "reference" in attacks and reference_model is None:
        raise ValueError("the 'reference' attack needs a reference_model (e.g. the retain model)")
    if "reference" not in attacks and reference_model is not None:
        raise ValueError("a reference_model is given but 'reference' is not among the MIA attacks")


def _labelled_text(tokenizer, example: EncodedExample) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=True)


def attack_scores(
    model,
    tokenizer,
    examples: Sequence[EncodedExample],
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    *,
    k: float = 0.4,
    reference_model=None,
    gradnorm_p: float = 2.0,
    batch_size: int = 8,
    statistics: Sequence[TokenStatistics] | None = None,
    name: str = "mia",
) -> dict[str, list[float]]:
    """The score of every example under every attack: attack -> scores in input order.

    ``statistics`` (``scoring.token_statistics`` of ``examples``) reuses a forward pass already made.
    ``reference_model`` is needed by, and only by, the ``reference`` attack."""
    check_attacks(attacks, reference_model)
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if statistics is None:
        statistics = token_statistics(model, examples, batch_size=batch_size, desc=f"{name}: scoring")
    if len(statistics) != len(examples):
        raise ValueError(f"{len(statistics)} token statistics for {len(examples)} examples")
    scores: dict[str, list[float]] = {}
    for attack in attacks:
        if attack == "loss":
            scores[attack] = [loss_score(s.logprobs) for s in statistics]
        elif attack == "zlib":
            scores[attack] = [zlib_score(s.logprobs, _labelled_text(tokenizer, e)) for s, e in zip(statistics, examples)]
        elif attack == "min_k":
            scores[attack] = [min_k_score(s.without_last().logprobs, k) for s in statistics]
        elif attack == "min_k++":
            trimmed = [s.without_last() for s in statistics]
            scores[attack] = [min_k_plus_plus_score(s.logprobs, s.expected_logprob, s.logprob_variance, k) for s in trimmed]
        elif attack == "reference":
            ref = token_logprobs(reference_model, examples, batch_size=batch_size, desc=f"{name}: reference model")
            scores[attack] = [reference_score(s.logprobs, r) for s, r in zip(statistics, ref)]
        else:
            scores[attack] = gradient_norms(model, examples, p=gradnorm_p, desc=f"{name}: gradient norms")
    return scores


def membership_inference(
    model,
    tokenizer,
    forget: Sequence[EncodedExample],
    holdout: Sequence[EncodedExample],
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    *,
    forget_statistics: Sequence[TokenStatistics] | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Run the attacks on forget (members) and holdout (non-members) texts.

    Returns attack -> {"auc": AUC, "forget": scores, "holdout": scores}. ``kwargs`` go to
    ``attack_scores`` (k, reference_model, gradnorm_p, batch_size)."""
    if not forget or not holdout:
        raise ValueError(f"membership inference needs forget and holdout texts, got {len(forget)} and {len(holdout)}")
    on_forget = attack_scores(model, tokenizer, forget, attacks, statistics=forget_statistics, name="mia forget", **kwargs)
    on_holdout = attack_scores(model, tokenizer, holdout, attacks, name="mia holdout", **kwargs)
    return {
        attack: {"auc": attack_auc(on_forget[attack], on_holdout[attack]), "forget": on_forget[attack], "holdout": on_holdout[attack]}
        for attack in attacks
    }


def auc_results(found: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``membership_inference``'s AUCs under this library's result keys: ``mia_<attack>_auc``."""
    return {f"{METRIC_NAMES[attack]}_auc": out["auc"] for attack, out in found.items()}


def privleak_from(found: dict[str, dict[str, Any]], retain_auc: float | None) -> float | None:
    """MUSE's PrivLeak (``metrics.privleak``) of the Min-K attack against a retain model's Min-K AUC;
    None without that AUC or without the Min-K attack."""
    if retain_auc is None or "min_k" not in found:
        return None
    return metrics.privleak(found["min_k"]["auc"], retain_auc)
