"""Relearning through the engine: a tiny model that memorized a set, then had it ascended away, gets its answer
probability back when relearned; relearning is deterministic and leaves its input alone; the RTT halves."""
import copy

import pytest
import torch

from sga.attacks.measure import measure
from sga.attacks.relearn import RelearnSettings, relearn, relearn_plan, split_halves
from sga.attacks.scores import relearn_score
from sga.benchmarks.synthetic import generate_synthetic_tofu
from sga.config import ConfigError, MethodConfig, TrainConfig, UnlearnConfig
from sga.data.records import encode_record
from sga.data.unlearning import UnlearningData
from sga.engine.trainer import UnlearningTrainer
from sga.models import tiny_random_model, tiny_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tokenizer, forget records, the memorized model, the same model after gradient ascent on the records)."""
    tok = tiny_tokenizer()
    records = generate_synthetic_tofu(2, seed=0)["forget01_perturbed"][:4]
    memorized = relearn(tiny_random_model("llama", tok, seed=0), tok, records, RelearnSettings(epochs=60, lr=1e-2, batch_size=4))
    work = tmp_path_factory.mktemp("ga")
    config = UnlearnConfig(method=MethodConfig(name="ga"), train=TrainConfig(output_dir=str(work), epochs=6, batch_size=4, learning_rate=3e-3, progress=False))
    config.model.name_or_path = "(in memory)"
    config.data.dataset = "json"
    unlearned = copy.deepcopy(memorized)
    examples = [encode_record(tok, r, max_length=256, use_chat_template=False) for r in records]
    assert UnlearningTrainer(unlearned, tok, UnlearningData(examples, []), config).train().status == "completed"
    return tok, records, memorized, unlearned.eval()


def _prob(model, tok, records) -> float:
    return measure(model, tok, records, truth_ratio=False, max_new_tokens=2).metrics()["forget_prob"]


def test_relearning_brings_the_forgotten_answers_back(setup):
    tok, records, memorized, unlearned = setup
    p_memorized, p_unlearned = _prob(memorized, tok, records), _prob(unlearned, tok, records)
    assert p_memorized > 0.5 and p_unlearned < 0.1 * p_memorized  # memorized, then ascended away
    settings = RelearnSettings(epochs=2, lr=3e-3, batch_size=32)
    p_relearned = _prob(relearn(unlearned, tok, records, settings), tok, records)
    assert p_relearned > 3 * p_unlearned  # it comes back
    assert _prob(unlearned, tok, records) == p_unlearned  # the input model is untouched
    # a model that never learned the set (the retain model's role) gains far less from the same relearning
    fresh = tiny_random_model("llama", tok, seed=1)
    p_fresh = _prob(fresh, tok, records)
    d_fresh = _prob(relearn(fresh, tok, records, settings), tok, records) - p_fresh
    assert p_relearned - p_unlearned > 10 * d_fresh
    assert relearn_score(p_relearned - p_unlearned, d_fresh) < 0.2  # not durable


def test_relearning_is_deterministic_in_its_seed(setup):
    tok, records, _, unlearned = setup
    runs = [relearn(unlearned, tok, records, RelearnSettings(lr=1e-3, seed=seed)) for seed in (0, 0, 1)]
    a, b, c = (dict(m.named_parameters()) for m in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed: the same weights, bit for bit
    # one step on the whole set (batch capped at its size): the order does not matter, so another seed agrees too
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_split_halves_are_disjoint_seeded_and_cover_the_set():
    learned, measured = split_halves(7, seed=3)
    assert len(learned) == 3 and len(measured) == 4 and sorted(learned + measured) == list(range(7))
    assert split_halves(7, seed=3) == (learned, measured) and split_halves(7, seed=4) != (learned, measured)
    with pytest.raises(ValueError, match="at least 2"):
        split_halves(1, seed=0)


def test_relearn_plans():
    forget = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(6)]
    related = [{"question": "r", "answer": "s"}]
    assert relearn_plan(RelearnSettings("forget"), forget) == (forget, list(range(6)))
    records, measured = relearn_plan(RelearnSettings("split", seed=2), forget)
    assert len(records) == 3 and not {int(r["question"][1:]) for r in records} & set(measured)
    assert relearn_plan(RelearnSettings("related"), forget, related) == (related, list(range(6)))
    with pytest.raises(ValueError, match="related records"):
        relearn_plan(RelearnSettings("related"), forget)


@pytest.mark.parametrize("settings, message", [
    (RelearnSettings("everything"), "relearn set must be one of forget, split, related"),
    (RelearnSettings(epochs=0), "relearn epochs must be >= 1"),
    (RelearnSettings(lr=-1e-5), "relearn lr must be a positive number"),
    (RelearnSettings(batch_size=0), "relearn batch_size must be >= 1"),
])
def test_bad_relearn_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        settings.validate()
