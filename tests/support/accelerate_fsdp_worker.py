"""sga's engine under accelerate's FSDP2 preparation, for tests/engine/test_fsdp2_plugin.py.

    torchrun --nproc_per_node P tests/accelerate_fsdp_worker.py OUT_DIR fsdp2|plain

accelerate (1.15) never selects FSDP on CPU: its AcceleratorState sets DistributedType.FSDP only for GPU-like
multi-device types, so ``Accelerator(cpu=True, fsdp_plugin=...)`` runs DDP (MULTI_CPU) and drops the plugin. "fsdp2"
therefore builds that Accelerator and then sets the state to what accelerate sets on GPUs (distributed_type FSDP and
the plugin): from there on everything is accelerate's own FSDP2 code (``fsdp2_prepare_model``: fully_shard of the
decoder layers and the root, gradient clipping of DTensor gradients, the full state dict), over gloo. "plain" is
the reference: sga's own ``make_accelerator``. "fsdp2" also checks the fused loss on a bare HF model sharded by
accelerate (the layout HF's Trainer gets: final norm and LM head in a group of their own).

Each case trains a tiny model with sga (K = 3) for three steps of a global batch of 4 forget samples x accumulation
2, gradient clipping at 1.0; process 0 writes OUT_DIR/result.json with per case the distributed type, the step
records and every parameter's whole values after training.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from engine_helpers import make_config, tokenizer, unlearning_data  # noqa: E402
from sga.engine.trainer import UnlearningTrainer, make_accelerator  # noqa: E402
from sga.models import tiny_random_model  # noqa: E402

CASES = {  # name: (tiny architecture, LoRA)
    "llama_untied": ("llama", False),
    "gpt2_tied": ("gpt2", False),
    "llama_lora": ("llama", True),
}


def fsdp2_accelerator(config):
    """accelerate's FSDP2 on CPU: the Accelerator with the plugin, then the state accelerate gives it on GPUs. Returns
    it and the type accelerate chose itself (the state is a process-wide singleton: forced from the first case on)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    accelerator = Accelerator(
        cpu=True, fsdp_plugin=plugin, gradient_accumulation_steps=config.train.grad_accum, step_scheduler_with_optimizer=False,
    )
    chosen = str(accelerator.distributed_type)
    # AcceleratorState mirrors its type into PartialState's shared state (as accelerate does when it selects FSDP)
    accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator, chosen


def whole(parameter: torch.Tensor) -> list:
    """The parameter's whole values (FSDP2 holds DTensor shards outside the forward; gathering is collective)."""
    tensor = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
    return tensor.detach().flatten().tolist()


def run_case(name: str, mode: str, out_dir: Path, tok, data) -> dict:
    arch, lora = CASES[name]
    config = make_config(
        out_dir / name, "sga", rate=0.3, num_classes=3, batch_size=4, grad_accum=2, max_steps=3, max_grad_norm=1.0,
        learning_rate=1e-2, lora=lora, lora_target_modules="q_proj,v_proj" if arch == "llama" else "c_attn",
    )
    if mode == "fsdp2":
        accelerator, chosen = fsdp2_accelerator(config)
    else:
        accelerator = make_accelerator(config)
        chosen = str(accelerator.distributed_type)
    model = tiny_random_model(arch, tok, seed=0)
    for module in model.modules():  # GPT-2's dropout would draw other masks on each process
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainer = UnlearningTrainer(model, tok, data, config, accelerator=accelerator)
    result = trainer.train()
    from torch.distributed.fsdp import FSDPModule

    return {
        "chosen_by_accelerate": chosen,
        "distributed_type": str(accelerator.distributed_type),
        "sharded": isinstance(accelerator.unwrap_model(trainer._module), FSDPModule),
        "status": result.status,
        "history": [{k: v for k, v in h.items() if k != "time_s"} for h in result.history if "loss" in h],
        "params": {name: whole(p) for name, p in model.named_parameters() if p.requires_grad},
    }


def bare_model_case(tied: bool) -> dict:
    """The fused loss on a bare HF model that accelerate's fsdp2_prepare_model sharded (as HF's Trainer prepares it):
    it puts the final norm and the LM head (and a tied embedding) in one FSDP group of their own. Loss and every
    gradient against the unsharded copy, as in tests/sharded_worker.py."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from sga.hf import causal_lm_loss
    from sharded_worker import GLOBAL_BATCH, global_batch, gradients, tiny_llama

    accelerator, _ = fsdp2_accelerator(make_config(Path("unused"), "ga"))
    model = tiny_llama(tied)
    reference = copy.deepcopy(model)
    input_ids, labels = global_batch()
    count = (labels[:, 1:] != -100).sum()
    reference_loss = causal_lm_loss(reference, input_ids, labels, smoothing=0.1, normalizer=count, backend="torch")
    reference_loss.backward()
    expected = gradients(reference)
    model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    rank, world = accelerator.process_index, accelerator.num_processes
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    local = causal_lm_loss(model, input_ids[rows], labels[rows], smoothing=0.1, normalizer=count, backend="torch")
    (local * world).backward()  # FSDP2 averages the gradients over the processes
    total = local.detach().clone()
    dist.all_reduce(total)
    got = gradients(model)
    return {
        "head_in_own_group": isinstance(model.lm_head, FSDPModule) and isinstance(model.model.norm, FSDPModule),
        "loss": total.item(),
        "reference_loss": reference_loss.item(),
        "worst_gradient": max(((got[k] - v).abs().max() / v.abs().max()).item() for k, v in expected.items()),
        "missing_gradients": sorted(set(expected) - set(got)),
    }


def main(out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    tok = tokenizer()
    data = unlearning_data(tok, num_classes=3)
    results = {name: run_case(name, mode, Path(out_dir), tok, data) for name in CASES}
    if mode == "fsdp2":
        results["bare"] = {"tied" if tied else "untied": bare_model_case(tied) for tied in (False, True)}
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        (Path(out_dir) / "result.json").write_text(json.dumps(results), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
