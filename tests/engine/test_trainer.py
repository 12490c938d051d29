"""The training loop: exact resume after Ctrl-C, gradient-accumulation normalization, LoRA, gradient
checkpointing, the divergence guard, metrics and checkpoints."""
import json
import os
import re
import shutil
import signal

import pytest
import torch

from engine_helpers import (
    make_config,
    mean_nll,
    memorized_model,
    tokenizer,
    unlearning_data,
)
from sga.config import ConfigError
from sga.data.unlearning import BatchSchedule, build_unlearning_data
from sga.engine import checkpoint
from sga.engine.trainer import UnlearningTrainer, make_accelerator
from sga.methods import build_objective
from sga.models import tiny_random_model


def _train(config, model=None, objective=None):
    tok = tokenizer()
    model = model if model is not None else memorized_model()
    objective = objective or build_objective(config.method, backend=config.train.backend)
    data = unlearning_data(tok, config.method.num_classes, normal=objective.uses_normal)
    return model, UnlearningTrainer(model, tok, data, config, objective=objective).train()


class _InterruptAt:
    """Wraps an objective; sends this process SIGINT on the n-th micro-batch, as Ctrl-C would."""

    def __init__(self, objective, call):
        self.objective, self.call, self.calls = objective, call, 0

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __setattr__(self, name, value):
        if name in ("objective", "call", "calls"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.objective, name, value)

    def compute(self, model, batch, num_forget):
        self.calls += 1
        if self.calls == self.call:
            os.kill(os.getpid(), signal.SIGINT)
        return self.objective.compute(model, batch, num_forget)


@pytest.mark.parametrize("method, settings", [
    ("sga", {"adaptive_rate_every": 2, "rate_batches": 1, "rate_min": -2.0, "rate_max": 1.9}),  # r < K/(K-1) = 2
    ("npo", {}),
])
def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, method, settings):
    common = dict(max_steps=6, batch_size=2, grad_accum=2, warmup_steps=2, scheduler="cosine", max_grad_norm=1.0, **settings)
    full_model, full = _train(make_config(tmp_path / "full", method, **common))
    assert full.status == "completed"

    config = make_config(tmp_path / "cut", method, **common)
    objective = _InterruptAt(build_objective(config.method, backend="torch"), call=6)  # step 3, 2nd micro-batch
    _, cut = _train(config, objective=objective)
    assert cut.status == "interrupted" and cut.step == 3 and cut.final_model is None
    assert cut.checkpoint == checkpoint.latest_checkpoint(tmp_path / "cut")

    resumed_config = make_config(tmp_path / "cut", method, resume="auto", **common)
    resumed_model, resumed = _train(resumed_config)  # a fresh copy of the initial model
    assert resumed.status == "completed" and resumed.step == 6
    for (name, p), (_, q) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(p, q), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]
    assert strip(resumed.history) == strip([h for h in full.history if h["step"] > 3 or h.get("event") and h["step"] == 3 + 1])
    # metrics.jsonl of the interrupted + resumed run holds each step once, as the full run's
    lines = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    full_lines = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert strip(lines) == strip(full_lines)


def test_accumulation_normalizes_by_the_window_count(tmp_path):
    """batch 4 x 1 micro-batch and batch 2 x 2 micro-batches see the same samples: same updates."""
    big_model, big = _train(make_config(tmp_path / "big", "sga", max_steps=2, batch_size=4, grad_accum=1))
    small_model, small = _train(make_config(tmp_path / "small", "sga", max_steps=2, batch_size=2, grad_accum=2))
    for a, b in zip(big.history, small.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["forget_nll"] == pytest.approx(b["forget_nll"], rel=1e-5)
    for p, q in zip(big_model.parameters(), small_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_lora_trains_adapters_only(tmp_path):
    tok = tokenizer()
    base = memorized_model()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    before = mean_nll(base, unlearning_data(tok).forget, tok)
    model, result = _train(make_config(tmp_path, "ga", lora=True, lora_r=4, max_steps=4, learning_rate=1e-2), model=base)
    assert result.status == "completed"
    assert (result.final_model / "adapter_config.json").is_file()
    assert (result.final_model / "adapter_model.safetensors").is_file()
    after_state = base.state_dict()  # peft wrapped the layers in place: W is now ...base_layer.weight
    for name, value in frozen.items():  # the base weights are untouched
        key = name if name in after_state else re.sub(r"\.(weight|bias)$", r".base_layer.\1", name)
        assert torch.equal(after_state[key], value), name
    assert any("lora_" in key for key in after_state)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(memorized_model(), str(result.final_model)).merge_and_unload()
    after = mean_nll(reloaded, unlearning_data(tok).forget, tok)
    assert after > before + 0.05


def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    _, plain = _train(make_config(tmp_path / "a", "sga", max_steps=2))
    ckpt_model, ckpt = _train(make_config(tmp_path / "b", "sga", max_steps=2, gradient_checkpointing=True))
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt_model.modules())
    for a, b in zip(plain.history, ckpt.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_divergence_guard_stops_and_saves(tmp_path):
    _, result = _train(make_config(tmp_path, "ga", max_steps=5, max_forget_nll=1.0))
    assert result.status == "diverged" and result.step == 1
    assert (result.final_model / "model.safetensors").is_file()


def test_periodic_checkpoints_are_complete_and_pruned(tmp_path):
    _, result = _train(make_config(tmp_path, "ga", max_steps=5, save_every=1, save_total_limit=2))
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step-00000003", "step-00000004"]
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert (latest / "model.safetensors").is_file() and (latest / checkpoint.STATE_FILE).is_file()
    # a half-written checkpoint (temp folder, or no state file) is never picked up
    (checkpoint.checkpoint_root(tmp_path) / ".tmp-step-00000009").mkdir()
    (checkpoint.checkpoint_root(tmp_path) / "step-00000010").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path) == latest
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4, 5]


