"""The fused loss under FSDP2 (fully_shard) or DeepSpeed ZeRO-3 against one process, for tests/hf/test_sharded_training.py.

    torchrun --nproc_per_node P tests/sharded_worker.py OUT_DIR fsdp2|zero3

Every rank builds the same tiny model and keeps an unsharded copy as the one-process reference (the reference loss
and gradients are those of the whole global batch on that copy). The model is then sharded over gloo (fully_shard,
or deepspeed.initialize with ZeRO stage 3 on DeepSpeed's CPU accelerator); each rank computes the loss of its share
of the batch, normalized by the global count and scaled by P (both frameworks average gradients over ranks), so
the summed losses and the averaged gradients are those of one process.
Rank 0 writes OUT_DIR/result.json: per case the two losses and, per parameter, the largest gradient difference
and the gradient's scale.
"""
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sga.hf import (
    causal_lm_loss,  # noqa: E402
    fused_causal_lm_loss,
)
from sga.methods.sequence_nll import sequence_nll  # noqa: E402

VOCAB, GLOBAL_BATCH, LENGTH = 97, 4, 9


def tiny_llama(tied: bool, seed: int = 0):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def global_batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[1, :6] = -100  # rows with different label counts
    return input_ids, labels


def add_lora(model):
    import peft

    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, lora)


def shard_fsdp2(model, mesh, head_group: bool):
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    if head_group:
        fully_shard(base.lm_head, mesh=mesh)
    fully_shard(base, mesh=mesh)
    return None


ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": GLOBAL_BATCH // 2,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition every parameter
    "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
    "zero_allow_untested_optimizer": True,
}


def shard_zero3(model, mesh, head_group: bool):
    import deepspeed

    parameters = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=parameters, config=ZERO3_CONFIG)
    return engine


def mean_loss(model, input_ids, labels, count, smoothing):
    return causal_lm_loss(model, input_ids, labels, smoothing=smoothing, ascent=True, normalizer=count, backend="torch")


def objective_loss(model, input_ids, labels, count, smoothing):
    """The unlearning objectives' path: per-sequence token-mean NLLs (reduction "none" with token weights)."""
    return sequence_nll(model, input_ids, labels, backend="torch").sum() / GLOBAL_BATCH


def objective_in_root_forward(model, input_ids, labels, count, smoothing):
    """The objectives' path run as the root model's forward, as HFUnlearningTrainer runs it: already inside the
    FSDP2 root's call, causal_lm_loss must not enter it again."""
    from sga.hf.distributed import call_inside

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return call_inside(base, lambda: objective_loss(model, input_ids, labels, count, smoothing))


def patched_loss(model, input_ids, labels, count, smoothing):
    return model(input_ids=input_ids, labels=labels, num_items_in_batch=count).loss


CASES = {
    # name: (tied, head in its own FSDP group (FSDP2 only), LoRA, patched before sharding, loss)
    "untied_root_group": (False, False, False, False, mean_loss),
    "untied_head_group": (False, True, False, False, mean_loss),
    "tied_root_group": (True, False, False, False, mean_loss),
    "objective_head_group": (False, True, False, False, objective_loss),
    "patch_head_group": (False, True, False, True, patched_loss),
    "objective_in_root_forward": (False, True, False, False, objective_in_root_forward),
    "lora_head_group": (False, True, True, False, objective_loss),
    "lora_tied_root_group": (True, False, True, False, mean_loss),
}
ZERO3_CASES = ("untied_root_group", "tied_root_group", "objective_head_group", "patch_head_group", "lora_head_group")


def gradients(model, engine=None):
    """Every parameter's whole gradient: FSDP2's DTensor gradients gathered, ZeRO-3's partitions fetched."""
    grads = {}
    for name, p in model.named_parameters():
        if engine is not None:
            from deepspeed.utils import safe_get_full_grad

            grad = safe_get_full_grad(p) if p.requires_grad else None
        else:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if grad is not None:
            grads[name] = grad.detach().clone()
    return grads


def run_case(name, framework, mesh, rank, world):
    tied, head_group, lora, patched, loss_fn = CASES[name]
    model = tiny_llama(tied)
    if lora:
        model = add_lora(model)
    input_ids, labels = global_batch()
    count = (labels[:, 1:] != -100).sum()
    reference = copy.deepcopy(model)
    patch = fused_causal_lm_loss(model, smoothing=0.1, ascent=True) if patched else None
    reference_patch = fused_causal_lm_loss(reference, smoothing=0.1, ascent=True) if patched else None
    reference_loss = loss_fn(reference, input_ids, labels, count, 0.1)
    reference_loss.backward()
    reference_grads = gradients(reference)

    engine = (shard_zero3 if framework == "zero3" else shard_fsdp2)(model, mesh, head_group)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    local = loss_fn(model, input_ids[rows], labels[rows], count, 0.1)
    if engine is not None:
        engine.backward(local * world)
    else:
        (local * world).backward()
    total = local.detach().clone()
    dist.all_reduce(total)
    grads = gradients(model, engine)
    del patch, reference_patch  # the patched models are dropped with the case
    head_weight = model.get_output_embeddings().weight
    compared = {}
    for key, expected in reference_grads.items():
        got = grads.get(key)
        compared[key] = None if got is None else [(got - expected).abs().max().item(), expected.abs().max().item()]
    return {
        "loss": total.item(),
        "reference_loss": reference_loss.item(),
        "grads": compared,
        "extra_grads": sorted(set(grads) - set(reference_grads)),
        # the premise: outside any call the head is not the whole matrix (a DTensor shard, a ZeRO-3 placeholder)
        "head_outside": list(head_weight.shape) if engine is not None else type(head_weight).__name__,
    }


def tensor_parallel_head_error(mesh) -> str:
    """A head weight that is a DTensor shard outside any FSDP2 module (as tensor parallelism leaves it): the
    fused loss must refuse it by name rather than compute with a shard."""
    from torch.distributed.tensor import Shard, distribute_tensor

    model = tiny_llama(tied=False)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]))
    input_ids, labels = global_batch()
    try:
        causal_lm_loss(model, input_ids, labels, backend="torch")
    except NotImplementedError as error:
        return str(error)
    return "no error"


def main(out_dir: str, framework: str) -> None:
    torch.set_num_threads(1)
    if framework == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        mesh, names = None, ZERO3_CASES
    else:
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        mesh, names = init_device_mesh("cpu", (dist.get_world_size(),)), tuple(CASES)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world_size": world, "cases": {name: run_case(name, framework, mesh, rank, world) for name in names}}
    if framework == "fsdp2":
        results["tensor_parallel_head_error"] = tensor_parallel_head_error(mesh)
    if rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "result.json").write_text(json.dumps(results), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
