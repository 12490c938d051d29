"""open-unlearning's methods (dpo, idk_dpo, wga, satimp, ce_u, ihl, pdu, undial, rmu, the retain term on npo /
simnpo): loss and gradient against float64 references from materialized logits, a tiny-model run of each that
raises the forget NLL, the pdu dual update and its resume, and every method from the CLI."""
import json

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
from sga.cli import build_parser, main
from sga.config import ConfigError, DataConfig, MethodConfig
from sga.engine import checkpoint
from sga.engine.trainer import UnlearningTrainer
from sga.hf import causal_lm_token_loss
from sga.kernels import token_loss_reference
from sga.methods import (
    METHODS,
    NegativePreferenceOptimization,
    SimpleNPO,
    build_objective,
)
from sga.methods.preference import IDK_ANSWERS, PreferenceData
from sga.models import tiny_random_model

NEW_METHODS = ("dpo", "idk_dpo", "wga", "satimp", "ce_u", "ihl", "undial", "pdu", "rmu")
N_WINDOW = 7.0  # the window's forget count: not the micro-batch's size


def _logits(model, batch, prefix):
    out = model(input_ids=batch[f"{prefix}_input_ids"], attention_mask=batch[f"{prefix}_attention_mask"])
    return out.logits[:, :-1].double(), batch[f"{prefix}_labels"][:, 1:]


def _token_mean(per_token, target):
    keep = target != -100
    return (per_token * keep).sum(1) / keep.sum(1)


def _nll(model, batch, prefix):
    logits, target = _logits(model, batch, prefix)
    per_token = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
    return _token_mean(per_token, target)


def _rule(model, batch, rule, target=None, **params):
    logits, labels = _logits(model, batch, "forget")
    target = labels if target is None else target
    per_token = token_loss_reference(logits, target, rule, reduction="none", **params)
    return _token_mean(per_token, target)


