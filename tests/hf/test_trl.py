"""The fused loss inside TRL's SFTTrainer (sga.hf.trl.FusedSFTTrainer) against SFTTrainer's own loss, end to end with
gradient accumulation, on a tiny random Llama (CPU)."""
import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from sga.hf import fused_causal_lm_loss  # noqa: E402
from sga.hf.trl import FusedSFTTrainer  # noqa: E402
from sga.models import tiny_random_model  # noqa: E402
from torchrun_helpers import run_worker  # noqa: E402
from trl_helpers import DATASETS, sft_config, tokenizer_for, train  # noqa: E402


def assert_same_training(theirs, ours):
    _, their_weights, their_losses = theirs
    _, our_weights, our_losses = ours
    assert len(our_losses) == 3
    assert our_losses == pytest.approx(their_losses, rel=1e-5)
    assert set(our_weights) == set(their_weights)
    for name, value in their_weights.items():
        torch.testing.assert_close(our_weights[name], value, atol=1e-6, rtol=1e-5, msg=name)


def masked_labels(trainer):
    """The share of label positions of real (non-padding) tokens that the trainer's collator ignores."""
    batch = next(iter(trainer.get_train_dataloader()))
    real = batch.get("attention_mask", torch.ones_like(batch["labels"])).bool()  # padding-free batches have no padding
    return ((batch["labels"] == -100) & real).sum().item() / real.sum().item()


@pytest.mark.parametrize(
    "kind, packing", [("text", False), ("prompt_completion", False), ("assistant_only", False), ("prompt_completion", True)]
)
def test_fused_sft_trainer_gives_sft_trainers_own_training(tmp_path, kind, packing):
    """Same logged losses and same weights after three SGD steps as SFTTrainer with its own (TRL's fused-head) loss,
    for full-sequence, completion-only and assistant-only masks, and packed (padding-free) batches."""
    config = {"packing": True, "max_length": 64} if packing else {}
    theirs = train(trl.SFTTrainer, kind, tmp_path / "own", config=config)
    ours = train(FusedSFTTrainer, kind, tmp_path / "fused", config=config)
    their_trainer, our_trainer = theirs[0], ours[0]
    assert our_trainer.completion_only_loss == (kind == "prompt_completion")  # TRL's default for the data
    assert our_trainer.padding_free == packing  # packing's default strategy (bfd) is padding-free
    masked = masked_labels(our_trainer)
    assert masked > 0.2 if kind != "text" else masked == pytest.approx(0.0)  # the premise: prompts are masked
    initial = dict(tiny_random_model("llama", tokenizer_for(kind)).named_parameters())
    assert max((value - initial[name]).abs().max().item() for name, value in theirs[1].items()) > 1e-3  # trained
    assert_same_training(theirs, ours)
    assert our_trainer.model_accepts_loss_kwargs and their_trainer.args.gradient_accumulation_steps == 2


def test_fused_sft_trainer_with_lora(tmp_path):
    """PEFT through SFTTrainer's peft_config: the same adapter weights (lora_B starts at zero and must move)."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    theirs = train(trl.SFTTrainer, "prompt_completion", tmp_path / "own", peft_config=copy.deepcopy(lora))
    ours = train(FusedSFTTrainer, "prompt_completion", tmp_path / "fused", peft_config=copy.deepcopy(lora))
    lora_b = [value for name, value in ours[1].items() if "lora_B" in name]
    assert lora_b and all(value.abs().max() > 1e-6 for value in lora_b)
    assert all("lora_" in name for name in ours[1])  # only the adapters train
    assert_same_training(theirs, ours)


def test_fused_smoothing_is_sft_trainers_label_smoothing(tmp_path):
    """smoothing=eps trains as SFTTrainer with label_smoothing_factor=eps (its full-logits LabelSmoother with
    num_items_in_batch), and unlike its unsmoothed loss: the fused loss, not TRL's head, is what trains."""
    with pytest.warns(FutureWarning, match="label_smoothing_factor"):
        theirs = train(trl.SFTTrainer, "prompt_completion", tmp_path / "own", config={"label_smoothing_factor": 0.1})
    ours = train(FusedSFTTrainer, "prompt_completion", tmp_path / "fused", smoothing=0.1)
    assert_same_training(theirs, ours)
    _, unsmoothed, _ = train(trl.SFTTrainer, "prompt_completion", tmp_path / "plain")
    assert max((ours[1][name] - value).abs().max().item() for name, value in unsmoothed.items()) > 1e-5


def test_bf16_autocast_is_as_close_to_float32_as_sft_trainers_own(tmp_path):
    """Under SFTConfig's default bf16 (CPU autocast) the updates are not bitwise those of TRL's head: each rounds the
    GEMMs its own way. The fused loss's weights must be as close to the float32 weights as TRL's own (docs/design.md, section 4:
    no larger error than the alternative's on the same inputs)."""
    initial = dict(tiny_random_model("llama", tokenizer_for("prompt_completion")).named_parameters())
    _, truth, true_losses = train(trl.SFTTrainer, "prompt_completion", tmp_path / "fp32")

    def error(weights):  # the largest weight error, relative to the largest float32 update of each parameter
        return max(((weights[k] - truth[k]).abs().max() / (truth[k] - initial[k]).abs().max()).item() for k in truth)

    _, theirs, their_losses = train(trl.SFTTrainer, "prompt_completion", tmp_path / "own", config={"bf16": True})
    _, ours, our_losses = train(FusedSFTTrainer, "prompt_completion", tmp_path / "fused", config={"bf16": True})
    assert error(theirs) > 1e-4  # the premise: autocast changed TRL's own training
    assert error(ours) <= 1.5 * error(theirs)
    assert our_losses == pytest.approx(true_losses, rel=1e-3)


