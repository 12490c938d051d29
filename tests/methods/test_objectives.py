"""Unlearning objectives: formulas against a float64 reference from the logits, each method unlearns,
and sga with r = 0 is ga exactly."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine_helpers import (
    make_config,
    mean_nll,
    memorized_model,
    tokenizer,
    unlearning_data,
)
from sga.config import MethodConfig
from sga.engine.trainer import UnlearningTrainer
from sga.methods import METHODS, build_objective
from sga.models import tiny_random_model


def _reference_nll(model, batch, prefix, eps=0.0):
    """Per-sequence token-mean (smoothed) NLL of the answer tokens, float64 from materialized logits."""
    logits = model(input_ids=batch[f"{prefix}_input_ids"], attention_mask=batch[f"{prefix}_attention_mask"]).logits
    logits = logits[:, :-1].double()
    target = batch[f"{prefix}_labels"][:, 1:]
    keep = target != -100
    per_token = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none", label_smoothing=eps)
    return (per_token * keep).sum(1) / keep.sum(1)


def _kl_reference(model, reference, batch):
    inputs = dict(input_ids=batch["normal_input_ids"], attention_mask=batch["normal_attention_mask"])
    log_p = torch.log_softmax(model(**inputs).logits[:, :-1].double(), -1)
    log_q = torch.log_softmax(reference(**inputs).logits[:, :-1].double(), -1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    keep = batch["normal_labels"][:, 1:] != -100
    return (per_token * keep).sum(1) / keep.sum(1)


@pytest.fixture(scope="module")
def setup():
    tok = tokenizer()
    model = tiny_random_model("llama", tok, seed=3)
    data = unlearning_data(tok, num_classes=3)
    batch = data.batch([0, 3, 5], tok.pad_token_id)
    return tok, model, data, batch


def _expected(name, params, model, batch, n, reference=None):
    lf = _reference_nll(model, batch, "forget", eps=params.get("rate", 0.0) if name == "sga_token" else 0.0)
    ln = _reference_nll(model, batch, "normal")
    k = params.get("num_classes", 2)
    r = params.get("rate", 0.0)
    if name == "ga":
        return -lf.sum() / n
    if name == "sga":
        return (-(1 - r + r / k) * lf.sum() + (r / k) * ln.sum()) / n
    if name == "sga_gls":
        return (-(1 - r + r / k) * lf.sum() - (r / k) * ln.sum()) / n
    if name == "sga_token":
        return -lf.sum() / n
    if name == "sft":
        return lf.sum() / n
    if name == "grad_diff":
        alpha = params["retain_weight"]
        per_forget = ln.numel() // lf.numel()
        retain = _kl_reference(model, reference, batch) if params.get("retain_loss") == "kl" else ln
        return (-lf.sum() + alpha * retain.sum() / per_forget) / n
    counts = (batch["forget_labels"][:, 1:] != -100).sum(1).double()
    summed = lf * counts  # S = -log pi_theta(y|x)
    beta = params["beta"]
    if name == "npo":
        s_ref = batch["forget_reference_nll"].double()
        # (2/beta) log(1 + (pi_theta / pi_ref)^beta), pi_theta / pi_ref = exp(S_ref - S)
        return ((2 / beta) * torch.log1p(torch.exp(beta * (s_ref - summed)))).sum() / n
    if name == "simnpo":
        gamma = params["gamma"]
        log_pi = -summed
        return (-(2 / beta) * F.logsigmoid(-(beta / counts) * log_pi - gamma)).sum() / n
    raise AssertionError(name)


CASES = [
    ("ga", {}),
    ("sga", {"rate": 0.4, "num_classes": 3}),
    ("sga", {"rate": -0.7, "num_classes": 3}),
    ("sga_gls", {"rate": 0.4, "num_classes": 3}),
    ("sga_token", {"rate": 0.3}),
    ("grad_diff", {"retain_weight": 0.7, "num_classes": 3}),
    ("grad_diff", {"retain_weight": 0.7, "retain_loss": "kl", "num_classes": 3}),
    ("npo", {"beta": 0.3}),
    ("simnpo", {"beta": 0.8, "gamma": 0.2}),
    ("sft", {}),
]


@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_loss_matches_formula(setup, name, params):
    tok, model, data, batch = setup
    objective = build_objective(MethodConfig(name=name, **params), backend="torch")
    batch = dict(batch)
    if name == "npo":
        with torch.no_grad():
            summed = _reference_nll(model, batch, "forget") * (batch["forget_labels"][:, 1:] != -100).sum(1)
        batch["forget_reference_nll"] = (summed + torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)).float()
    reference = None
    if objective.uses_reference_model:
        reference = tiny_random_model("llama", tok, seed=4)
        objective.reference_model = reference
    n = torch.tensor(7.0)  # the window's forget count: not this micro-batch's size
    out = objective.compute(model, batch, n)
    expected = _expected(name, params, model, batch, 7.0, reference)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert out.forget_nll.shape == (3,)
    # the gradient too, on the LM head
    head = model.lm_head.weight
    (got,) = torch.autograd.grad(out.loss, head)
    (want,) = torch.autograd.grad(expected, head)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_registry_and_bad_parameters():
    assert set(METHODS) == {"ga", "sga", "sga_gls", "sga_token", "grad_diff", "npo", "simnpo", "sft",
                               "dpo", "idk_dpo", "wga", "satimp", "ce_u", "ihl", "undial", "pdu", "rmu"}
    with pytest.raises(ValueError, match="unknown method"):
        build_objective(MethodConfig(name="nope"))
    with pytest.raises(ValueError, match="K"):
        build_objective(MethodConfig(name="sga", num_classes=1))
    with pytest.raises(ValueError, match="eps"):
        build_objective(MethodConfig(name="sga_token", rate=1.5))
    with pytest.raises(ValueError, match="beta"):
        build_objective(MethodConfig(name="npo", beta=-1.0))
    assert build_objective(MethodConfig(name="npo")).beta == 0.1
    assert build_objective(MethodConfig(name="simnpo")).beta == 2.5


def _run(tmp_path, method, model=None, **settings):
    tok = tokenizer()
    model = model if model is not None else memorized_model()
    config = make_config(tmp_path, method, **settings)
    uses_normal = build_objective(config.method).uses_normal
    data = unlearning_data(tok, config.method.num_classes, normal=uses_normal)
    result = UnlearningTrainer(model, tok, data, config).train()
    return model, data, result


UNLEARN_CASES = [
    ("ga", {}),
    ("sga", {"rate": 0.5}),
    ("sga_gls", {"rate": 0.5}),
    ("sga_token", {"rate": 0.1}),
    ("grad_diff", {}),
    ("grad_diff", {"retain_loss": "kl"}),
    ("npo", {"beta": 0.1}),
    ("simnpo", {"beta": 0.5}),
]


@pytest.mark.parametrize("method, settings", UNLEARN_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(UNLEARN_CASES)])
def test_each_method_lowers_forget_likelihood(tmp_path, method, settings):
    tok = tokenizer()
    before_model = memorized_model()
    data = unlearning_data(tok)
    before = mean_nll(before_model, data.forget, tok)
    model, _, result = _run(tmp_path, method, max_steps=4, **settings)
    assert result.status == "completed" and result.step == 4
    after = mean_nll(model, data.forget, tok)
    assert after > before + 0.05, (method, before, after)


def test_sft_lowers_the_training_nll(tmp_path):
    """sft descends: the NLL of its training records goes down on a model that has not learnt them."""
    tok = tokenizer()
    data = unlearning_data(tok, normal=False)
    model = tiny_random_model("llama", tok, seed=0)
    before = mean_nll(model, data.forget, tok)
    model, _, result = _run(tmp_path, "sft", model=model, max_steps=4, learning_rate=1e-2)
    assert result.status == "completed"
    assert mean_nll(model, data.forget, tok) < before - 0.05


def test_sga_with_zero_rate_is_ga_exactly(tmp_path):
    ga_model, _, ga = _run(tmp_path / "ga", "ga", max_steps=3, grad_accum=2, batch_size=2)
    sga_model, _, sga = _run(tmp_path / "sga", "sga", max_steps=3, grad_accum=2, batch_size=2, rate=0.0, num_classes=3)
    assert [h["loss"] for h in ga.history] == [h["loss"] for h in sga.history]
    assert [h["forget_nll"] for h in ga.history] == [h["forget_nll"] for h in sga.history]
    for (name, p), (_, q) in zip(ga_model.named_parameters(), sga_model.named_parameters()):
        assert torch.equal(p, q), name
    # and a non-zero rate does change the run
    _, _, other = _run(tmp_path / "sga2", "sga", max_steps=3, grad_accum=2, batch_size=2, rate=0.3, num_classes=3)
    assert not math.isclose(other.history[-1]["loss"], sga.history[-1]["loss"])
