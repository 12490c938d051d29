"""Metric functions against values computed by hand on small inputs."""
import math

import numpy as np
import pytest

from sga.benchmarks import metrics


def test_rouge_l_recall_counts_the_longest_common_subsequence():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the mat": 5 of 6 tokens.
    [score] = metrics.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"], measure="recall")
    assert score == pytest.approx(5 / 6)
    # Recall ignores extra predicted words; precision does not.
    [recall] = metrics.rouge_l(["paris is the capital of france"], ["paris"], measure="recall")
    [precision] = metrics.rouge_l(["paris is the capital of france"], ["paris"], measure="precision")
    assert recall == 1.0 and precision == pytest.approx(1 / 6)


def test_rouge_l_fmeasure_and_stemmer():
    # LCS 2, recall 2/2, precision 2/4: F = 2 * 1 * 0.5 / 1.5.
    [f] = metrics.rouge_l(["a b c d"], ["a b"], measure="fmeasure")
    assert f == pytest.approx(2 / 3)
    [stemmed] = metrics.rouge_l(["cats running"], ["cat run"], use_stemmer=True)
    [raw] = metrics.rouge_l(["cats running"], ["cat run"], use_stemmer=False)
    assert stemmed == 1.0 and raw == 0.0


def test_rouge_l_rejects_bad_input():
    with pytest.raises(ValueError, match="measure"):
        metrics.rouge_l(["a"], ["a"], measure="rouge2")
    with pytest.raises(ValueError, match="references"):
        metrics.rouge_l(["a", "b"], ["a"])


def test_sentence_bleu_by_hand():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (BP = 1): BLEU = (1/12)^(1/4) * 100.
    [score] = metrics.sentence_bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert score == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, rel=1e-6)
    assert metrics.sentence_bleu(["an exact copy of it"], ["an exact copy of it"]) == [pytest.approx(100.0)]


def test_answer_and_normalized_probability():
    assert metrics.answer_probability([0.0, math.log(2)]) == pytest.approx([1.0, 0.5])
    # P(a) = 1, one perturbed answer with P = 1/4: 1 / (1 + 1/4).
    # P(a) = 1/2, two perturbed answers with P = 1/4 each: (1/2) / (1/2 + 1/2).
    got = metrics.normalized_probability([0.0, math.log(2)], [[math.log(4)], [math.log(4), math.log(4)]])
    assert got == pytest.approx([0.8, 0.5])
    # open-unlearning's denominator carries + 1e-10: P = 1e-12 against P_wrong = 1e-12 gives 1e-12 / 1.02e-10.
    [tiny] = metrics.normalized_probability([-math.log(1e-12)], [[-math.log(1e-12)]])
    assert tiny == pytest.approx(1e-12 / (2e-12 + 1e-10), rel=1e-9)


def test_truth_ratio_is_geometric_mean_of_perturbed_over_paraphrased():
    # Normalized probabilities: paraphrased 1/2, perturbed 1/5 and 1/20 (geometric mean 1/10): R = 0.2.
    ratios = metrics.truth_ratios([math.log(2)], [[math.log(5), math.log(20)]])
    assert ratios == pytest.approx([0.2])
    # Ragged rows are fine: a question with three perturbed answers beside one with one.
    ratios = metrics.truth_ratios([0.0, 1.0], [[1.0, 2.0, 3.0], [1.0]])
    assert ratios == pytest.approx([math.exp(-2.0), 1.0])
    with pytest.raises(ValueError, match="rows"):
        metrics.truth_ratios([0.0, 1.0], [[1.0]])


def test_truth_ratio_divides_by_correct_plus_1e_10_as_open_unlearning():
    # A world-facts answer with P_correct = 1e-7 and perturbed answers with P = 2e-7:
    # open-unlearning's R = 2e-7 / (1e-7 + 1e-10) = 1.998002, not the plain ratio 2.
    [r] = metrics.truth_ratios([-math.log(1e-7)], [[-math.log(2e-7)] * 3])
    assert r == pytest.approx(2e-7 / (1e-7 + 1e-10), rel=1e-12)
    assert abs(r - 2.0) > 1e-3
    # An answer so unlikely that P underflows to 0: R = P_pert / 1e-10 stays finite.
    [huge] = metrics.truth_ratios([1e4], [[1.0]])
    assert huge == pytest.approx(math.exp(-1.0) / 1e-10)
    # The forget aggregate min(R, 1 / (R + 1e-10)) at R = 0 is 0 (not a division by zero).
    assert metrics.truth_ratio_score([0.0, 1.0], forget=True) == pytest.approx((0.0 + 1 / (1 + 1e-10)) / 2)


def test_truth_ratio_score_forget_and_retain():
    ratios = [0.5, 2.0, 1.0]
    # forget: mean(min(R, 1/R)) = (0.5 + 0.5 + 1) / 3; elsewhere mean(max(0, 1 - R)) = (0.5 + 0 + 0) / 3.
    assert metrics.truth_ratio_score(ratios, forget=True) == pytest.approx(2 / 3)
    assert metrics.truth_ratio_score(ratios, forget=False) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="non-negative"):
        metrics.truth_ratio_score([-0.1], forget=True)


def test_forget_quality_is_the_ks_p_value():
    # Fully separated samples of 3 and 3: D = 1, exact two-sided p = 2 / C(6, 3) = 0.1.
    assert metrics.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    assert metrics.forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="retain_ratios"):
        metrics.forget_quality([1.0], [])


