"""The fused loss under sharded training: FSDP2 (fully_shard) and DeepSpeed ZeRO-3, two processes over gloo on
CPU (torchrun), against one process; and the refusals for heads the fused loss cannot gather.

Under both frameworks the LM head's weight is not the whole matrix outside its module's call (a DTensor shard, a
ZeRO-3 placeholder of shape [0]); sga.hf.loss computes the loss inside that call (sga.hf.distributed.call_inside), where
the framework has gathered it, and the framework reduces the gradients as for any module.
"""
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_causal_lm_loss import make_batch, make_model  # noqa: E402

from sga.hf import (
    causal_lm_loss,  # noqa: E402
    distributed,  # noqa: E402
)
from torchrun_helpers import run_worker  # noqa: E402


def _launch(framework: str, out_dir: Path) -> dict:
    return run_worker("sharded_worker.py", 2, out_dir, framework, env={"DS_ACCELERATOR": "cpu"})


def _assert_matches_one_process(result: dict) -> None:
    assert result["world_size"] == 2
    for name, case in result["cases"].items():
        assert case["loss"] == pytest.approx(case["reference_loss"], rel=1e-5, abs=1e-6), name
        assert case["grads"], name
        assert not case["extra_grads"], (name, case["extra_grads"])
        for param, compared in case["grads"].items():
            assert compared is not None, (name, param, "no gradient under sharding")
            difference, scale = compared
            assert difference <= 1e-5 * max(scale, 1e-3), (name, param, difference, scale)


def test_fsdp2_matches_one_process(tmp_path):
    result = _launch("fsdp2", tmp_path)
    assert set(result["cases"]) == {
        "untied_root_group", "untied_head_group", "tied_root_group", "objective_head_group", "patch_head_group",
        "objective_in_root_forward", "lora_head_group", "lora_tied_root_group",
    }
    for case in result["cases"].values():
        assert case["head_outside"] == "DTensor"  # the premise: a shard outside the call
    _assert_matches_one_process(result)
    assert "DTensor" in result["tensor_parallel_head_error"] and "fully_shard" in result["tensor_parallel_head_error"]


def test_deepspeed_zero3_matches_one_process(tmp_path):
    pytest.importorskip("deepspeed")
    result = _launch("zero3", tmp_path)
    assert set(result["cases"]) == {
        "untied_root_group", "tied_root_group", "objective_head_group", "patch_head_group", "lora_head_group",
    }
    for case in result["cases"].values():
        assert case["head_outside"] == [0]  # the premise: an empty placeholder outside the call
    _assert_matches_one_process(result)


# --------------------------------------------------------------------------------------------------------------
# one process: what the fused loss refuses, and the call mechanism


def test_a_placeholder_head_is_refused_by_name():
    """A head weight that is not the whole [V, D] matrix (the shard or placeholder of a wrapper the fused loss does
    not see through, e.g. FSDP1's flattened shards) is refused before any computation."""
    model = make_model("llama")
    model.get_output_embeddings().weight = torch.nn.Parameter(torch.empty(0))
    input_ids, _, labels = make_batch()
    with pytest.raises(NotImplementedError, match=r"shape \(0,\), not the whole \[vocab_size=211"):
        causal_lm_loss(model, input_ids, labels)


def test_hooks_of_other_frameworks_on_the_head_are_refused():
    """Only FSDP2's and ZeRO-3's hooks (which gather parameters and leave the output alone) are accepted on the head;
    e.g. tensor parallelism's hooks redistribute the output, and a user hook may change it."""
    model = make_model("llama")

    def redistribute(module, args, output):
        return output

    redistribute.__module__ = "torch.distributed.tensor.parallel.style"
    model.get_output_embeddings().register_forward_hook(redistribute)
    input_ids, _, labels = make_batch()
    with pytest.raises(NotImplementedError, match="plain torch.nn.Linear"):
        causal_lm_loss(model, input_ids, labels)
    assert distributed.sharding_framework(model.get_output_embeddings()) is None


def test_call_inside_runs_the_module_hooks_around_the_computation_and_restores_forward():
    module = torch.nn.Linear(3, 2)
    events = []
    module.register_forward_pre_hook(lambda m, args: events.append(("pre", len(args))))
    module.register_forward_hook(lambda m, args, out: events.append(("post", out.shape)))
    x = torch.randn(4, 3)
    out = distributed.call_inside(module, lambda h: events.append("compute") or h[:, :2], x)
    assert events == [("pre", 1), "compute", ("post", (4, 2))]
    assert not out._is_view() and torch.equal(out, x[:, :2])
    assert "forward" not in vars(module) and torch.equal(module(x), torch.nn.functional.linear(x, module.weight, module.bias))
