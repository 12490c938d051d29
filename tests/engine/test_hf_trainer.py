"""The fused loss and the unlearning objectives inside Hugging Face's transformers.Trainer (CPU, tiny models)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine_helpers import tokenizer, unlearning_data  # noqa: E402
from sga.config import MethodConfig  # noqa: E402
from sga.engine.hf_trainer import (  # noqa: E402
    HFUnlearningTrainer,
    UnlearningCollator,
    _needs_the_engine,
)
from sga.hf import fused_causal_lm_loss  # noqa: E402
from sga.methods import METHODS, build_objective  # noqa: E402
from sga.models import tiny_random_model  # noqa: E402
from torchrun_helpers import run_worker  # noqa: E402


def training_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, dataloader_drop_last=False,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


class LabelledSequences(torch.utils.data.Dataset):
    """Causal-LM samples of different lengths and prompt sizes, so micro-batches hold different token counts."""

    def __init__(self, vocab_size, count=12, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.samples = []
        for i in range(count):
            length = 6 + (i * 5) % 9
            ids = torch.randint(4, vocab_size, (length,), generator=generator)
            labels = ids.clone()
            labels[: 1 + i % 4] = -100
            self.samples.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def pad_collate(samples):
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), -100)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = s["input_ids"], s["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_weights(model, args, dataset):
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=pad_collate)
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, trainer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_patch_inside_trainer_gives_the_trainers_own_weights(tmp_path, arch):
    """Gradient accumulation 2 over micro-batches with different label counts: the Trainer passes
    num_items_in_batch (the window's label count) and the fused loss must normalize by it exactly as the model's
    own loss does, or the weights after three SGD steps differ."""
    tok = tokenizer()
    dataset = LabelledSequences(len(tok))
    theirs, their_trainer = train_weights(tiny_random_model(arch, tok), training_args(tmp_path / "own"), dataset)
    model = tiny_random_model(arch, tok)
    with fused_causal_lm_loss(model, ascent=False):
        ours, our_trainer = train_weights(model, training_args(tmp_path / "fused"), dataset)
    assert our_trainer.model_accepts_loss_kwargs
    initial = dict(tiny_random_model(arch, tok).named_parameters())
    assert max((value - initial[name]).abs().max().item() for name, value in theirs.items()) > 1e-3  # trained
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, atol=1e-6, rtol=1e-5, msg=name)
    their_losses = [h["loss"] for h in their_trainer.state.log_history if "loss" in h]
    our_losses = [h["loss"] for h in our_trainer.state.log_history if "loss" in h]
    assert len(our_losses) == 3
    assert our_losses == pytest.approx(their_losses, rel=1e-5)


def test_fused_patch_without_num_items_would_differ(tmp_path):
    """The check above can fail: dividing each micro-batch by its own count gives other weights."""
    tok = tokenizer()
    dataset = LabelledSequences(len(tok))
    theirs, _ = train_weights(tiny_random_model("llama", tok), training_args(tmp_path / "own"), dataset)
    model = tiny_random_model("llama", tok)
    model.accepts_loss_kwargs = False  # the Trainer then neither passes num_items_in_batch nor trusts the loss
    with fused_causal_lm_loss(model, ascent=False):
        ours, _ = train_weights(model, training_args(tmp_path / "fused"), dataset)
    worst = max((ours[name] - value).abs().max().item() for name, value in theirs.items())
    assert worst > 1e-5


# --------------------------------------------------------------------------------------------------------------
# HFUnlearningTrainer


@pytest.fixture(scope="module")
def paired_data():
    tok = tokenizer()
    return tok, unlearning_data(tok, num_classes=3)


def test_hf_unlearning_trainer_equals_one_batch_per_window(tmp_path, paired_data, monkeypatch):
    """sga with batch 2 x accumulation 2: each SGD step must be that of the objective on the window's samples as
    one batch (N = 4, and 2 for the epoch's short last window), in the order the Trainer drew them."""
    tok, data = paired_data
    seen = []
    collate = UnlearningCollator.__call__

    def recording(self, indices):
        seen.append(list(indices))
        return collate(self, indices)

    monkeypatch.setattr(UnlearningCollator, "__call__", recording)
    model = tiny_random_model("llama", tok)
    reference = copy.deepcopy(model)
    method = MethodConfig(name="sga", rate=0.4, num_classes=3)
    trainer = HFUnlearningTrainer(
        model, training_args(tmp_path), data=data, method=method, pad_token_id=tok.pad_token_id, backend="torch"
    )
    trainer.train()
    # 10 forget samples in micro-batches of 2: two windows of 2 micro-batches, then the epoch's short window of 1
    assert [len(indices) for indices in seen] == [2] * 5
    windows = [seen[0] + seen[1], seen[2] + seen[3], seen[4]]

    objective = build_objective(method, backend="torch")
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    reference.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for step, window in enumerate(windows):
        batch = data.batch(window, tok.pad_token_id)
        loss = objective.compute(reference, batch, torch.tensor(float(len(window)))).loss
        assert logged[step] == pytest.approx(loss.item(), rel=1e-5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_runs_by_name(tmp_path, paired_data, name, monkeypatch):
    """The first logged loss is the named objective's value on the first window at the initial weights."""
    tok, data = paired_data
    data = copy.copy(data)
    data.reference_nll = None
    seen = []
    collate = UnlearningCollator.__call__
    monkeypatch.setattr(UnlearningCollator, "__call__", lambda self, idx: seen.append(list(idx)) or collate(self, idx))
    model = tiny_random_model("llama", tok)
    initial = copy.deepcopy(model)
    args = training_args(tmp_path, max_steps=1, gradient_accumulation_steps=1, per_device_train_batch_size=3)
    answers = tmp_path / "answers.txt"
    answers.write_text("I cannot say.\n", encoding="utf-8")
    method = MethodConfig(name=name, retain_eps=1.0, rmu_layer=1, preferred_answers_file=str(answers))
    if _needs_the_engine(build_objective(method, backend="torch")):
        # methods with hooks only sga's own trainer has (prepare_data, after_step, reference forwards): refused
        with pytest.raises(NotImplementedError, match=f"cannot run method '{name}' yet.*sga unlearn"):
            HFUnlearningTrainer(model, args, data=data, method=method, pad_token_id=tok.pad_token_id, backend="torch")
        return
    trainer = HFUnlearningTrainer(model, args, data=data, method=method, pad_token_id=tok.pad_token_id, backend="torch")
    assert trainer.objective.name == name
    trainer.train()
    objective = trainer.objective
    batch = data.batch(seen[0], tok.pad_token_id)
    with torch.no_grad():
        expected = objective.compute(initial.train(), batch, torch.tensor(3.0)).loss.item()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged[0] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_hf_unlearning_trainer_refusals(tmp_path, paired_data):
    tok, data = paired_data
    args = training_args(tmp_path)
    model = tiny_random_model("llama", tok)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        HFUnlearningTrainer(model, args, data=data, method="nope", pad_token_id=0)
    with pytest.raises(TypeError, match="train_dataset"):
        HFUnlearningTrainer(model, args, data=data, method="ga", pad_token_id=0, train_dataset=[1])
    unpaired = unlearning_data(tok, normal=False)
    with pytest.raises(ValueError, match="needs normal data"):
        HFUnlearningTrainer(model, args, data=unpaired, method="sga", pad_token_id=0)


def test_hf_unlearning_trainer_two_processes_match_one(tmp_path):
    """Under torchrun the Trainer wraps the model in DDP: the objective must run through that wrapper (so DDP
    reduces the gradients) and be normalized by N / P, or the weights after two steps differ from one process's."""
    one = run_worker("hf_trainer_worker.py", 1, tmp_path / "one")
    two = run_worker("hf_trainer_worker.py", 2, tmp_path / "two")
    assert one["world"] == 1 and two["world"] == 2
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for name, values in one["params"].items():
        torch.testing.assert_close(torch.tensor(two["params"][name]), torch.tensor(values), atol=1e-6, rtol=1e-5, msg=name)
