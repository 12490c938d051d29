"""Membership-inference attacks: scores against hand computations on tiny inputs, the AUC orientation,
and the model-side statistics (token statistics, gradient norms) against direct computations on a tiny
random Llama."""
import math
import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from sga.benchmarks import mia
from sga.benchmarks.prompts import IGNORE_INDEX, encode_qa, encode_text
from sga.benchmarks.scoring import gradient_norms, memorization, token_statistics
from sga.models import tiny_random_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_random_model("llama", tokenizer, seed=0)


EXAMPLE_TEXTS = ["The ferry pier closed after engineers found cracks.", "Bakers said flour doubled in price.",
                 "A heron nested on the library roof."]


# ------------------------------------------------------------------------------------ scores by hand


def test_loss_and_zlib_scores():
    lp = [math.log(0.5), math.log(0.25)]
    # l = (ln 2 + ln 4) / 2 = 1.5 ln 2.
    assert mia.loss_score(lp) == pytest.approx(1.5 * math.log(2))
    text = "aaaaaaaaaaaaaaaaaaaa"
    assert mia.zlib_score(lp, text) == pytest.approx(1.5 * math.log(2) / len(zlib.compress(text.encode("utf-8"))))
    with pytest.raises(ValueError, match="at least one"):
        mia.loss_score([])


def test_min_k_score_is_the_negated_mean_of_the_lowest_log_probs():
    lp = [-1.0, -5.0, -2.0, -4.0, -3.0]
    # k = 0.4 of 5 tokens: the 2 smallest, -5 and -4; the score is their negated mean.
    assert mia.min_k_score(lp, 0.4) == pytest.approx(4.5)
    assert mia.min_k_score(lp, 0.1) == pytest.approx(5.0)  # at least one token
    assert mia.min_k_score([], 0.4) == 0.0  # open-unlearning's value for a text with no token
    with pytest.raises(ValueError, match="k must be"):
        mia.min_k_score(lp, 1.5)


def test_min_k_plus_plus_standardizes_by_the_next_token_distribution():
    lp = np.array([-1.0, -3.0, -2.0])
    mu = np.array([-1.5, -1.0, -2.0])
    var = np.array([0.25, 4.0, 0.0])  # the last variance is clamped to 1e-6
    z = (lp - mu) / np.sqrt([0.25, 4.0, 1e-6])  # [1, -1, 0]
    assert z == pytest.approx([1.0, -1.0, 0.0])
    # k = 0.67 of 3 tokens: floor(2.01) = 2 lowest z, -1 and 0: score 0.5.
    assert mia.min_k_plus_plus_score(lp, mu, var, 0.67) == pytest.approx(0.5)
    assert mia.min_k_plus_plus_score(lp, mu, var, 1.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="differ in length"):
        mia.min_k_plus_plus_score(lp, mu[:2], var, 0.4)


def test_reference_score_is_the_loss_difference():
    assert mia.reference_score([-1.0, -3.0], [-0.5, -0.5]) == pytest.approx(2.0 - 0.5)


def test_attack_auc_orientation_matches_open_unlearning():
    # Loss-like scores: forget texts with lower loss than every holdout text are fully exposed.
    assert mia.attack_auc([0.1, 0.2], [0.5, 0.9]) == 1.0
    assert mia.attack_auc([0.5, 0.9], [0.1, 0.2]) == 0.0
    rng = np.random.default_rng(0)
    forget, holdout = rng.normal(size=7), rng.normal(size=5)
    # open-unlearning: roc_auc_score with forget labelled 0 and holdout 1 on the raw scores.
    expected = roc_auc_score([0] * 7 + [1] * 5, np.concatenate([forget, holdout]))
    assert mia.attack_auc(forget, holdout) == pytest.approx(expected)
    # and by pair counting: P(holdout > forget) + ties / 2.
    pairs = [(h > f) + 0.5 * (h == f) for f in forget for h in holdout]
    assert mia.attack_auc(forget, holdout) == pytest.approx(np.mean(pairs))


def test_attack_choice_is_checked(model, tokenizer):
    examples = [encode_text(tokenizer, t) for t in EXAMPLE_TEXTS]
    with pytest.raises(ValueError, match="unknown or no MIA attacks"):
        mia.attack_scores(model, tokenizer, examples, ["min-k"])
    with pytest.raises(ValueError, match="needs a reference_model"):
        mia.attack_scores(model, tokenizer, examples, ["reference"])
    with pytest.raises(ValueError, match="not among"):
        mia.attack_scores(model, tokenizer, examples, ["loss"], reference_model=model)
    with pytest.raises(ValueError, match="forget and holdout"):
        mia.membership_inference(model, tokenizer, examples, [], ["loss"])


# ----------------------------------------------------------------------------------- model statistics


