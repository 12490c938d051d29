"""sga's engine (sga.engine.trainer.UnlearningTrainer) under accelerate's FSDP2 plugin: two processes over gloo on CPU against
one process.

accelerate 1.15 does not run FSDP on CPU by itself: AcceleratorState selects DistributedType.FSDP only for GPU-like
multi-device types, so Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2)) silently
runs DDP (MULTI_CPU) and drops the plugin. tests/accelerate_fsdp_worker.py sets the state accelerate gives the same
Accelerator on GPUs; from there on it is accelerate's own FSDP2 code (fsdp2_prepare_model shards the decoder layers
and the root, clip_grad_norm_ of DTensor gradients, the full state dict of the final model) around sga's loop.
"""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torchrun_helpers import run_worker  # noqa: E402

CASES = {"llama_untied", "gpt2_tied", "llama_lora"}


def test_accelerate_fsdp2_two_processes_match_one(tmp_path):
    one = run_worker("accelerate_fsdp_worker.py", 1, tmp_path / "one", "plain")
    two = run_worker("accelerate_fsdp_worker.py", 2, tmp_path / "two", "fsdp2")
    bare = two.pop("bare")
    assert set(one) == set(two) == CASES
    # the fused loss on a bare model that accelerate sharded (norm + head in a group of their own, as under HF's Trainer)
    for tied, case in bare.items():
        assert case["head_in_own_group"], tied
        assert case["loss"] == pytest.approx(case["reference_loss"], rel=1e-5), tied
        assert case["worst_gradient"] <= 1e-5 and not case["missing_gradients"], (tied, case)
    # the premise: accelerate itself picks DDP on CPU, plugin or not (the first case sees accelerate's own choice)
    assert two["llama_untied"]["chosen_by_accelerate"] == "DistributedType.MULTI_CPU"
    for name in CASES:
        ours, reference = two[name], one[name]
        assert ours["distributed_type"] == "DistributedType.FSDP" and ours["sharded"], name
        assert not reference["sharded"] and ours["status"] == reference["status"] == "completed", name
        assert len(ours["history"]) == len(reference["history"]) == 3, name
        for a, b in zip(reference["history"], ours["history"]):
            for key in ("loss", "forget_nll", "normal_nll", "grad_norm", "lr"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (name, key, a, b)
        assert set(ours["params"]) == set(reference["params"]), name
        for param, values in reference["params"].items():
            expected = torch.tensor(values)
            torch.testing.assert_close(torch.tensor(ours["params"][param]), expected, atol=1e-5, rtol=1e-4, msg=f"{name} {param}")
    # the adapters really trained (LoRA's B starts at zero) and only they are trainable
    lora = one["llama_lora"]["params"]
    assert all("lora_" in param for param in lora)
    assert max(torch.tensor(v).abs().max().item() for p, v in lora.items() if "lora_B" in p) > 1e-3
    # clipping at 1.0 was active on some step, so the DTensor gradient norm really clipped
    assert max(h["grad_norm"] for case in one.values() for h in case["history"]) > 1.0


def test_fsdp_requested_on_cpu_is_refused(tmp_path, monkeypatch):
    """`accelerate launch --use_fsdp` on a machine without CUDA: accelerate would train unsharded (DDP) without a word;
    sga's make_accelerator says so before any work."""
    from engine_helpers import make_config
    from sga.config import ConfigError
    from sga.engine.trainer import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"FSDP \(accelerate launch --use_fsdp\) needs CUDA GPUs.*drop --use_fsdp"):
        make_accelerator(make_config(tmp_path, "ga"))