def test_fused_sft_trainer_evaluates_as_sft_trainer(tmp_path):
    """evaluate(): the eval loss (micro-batch means, no num_items_in_batch) is SFTTrainer's own, and it is the fused
    loss that is evaluated (with ascent=True it is the negated loss)."""
    tok = tokenizer_for("prompt_completion")
    dataset = datasets.Dataset.from_list([DATASETS["prompt_completion"](i) for i in range(6)])
    losses = []
    for name, trainer_class, kwargs in (
        ("own", trl.SFTTrainer, {}), ("fused", FusedSFTTrainer, {}), ("ascent", FusedSFTTrainer, {"ascent": True})
    ):
        trainer = trainer_class(
            model=tiny_random_model("llama", tok), args=sft_config(tmp_path / name, per_device_eval_batch_size=4),
            train_dataset=dataset, eval_dataset=dataset, processing_class=tok, **kwargs,
        )
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert losses[2] == pytest.approx(-losses[0], rel=1e-6)


def test_fused_sft_trainer_refusals(tmp_path):
    tok = tokenizer_for("text")
    dataset = datasets.Dataset.from_list([DATASETS["text"](i) for i in range(4)])

    def build(config=None, model=None, **kwargs):
        return FusedSFTTrainer(
            model=model or tiny_random_model("llama", tok), args=sft_config(tmp_path, **(config or {})),
            train_dataset=dataset, processing_class=tok, **kwargs,
        )

    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"label_smoothing_factor=0.2.*smoothing=0.2"):
        build({"label_smoothing_factor": 0.2})
    with pytest.raises(ValueError, match="loss_type='dft'.*set loss_type='nll'"):
        build({"loss_type": "dft"})
    with pytest.raises(ValueError, match="do not pass compute_loss_func"):
        build(compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss)
    patched = tiny_random_model("llama", tok)
    fused_causal_lm_loss(patched, ascent=False)
    with pytest.raises(ValueError, match="already carries a fused_causal_lm_loss patch: pass the bare model"):
        build(model=patched)
    with pytest.raises(ValueError, match="smoothing"):
        build(smoothing=float("nan"))


def test_plain_patch_applied_after_sft_trainer_is_refused_at_its_call(tmp_path):
    """A fused_causal_lm_loss patch put on a model that SFTTrainer already holds receives TRL's fused-head calls:
    it says so and names FusedSFTTrainer, rather than return an output without TRL's per-token fields."""
    tok = tokenizer_for("text")
    dataset = datasets.Dataset.from_list([DATASETS["text"](i) for i in range(4)])
    trainer = trl.SFTTrainer(model=tiny_random_model("llama", tok), args=sft_config(tmp_path), train_dataset=dataset, processing_class=tok)
    fused_causal_lm_loss(trainer.model, ascent=False)
    with pytest.raises(TypeError, match="fused_lm_head=True.*sga.hf.trl.FusedSFTTrainer"):
        trainer.train()


def test_fused_sft_trainer_patch_is_removable(tmp_path):
    """The patch sits on top of SFTTrainer's forward; removing it gives SFTTrainer's own loss back."""
    tok = tokenizer_for("text")
    dataset = datasets.Dataset.from_list([DATASETS["text"](i) for i in range(4)])
    trainer = FusedSFTTrainer(
        model=tiny_random_model("llama", tok), args=sft_config(tmp_path), train_dataset=dataset, processing_class=tok,
        smoothing=0.5,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    fused = trainer.model(**batch).loss
    trainer.fused_loss.remove()
    own = trainer.model(**batch, fused_lm_head=True).loss
    assert trainer.model(**batch).logits is not None
    assert abs(fused.item() - own.item()) > 1e-3  # smoothing 0.5 changes the loss
    with torch.no_grad():
        smoothed = fused_causal_lm_loss(trainer.model, smoothing=0.5, ascent=False)
        assert trainer.model(**batch).loss.item() == pytest.approx(fused.item(), rel=1e-6)
        smoothed.remove()


def test_fused_sft_trainer_two_processes(tmp_path):
    """Under DDP (two processes over gloo) the Trainer's num_items_in_batch counts both processes' tokens and the loss
    is scaled by 2: FusedSFTTrainer must train as SFTTrainer does there, and as one process does."""
    one = run_worker("trl_worker.py", 1, tmp_path / "one")
    two = run_worker("trl_worker.py", 2, tmp_path / "two")
    assert two["world"] == 2 and two["FusedSFTTrainer"]["world_size"] == 2 and one["FusedSFTTrainer"]["world_size"] == 1
    for reference in (two["SFTTrainer"], one["FusedSFTTrainer"]):
        ours = two["FusedSFTTrainer"]
        assert ours["losses"] == pytest.approx(reference["losses"], rel=1e-5)
        for name, values in reference["params"].items():
            torch.testing.assert_close(torch.tensor(ours["params"][name]), torch.tensor(values), atol=1e-6, rtol=1e-5, msg=name)