def test_model_utility_harmonic_mean():
    # 3 / (1/1 + 1/0.5 + 1/0.25) = 3 / 7.
    assert metrics.model_utility([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert metrics.model_utility({"a": 0.5, "b": 0.5}) == pytest.approx(0.5)
    assert metrics.model_utility([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        metrics.model_utility([0.5, -0.1])


def test_min_k_percent_prob():
    logprobs = [-1.0, -5.0, -2.0, -4.0, -3.0]
    # k = 0.4 of 5 tokens: the 2 least likely, -5 and -4.
    assert metrics.min_k_percent_prob(logprobs, 0.4) == pytest.approx(-4.5)
    # floor(0.1 * 5) = 0, at least one token is kept.
    assert metrics.min_k_percent_prob(logprobs, 0.1) == pytest.approx(-5.0)
    assert metrics.min_k_percent_prob(logprobs, 1.0) == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="k must be"):
        metrics.min_k_percent_prob(logprobs, 0.0)


def test_mia_auc_counts_correctly_ordered_pairs():
    assert metrics.mia_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    # Member/non-member pairs (1,2) (1,4) (3,2) (3,4): one of four has the member scoring higher.
    assert metrics.mia_auc([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.25)
    assert metrics.mia_auc([1.0], [1.0]) == pytest.approx(0.5)


def test_privleak_follows_muse():
    # MUSE's published News numbers: target AUC_muse 0.0009, retrain 0.4772 (conventional AUC = 1 - those).
    assert metrics.privleak(1 - 0.0009, 1 - 0.4772) == pytest.approx((0.0009 - 0.4772) / 0.4772 * 100, rel=1e-9)
    assert metrics.privleak(0.6, 0.6) == 0.0
    # Over-unlearning (forget texts now less likely than holdout ones) gives a positive leak.
    assert metrics.privleak(0.2, 0.5) == pytest.approx(60.0)
    # A retain AUC of 1: open-unlearning's (s - r) / (r + 1e-10) * 100 with r = 0, not an error.
    assert metrics.privleak(0.5, 1.0) == pytest.approx(0.5 / 1e-10 * 100)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.privleak(1.5, 0.5)


def test_perplexity_pools_tokens_over_windows():
    # Token probabilities 1/2, 1/4, 1/2: mean NLL = 4 ln 2 / 3.
    got = metrics.perplexity([np.log([0.5, 0.25]), np.log([0.5])])
    assert got == pytest.approx(2 ** (4 / 3))
    with pytest.raises(ValueError, match="at least one"):
        metrics.perplexity([[]])


def test_rouge_scores_give_open_unlearnings_three_numbers():
    # "a b c d" against "a b": ROUGE-1 recall 2/2, ROUGE-L F = 2/3, ROUGE-L recall 1.
    [score] = metrics.rouge_scores(["a b c d"], ["a b"], use_stemmer=False)
    assert score == pytest.approx({"rouge1_recall": 1.0, "rougeL_f1": 2 / 3, "rougeL_recall": 1.0})
    # The stemmer maps "cats running" to "cat run": the two conventions of MUSE's ROUGE differ here.
    [stemmed] = metrics.rouge_scores(["cats running"], ["cat run"], use_stemmer=True)
    [raw] = metrics.rouge_scores(["cats running"], ["cat run"], use_stemmer=False)
    assert stemmed["rougeL_f1"] == 1.0 and raw["rougeL_f1"] == 0.0


def test_exact_memorization_counts_correct_greedy_tokens():
    assert metrics.exact_memorization([1, 2, 3, 4], [1, 2, 9, 4]) == pytest.approx(3 / 4)
    assert metrics.exact_memorization([5], [5]) == 1.0
    with pytest.raises(ValueError, match="one length"):
        metrics.exact_memorization([1, 2], [1])


@pytest.mark.parametrize(
    "predictions, labels, open_unlearning, paper",
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], 1.0, 1.0),      # everything reproduced from the empty prefix: k* = 0
        ([9, 2, 3, 4], [1, 2, 3, 4], 0.75, 0.75),    # first token wrong, the rest right: k* = 1
        ([1, 9, 3, 4], [1, 2, 3, 4], 0.5, 0.5),      # a mistake at t = 1: the suffix from t = 2 on, k* = 2
        ([1, 2, 3, 9], [1, 2, 3, 4], 0.25, 0.0),     # last token wrong: open-unlearning stops at k = n - 1
    ],
)
def test_extraction_strength_by_hand(predictions, labels, open_unlearning, paper):
    assert metrics.extraction_strength(predictions, labels) == pytest.approx(open_unlearning)
    assert metrics.extraction_strength(predictions, labels, convention="paper") == pytest.approx(paper)


def test_extraction_strength_matches_a_literal_suffix_search():
    # The definition written out: the first k whose suffix predictions equal the suffix labels, k in 0..n-1.
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 8))
        labels = rng.integers(0, 3, n)
        preds = np.where(rng.random(n) < 0.7, labels, rng.integers(0, 3, n))
        k = next((k for k in range(n) if np.array_equal(preds[k:], labels[k:])), n - 1)
        assert metrics.extraction_strength(preds, labels) == pytest.approx(1 - k / n)
    with pytest.raises(ValueError, match="convention"):
        metrics.extraction_strength([1], [1], convention="carlini")