def _retain(model, batch, alpha):
    normal = _nll(model, batch, "normal")
    return alpha * normal.sum() / (normal.numel() // batch["forget_input_ids"].shape[0])


def _summed(model, batch, prefix):
    return _nll(model, batch, prefix) * (batch[f"{prefix}_labels"][:, 1:] != -100).sum(1)


@pytest.fixture(scope="module")
def setup():
    tok = tokenizer()
    model = tiny_random_model("llama", tok, seed=3)
    data = unlearning_data(tok, num_classes=3)
    return tok, model, data


def _batch_for(objective, tok, data, model):
    if hasattr(objective, "prepare_data"):
        data = objective.prepare_data(data, tok, DataConfig(chat_template="auto"))
    batch = data.batch([0, 3, 5], tok.pad_token_id)
    if objective.uses_reference_nll:
        with torch.no_grad():
            batch["forget_reference_nll"] = (_summed(model, batch, "forget") + torch.tensor([0.5, -1.0, 2.0])).float()
            if "preferred_input_ids" in batch:
                batch["preferred_reference_nll"] = (_summed(model, batch, "preferred") + torch.tensor([-0.3, 0.7, 0.1])).float()
    return batch


def _expected(name, params, model, reference, batch):
    gamma, alpha = params.get("forget_weight"), params.get("alpha")
    if name == "wga":
        return (gamma or 1.0) * _rule(model, batch, "wga", beta=params.get("beta", 1.0)).sum() + _retain(model, batch, 1.0 if alpha is None else alpha)
    if name == "satimp":
        forget = _rule(model, batch, "satimp", beta1=params.get("beta1", 5.0), beta2=params.get("beta2", 1.0))
        return (0.1 if gamma is None else gamma) * forget.sum() + _retain(model, batch, 1.0 if alpha is None else alpha)
    if name == "ce_u":
        labels = batch["forget_labels"][:, 1:]
        first = (labels != -100).int().argmax(dim=1)  # the first answer token of each row is not scored
        target = labels.clone()
        target[torch.arange(len(first)), first] = -100
        return _rule(model, batch, "ce_u", target=target).sum()
    if name == "ihl":
        return _rule(model, batch, "ihl").sum() + (_retain(model, batch, alpha) if alpha else 0.0)
    if name == "pdu":
        normal = _nll(model, batch, "normal")
        dual, eps = params.get("dual", 1.0), params["retain_eps"]
        per_forget = normal.numel() // 3
        return _rule(model, batch, "pdu").sum() + dual * (normal.sum() / per_forget - eps * 3)
    if name == "undial":
        logits, target = _logits(model, batch, "forget")
        with torch.no_grad():
            teacher, _ = _logits(reference, batch, "forget")
        beta = params.get("beta", 10.0)
        lowered = teacher - beta * F.one_hot(target.clamp(min=0), teacher.shape[-1])
        per_token = -(torch.softmax(lowered, -1) * torch.log_softmax(logits, -1)).sum(-1)
        return _token_mean(per_token, target).sum()
    if name == "rmu":
        layer, coefficient = params["rmu_layer"], params.get("steering_coeff", 2.0)
        inputs = lambda prefix: dict(input_ids=batch[f"{prefix}_input_ids"], attention_mask=batch[f"{prefix}_attention_mask"],  # noqa: E731
                                     output_hidden_states=True)
        forget_h = model(**inputs("forget")).hidden_states[layer + 1].double()
        direction = torch.rand(forget_h.shape[-1], generator=torch.Generator().manual_seed(params.get("steering_seed", 0)))
        control = (coefficient * direction / direction.norm()).double()
        keep = (batch["forget_labels"] != -100).double()
        forget = (((forget_h - control) ** 2).mean(-1) * keep).sum(1) / keep.sum(1)
        normal_h = model(**inputs("normal")).hidden_states[layer + 1].double()
        with torch.no_grad():
            ref_h = reference(**inputs("normal")).hidden_states[layer + 1].double()
        keep_n = (batch["normal_labels"] != -100).double()
        retain = (((normal_h - ref_h) ** 2).mean(-1) * keep_n).sum(1) / keep_n.sum(1)
        return forget.sum() + (1.0 if alpha is None else alpha) * retain.sum() / (retain.numel() // 3)
    if name in ("dpo", "idk_dpo"):
        beta = params.get("beta", 0.1)
        margin = ((batch["preferred_reference_nll"].double() - _summed(model, batch, "preferred"))
                  - (batch["forget_reference_nll"].double() - _summed(model, batch, "forget")))
        return (-(2 / beta) * F.logsigmoid(beta * margin)).sum() + _retain(model, batch, 1.0 if alpha is None else alpha)
    if name == "npo":
        beta = params["beta"]
        summed = _summed(model, batch, "forget")
        npo = ((2 / beta) * F.softplus(beta * (batch["forget_reference_nll"].double() - summed))).sum()
        return (gamma or 1.0) * npo + _retain(model, batch, alpha)
    if name == "simnpo":
        beta, delta = params["beta"], params.get("gamma", 0.0)
        simnpo = ((2 / beta) * F.softplus(delta - beta * _nll(model, batch, "forget"))).sum()
        return gamma * simnpo + _retain(model, batch, alpha)
    raise AssertionError(name)


CASES = [
    ("wga", {}),
    ("wga", {"beta": 2.0, "alpha": 0.5, "forget_weight": 2.0}),
    ("satimp", {}),
    ("satimp", {"beta1": 1.0, "beta2": 2.0, "alpha": 0.0}),
    ("ce_u", {}),
    ("ihl", {}),
    ("ihl", {"alpha": 0.3}),
    ("pdu", {"retain_eps": 0.5}),
    ("undial", {"beta": 3.0}),
    ("rmu", {"rmu_layer": 0, "steering_coeff": 5.0}),
    ("idk_dpo", {}),
    ("dpo", {"beta": 0.5, "preferred_answers_file": "PREFERRED"}),
    ("npo", {"beta": 0.3, "alpha": 0.7}),
    ("simnpo", {"beta": 4.5, "gamma": 0.2, "alpha": 1.0, "forget_weight": 0.125}),
]


@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_loss_and_gradient_match_float64_reference(setup, tmp_path, name, params):
    tok, model, data = setup
    params = dict(params)
    if params.get("preferred_answers_file") == "PREFERRED":
        path = tmp_path / "preferred.txt"
        path.write_text("He is a baker in Lyon.\n\nNobody knows.\n")
        params["preferred_answers_file"] = str(path)
    objective = build_objective(MethodConfig(name=name, num_classes=3, **params), backend="torch")
    reference = None
    if objective.uses_reference_model:
        reference = tiny_random_model("llama", tok, seed=4)
        objective.reference_model = reference
    batch = _batch_for(objective, tok, data, model)
    out = objective.compute(model, batch, torch.tensor(N_WINDOW))
    expected = _expected(name, params, model, reference, batch) / N_WINDOW
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(out.forget_nll.double(), _nll(model, batch, "forget"), rtol=1e-5, atol=1e-6)
    head = model.lm_head.weight
    embed = model.model.embed_tokens.weight  # rmu's loss does not reach the head
    (got,) = torch.autograd.grad(out.loss, embed if name == "rmu" else head)
    (want,) = torch.autograd.grad(expected, embed if name == "rmu" else head)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_registry_defaults_and_plain_npo_unchanged():
    assert set(NEW_METHODS) <= set(METHODS)
    # without alpha / forget_weight, npo and simnpo are exactly sga.methods.base' classes
    assert type(build_objective(MethodConfig(name="npo"))) is NegativePreferenceOptimization
    assert type(build_objective(MethodConfig(name="simnpo"))) is SimpleNPO
    wrapped = build_objective(MethodConfig(name="npo", alpha=1.0))
    assert wrapped.beta == 0.1 and wrapped.uses_normal and wrapped.uses_reference_nll
    # open-unlearning's published defaults
    described = {name: build_objective(MethodConfig(name=name, retain_eps=0.1)).describe() for name in NEW_METHODS if name != "dpo"}
    assert described["wga"]["beta"] == 1.0 and described["wga"]["alpha"] == 1.0
    assert described["satimp"]["forget_weight"] == 0.1 and described["satimp"]["beta1"] == 5.0
    assert described["undial"]["beta"] == 10.0 and described["undial"]["alpha"] == 0.0
    assert described["idk_dpo"]["beta"] == 0.1 and described["rmu"]["steering_coeff"] == 2.0
    assert described["ce_u"]["alpha"] == 0.0 and described["ce_u"]["ignore_first_answer_tokens"] == 1


@pytest.mark.parametrize("config, error, match", [
    (MethodConfig(name="pdu"), ConfigError, "retain_eps"),
    (MethodConfig(name="dpo"), ConfigError, "preferred answers"),
    (MethodConfig(name="dpo", preferred_answers_file="/nonexistent.txt"), ConfigError, "no such file"),
    (MethodConfig(name="wga", beta=-1.0), ValueError, "beta"),
    (MethodConfig(name="satimp", beta2=float("nan")), ValueError, "beta2"),
    (MethodConfig(name="ce_u", ignore_first_answer_tokens=-1), ValueError, "ignore_first"),
    (MethodConfig(name="rmu", rmu_layer=-2), ValueError, "layer"),
    (MethodConfig(name="wga", alpha=float("inf")), ValueError, "alpha"),
])
def test_bad_method_parameters(config, error, match):
    with pytest.raises(error, match=match):
        build_objective(config)


def test_rmu_layer_beyond_the_model_is_named(setup):
    tok, model, data = setup
    objective = build_objective(MethodConfig(name="rmu", rmu_layer=5, alpha=0.0), backend="torch")
    with pytest.raises(ValueError, match="model has 2 decoder layers"):
        objective.compute(model, data.batch([0], tok.pad_token_id), torch.tensor(1.0))


def test_preferred_sequences_share_the_forget_prompt(setup):
    tok, _, data = setup
    objective = build_objective(MethodConfig(name="idk_dpo"))
    prepared = objective.prepare_data(data, tok, DataConfig(chat_template="auto"))
    assert isinstance(prepared, PreferenceData) and len(prepared) == len(data)
    for i, (forget, preferred) in enumerate(zip(prepared.forget, prepared.preferred)):
        assert preferred.input_ids[: forget.prompt_length] == forget.input_ids[: forget.prompt_length]
        answer = [t for t in preferred.labels if t != -100]
        assert tok.decode(answer).strip().startswith(IDK_ANSWERS[i % len(IDK_ANSWERS)].split()[0])
    assert len(prepared.reference_examples) == 2 * len(data)


def test_causal_lm_token_loss_is_usable_alone(setup):
    tok, model, data = setup
    batch = data.batch([1, 2], tok.pad_token_id)
    loss = causal_lm_token_loss(model, batch["forget_input_ids"], batch["forget_labels"], "ihl",
                                attention_mask=batch["forget_attention_mask"], backend="torch")
    logits, target = _logits(model, batch, "forget")
    assert loss.item() == pytest.approx(token_loss_reference(logits, target, "ihl").item(), rel=1e-5)


def _run(tmp_path, method, **settings):
    tok = tokenizer()
    model = memorized_model()
    config = make_config(tmp_path, method, **settings)
    uses_normal = build_objective(config.method).uses_normal
    data = unlearning_data(tok, config.method.num_classes, normal=uses_normal)
    result = UnlearningTrainer(model, tok, data, config).train()
    return model, data, result


UNLEARN_CASES = [  # the weighted token losses have small gradients on a barely memorized tiny model: lr 1e-2
    ("wga", {"learning_rate": 1e-2}),
    ("satimp", {"forget_weight": 1.0, "beta1": 1.0, "learning_rate": 1e-2}),
    ("ce_u", {"learning_rate": 1e-2}),
    ("ihl", {"learning_rate": 1e-2}),
    ("pdu", {"retain_eps": 0.5, "dual_warmup_epochs": 0.0, "learning_rate": 1e-2}),
    ("undial", {"learning_rate": 1e-2}),
    ("rmu", {"rmu_layer": 1, "steering_coeff": 20.0, "learning_rate": 3e-3}),
    ("idk_dpo", {"learning_rate": 3e-3}),
    ("npo", {"alpha": 1.0}),
]


@pytest.mark.parametrize("method, settings", UNLEARN_CASES, ids=[m for m, _ in UNLEARN_CASES])
def test_each_method_raises_the_forget_nll(tmp_path, method, settings):
    tok = tokenizer()
    data = unlearning_data(tok)
    before = mean_nll(memorized_model(), data.forget, tok)
    model, _, result = _run(tmp_path, method, max_steps=4, **settings)
    assert result.status == "completed" and result.step == 4
    after = mean_nll(model, data.forget, tok)
    assert after > before + 0.05, (method, before, after)


def test_pdu_dual_update_follows_the_retain_nll_and_resumes(tmp_path):
    eps, step_size = 0.5, 2.0
    _, _, full = _run(tmp_path / "full", "pdu", max_steps=4, retain_eps=eps, dual_step_size=step_size, dual_warmup_epochs=0.0)
    dual = 1.0
    for record in full.history:
        dual = max(0.0, dual + step_size * (record["normal_nll"] - eps))
        assert record["dual"] == pytest.approx(dual, rel=1e-9)
    # warmup: 4 steps of 4 samples over 10 forget samples is 1.6 epochs; lambda moves only after epoch 1
    _, _, warm = _run(tmp_path / "warm", "pdu", max_steps=4, retain_eps=eps, dual_warmup_epochs=1.0)
    assert [r["dual"] for r in warm.history[:2]] == [1.0, 1.0] and warm.history[2]["dual"] != 1.0
    # an interrupted-and-resumed run restores lambda from the checkpoint
    _, _, first = _run(tmp_path / "resumed", "pdu", max_steps=4, retain_eps=eps, dual_step_size=step_size,
                       dual_warmup_epochs=0.0, save_every=2)
    tok = tokenizer()
    config = make_config(tmp_path / "resumed", "pdu", max_steps=4, retain_eps=eps, dual_step_size=step_size,
                         dual_warmup_epochs=0.0, resume=str(checkpoint.list_checkpoints(tmp_path / "resumed")[0]))
    trainer = UnlearningTrainer(memorized_model(), tok, unlearning_data(tok), config)
    assert trainer.objective.dual == 1.0
    resumed = trainer.train()
    assert resumed.history[0]["step"] == 3
    assert resumed.history[-1]["dual"] == pytest.approx(first.history[-1]["dual"], rel=1e-6)


def test_every_method_is_in_the_help_and_trains_from_the_cli(tmp_path, capsys):
    from sga.benchmarks.synthetic import write_synthetic_tofu

    help_text = build_parser()._subparsers._group_actions[0].choices["unlearn"].format_help()
    for name in NEW_METHODS:
        assert name in help_text
    tok = tokenizer()
    model_dir = tmp_path / "model"
    tiny_random_model("llama", tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data_dir = write_synthetic_tofu(tmp_path / "tofu", 4, n_perturbed=2)
    answers = tmp_path / "answers.txt"
    answers.write_text("An answer I prefer.\n")
    extra = {"pdu": ["--retain-eps", "1.0"], "rmu": ["--rmu-layer", "1"], "dpo": ["--preferred-answers-file", str(answers)]}
    for name in NEW_METHODS:
        out = tmp_path / name
        code = main(["unlearn", "--model", str(model_dir), "--data-dir", str(data_dir), "--tofu-split", "forget10",
                     "--pairing", "tfidf", "--pairing-cache-dir", str(tmp_path / "cache"), "--output-dir", str(out),
                     "--method", name, "--max-steps", "1", "--batch-size", "2", "--backend", "torch", "--no-progress",
                     *extra.get(name, [])])
        assert code == 0, (name, capsys.readouterr().err[-2000:])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == 1 and (out / "final").is_dir()
    assert main(["unlearn", "--model", str(model_dir), "--method", "pdu"]) == 2
    assert "retain_eps" in capsys.readouterr().err
