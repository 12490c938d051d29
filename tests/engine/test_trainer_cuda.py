"""The unlearning engine itself on a GPU (skipped without CUDA; bench/gpu_check.sh runs it): an SGA run through the
Triton fused loss under bf16 autocast, full weights and LoRA, against the same run on the torch backend in float32
on the same device. The first step (the initial model: no update has compounded the rounding yet) must agree
within bf16 rounding, every step must be finite, and the forget NLL must rise (the run unlearns). Later steps are
not compared: AdamW's first updates are about lr * sign(g), so parameters whose gradient is near zero move by a
full step in either direction depending on the rounding."""
import math

import pytest

from engine_helpers import make_config, mean_nll, memorized_model, tokenizer, unlearning_data
from sga.engine.trainer import UnlearningTrainer

pytestmark = pytest.mark.cuda


def _run(output_dir, backend: str, mixed_precision: str, lora: bool):
    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    # mixed_precision (on CUDA "auto" is bf16, so an earlier test's run fixes it): a fresh state for each run
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    tok = tokenizer()
    config = make_config(output_dir, "sga", max_steps=3, batch_size=2, grad_accum=2, rate=0.5, num_classes=3,
                         learning_rate=5e-3, mixed_precision=mixed_precision, lora=lora, lora_r=4)  # fmt: skip
    config.train.backend = backend
    data = unlearning_data(tok, 3)
    trainer = UnlearningTrainer(memorized_model(), tok, data, config)
    result = trainer.train()
    model = trainer.accelerator.unwrap_model(trainer._module).model
    return result, model, data, tok


@pytest.mark.parametrize("lora", [False, True])
def test_sga_run_on_cuda_under_bf16_follows_the_float32_torch_run(tmp_path, lora):
    fused, fused_model, data, tok = _run(tmp_path / "fused", "auto", "bf16", lora)
    plain, _, _, _ = _run(tmp_path / "plain", "torch", "no", lora)
    assert fused.status == "completed" and plain.status == "completed"
    assert next(fused_model.parameters()).is_cuda
    fused_steps = [record for record in fused.history if "loss" in record]
    plain_steps = [record for record in plain.history if "loss" in record]
    assert len(fused_steps) == len(plain_steps) == 3
    assert all(math.isfinite(record[key]) for record in fused_steps for key in ("loss", "forget_nll"))
    for key in ("loss", "forget_nll"):
        # bf16 activations and logits (8 bits of mantissa) against float32: about 1e-2 relative at most
        assert fused_steps[0][key] == pytest.approx(plain_steps[0][key], rel=3e-2, abs=2e-2), key
    before = mean_nll(memorized_model().cuda(), data.forget, tok)
    after = mean_nll(fused_model, data.forget, tok)
    assert after > before  # gradient ascent on the forget set raised its NLL