def direct_statistics(model, example):
    """log p(y), argmax, mu and sigma^2 of each labelled token from one unbatched float64 forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0].double()
    rows = [t - 1 for t, label in enumerate(example.labels) if label != IGNORE_INDEX]
    labels = [label for label in example.labels if label != IGNORE_INDEX]
    logp = torch.log_softmax(logits[rows], dim=-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * (logp - mu[:, None]) ** 2).sum(-1)  # the centred form of E[(log p)^2] - mu^2
    return logp[range(len(labels)), labels].numpy(), logits[rows].argmax(-1).numpy(), np.array(labels), mu.numpy(), var.numpy()


@pytest.mark.parametrize("chunk", [3, 512])  # softmax chunks that split the rows, and one that does not
def test_token_statistics_match_a_direct_computation(model, tokenizer, monkeypatch, chunk):
    import sga.benchmarks.scoring as scoring

    monkeypatch.setattr(scoring, "_STATISTICS_CHUNK", chunk)
    examples = [encode_text(tokenizer, t) for t in EXAMPLE_TEXTS] + [encode_qa(tokenizer, "Who?", "A heron.")]
    for example, stats in zip(examples, token_statistics(model, examples, batch_size=3)):
        logprobs, argmax, labels, mu, var = direct_statistics(model, example)
        assert stats.logprobs == pytest.approx(logprobs, abs=1e-5)
        assert stats.predictions.tolist() == argmax.tolist()
        assert stats.labels.tolist() == labels.tolist()
        assert stats.expected_logprob == pytest.approx(mu, abs=1e-4)
        assert stats.logprob_variance == pytest.approx(var, abs=1e-4)
        assert stats.without_last().labels.tolist() == labels[:-1].tolist()


def test_attack_scores_of_a_tiny_model_by_hand(model, tokenizer):
    examples = [encode_text(tokenizer, t) for t in EXAMPLE_TEXTS]
    reference = tiny_random_model("llama", tokenizer, seed=1)
    scores = mia.attack_scores(model, tokenizer, examples, ["loss", "zlib", "min_k", "min_k++", "reference"],
                               reference_model=reference, k=0.4)
    for i, (example, text) in enumerate(zip(examples, EXAMPLE_TEXTS)):
        logprobs, _, _, mu, var = direct_statistics(model, example)
        ref_logprobs = direct_statistics(reference, example)[0]
        loss = -logprobs.mean()
        assert scores["loss"][i] == pytest.approx(loss, rel=1e-5)
        # The labelled tokens decode back to the text (BOS is not labelled).
        assert scores["zlib"][i] == pytest.approx(loss / len(zlib.compress(text.encode())), rel=1e-5)
        kept = np.sort(logprobs[:-1])  # open-unlearning leaves the last labelled token out
        assert scores["min_k"][i] == pytest.approx(-kept[: max(1, int(0.4 * kept.size))].mean(), rel=1e-5)
        z = np.sort((logprobs[:-1] - mu[:-1]) / np.sqrt(np.maximum(var[:-1], 1e-6)))
        assert scores["min_k++"][i] == pytest.approx(-z[: max(1, int(0.4 * z.size))].mean(), rel=1e-4, abs=1e-4)
        assert scores["reference"][i] == pytest.approx(loss + ref_logprobs.mean(), rel=1e-5, abs=1e-6)


def test_gradient_norms_match_a_backward_pass(tokenizer):
    model = tiny_random_model("llama", tokenizer, seed=2)
    examples = [encode_text(tokenizer, t) for t in EXAMPLE_TEXTS[:2]]
    for p in (1.0, 2.0, float("inf")):
        got = gradient_norms(model, examples, p=p)
        for example, norm in zip(examples, got):
            model.zero_grad()
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0]
            # Every labelled token but the last: positions 1 .. T-2 predicted from 0 .. T-3.
            targets = torch.tensor(example.input_ids[1:-1])
            torch.nn.functional.cross_entropy(logits[: len(targets)], targets).backward()
            expected = np.mean([w.grad.norm(p=p).item() for w in model.parameters() if w.grad is not None])
            assert norm == pytest.approx(expected, rel=1e-4)
    model.zero_grad()
    gradient_norms(model, examples)
    assert all(w.grad is None or not w.grad.any() for w in model.parameters())  # .grad left untouched
    with pytest.raises(ValueError, match="p must be"):
        gradient_norms(model, examples, p=3)


def test_membership_inference_aucs_from_its_scores(model, tokenizer):
    forget = [encode_text(tokenizer, t) for t in EXAMPLE_TEXTS]
    holdout = [encode_text(tokenizer, t) for t in ("Volunteers planted oaks.", "The museum opened maps.")]
    found = mia.membership_inference(model, tokenizer, forget, holdout, ["loss", "min_k", "gradnorm"])
    assert set(found) == {"loss", "min_k", "gradnorm"}
    for out in found.values():
        assert len(out["forget"]) == 3 and len(out["holdout"]) == 2
        assert out["auc"] == pytest.approx(roc_auc_score([0, 0, 0, 1, 1], out["forget"] + out["holdout"]))
    assert mia.auc_results(found) == {"mia_loss_auc": found["loss"]["auc"], "mia_min_k_auc": found["min_k"]["auc"],
                                      "mia_gradnorm_auc": found["gradnorm"]["auc"]}
    assert mia.privleak_from(found, None) is None
    assert mia.privleak_from(found, 0.5) == pytest.approx(((1 - found["min_k"]["auc"]) - 0.5) / (0.5 + 1e-10) * 100)


def test_memorization_leaves_the_last_token_out(model, tokenizer):
    examples = [encode_text(tokenizer, t) for t in EXAMPLE_TEXTS]
    stats = token_statistics(model, examples)
    got = memorization(stats)
    for stat, em, es in zip(stats, got["exact_memorization"], got["extraction_strength"]):
        kept = stat.without_last()
        assert em == pytest.approx(np.mean(kept.predictions == kept.labels))
        assert 1.0 / kept.labels.size <= es <= 1.0
    # One labelled token: nothing is left; open-unlearning logs EM None and ES 0.
    single = token_statistics(model, [encode_text(tokenizer, "a")])
    assert single[0].labels.size == 1
    assert memorization(single) == {"exact_memorization": [None], "extraction_strength": [0.0]}