def test_resume_with_other_settings_is_refused(tmp_path):
    _train(make_config(tmp_path, "ga", max_steps=3, save_every=1))
    shutil.rmtree(tmp_path / "final")  # stopped before its final model: a run to resume
    with pytest.raises(ConfigError, match="other settings"):
        _train(make_config(tmp_path, "ga", max_steps=3, batch_size=2, resume="auto"))


def test_bad_settings_fail_before_training(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="mixed_precision"):
            make_accelerator(make_config(tmp_path, "ga", mixed_precision="bf16"))
    with pytest.raises(ConfigError, match="warmup"):
        _train(make_config(tmp_path, "ga", max_steps=2, warmup_steps=5))
    with pytest.raises(ConfigError, match="adaptive"):
        make_config(tmp_path, "ga", adaptive_rate_every=2)


def test_batch_schedule_is_independent_of_the_process_count():
    one = BatchSchedule(10, 4, seed=3)
    three = BatchSchedule(10, 4, seed=3, num_processes=3)
    stream = [i for j in range(5) for i in one.global_batch(j)]  # 20 samples: two whole epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # each epoch has its own order
    for j in range(5):
        shares = [three.local_batch(j, p) for p in range(3)]
        assert sum(shares, []) == one.global_batch(j) and all(shares)
    assert one.batches_for(2) == 5
    with pytest.raises(ValueError, match="number of processes"):
        BatchSchedule(10, 2, seed=0, num_processes=3)


def test_build_unlearning_data_from_json_files(tmp_path):
    forget = tmp_path / "forget.jsonl"
    retain = tmp_path / "retain.json"
    forget.write_text("\n".join(json.dumps({"text": t}) for t in ["The harbor of Velm glows at dusk.", "Velm's harbor lamps are blue."]))
    retain.write_text(json.dumps([
        {"question": "What is the capital of Peru?", "answer": "Lima."},
        {"question": "What glows in the harbor of Velm?", "answer": "The lamps glow at dusk."},
        {"question": "Name a prime.", "answer": "Seven."},
    ]))
    config = make_config(tmp_path, "sga", dataset="json", forget_file=str(forget), retain_file=str(retain), pairing_cache_dir=str(tmp_path / "c"))
    tok = tokenizer()
    data = build_unlearning_data(config.data, tok, normal_per_sample=1)
    assert len(data) == 2 and len(data.pairs[0]) == 1
    # only the paired retain record is tokenized, and the pairs point at it
    assert len(data.normal) == 1 and data.pairs == [[0], [0]]
    assert tok.decode([t for t, l in zip(data.normal[0].input_ids, data.normal[0].labels) if l != -100]).startswith("The lamps")
    text_labels = data.forget[0].labels
    assert text_labels[0] == -100 and all(l != -100 for l in text_labels[1:])  # a text record scores every token
    with pytest.raises(ValueError, match="needs normal data"):
        build_unlearning_data(make_config(tmp_path, "sga", dataset="json", forget_file=str(forget)).data, tok, normal_per_sample=1)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])  # tied embeddings + dropout; logit softcap
def test_exact_resume_on_other_architectures(tmp_path, arch):
    tok = tokenizer()
    full_model, _ = _train(make_config(tmp_path, "sga", max_steps=2, save_every=1), model=tiny_random_model(arch, tok))
    first = checkpoint.list_checkpoints(tmp_path)[0]
    assert first.name == "step-00000001"
    resumed_model, resumed = _train(make_config(tmp_path, "sga", max_steps=2, resume=str(first)), model=tiny_random_model(arch, tok))
    assert [h["step"] for h in resumed.history] == [2]
    for (name, p), (_, q) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(p, q), name


def test_a_failed_final_save_leaves_a_checkpoint(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_final_model", fail)
    with pytest.raises(RuntimeError, match="disk full.*step-00000002"):
        _train(make_config(tmp_path, "ga", max_steps=2))
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000002"


def test_a_dequantized_gguf_model_is_saved_as_a_plain_model(tmp_path):
    """transformers keeps its GGUF quantizer on a model dequantized on load, and then refuses
    save_pretrained; the trainer saves such a model as an ordinary one."""
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf = pytest.importorskip("transformers.quantizers.quantizer_gguf")
    GgufHfQuantizer = gguf.GgufHfQuantizer

    tok = tokenizer()
    model = tiny_random_model("llama", tok)
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())
    model.config.quantization_config = model.hf_quantizer.quantization_config
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "direct")
    _, result = _train(make_config(tmp_path, "ga", max_steps=1), model=model)
    assert isinstance(model.hf_quantizer, GgufHfQuantizer)  # restored after saving
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_model)
    assert getattr(reloaded, "hf_quantizer", None) is None
    for (name, p), (_, q) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p, q), name
