"""LoRA at scale: adapters move under gradient checkpointing, and a frozen LM head costs no weight gradient."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine_helpers import make_config, memorized_model, tokenizer, unlearning_data
from sga.engine.trainer import UnlearningTrainer
from sga.hf import causal_lm_loss
from sga.models import tiny_random_model

peft = pytest.importorskip("peft")


def test_lora_adapters_move_under_gradient_checkpointing(tmp_path):
    """lora_B starts at zero; if the checkpointed layers left the adapters without gradients it would stay zero."""
    tok = tokenizer()
    config = make_config(tmp_path, "sga", lora=True, lora_r=4, gradient_checkpointing=True, max_steps=2, learning_rate=1e-2)
    base = memorized_model()
    trainer = UnlearningTrainer(base, tok, unlearning_data(tok), config)
    result = trainer.train()
    assert result.status == "completed"
    model = trainer.accelerator.unwrap_model(trainer._module).model  # the peft model the run trained
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    lora_b = {name: p for name, p in model.named_parameters() if "lora_B" in name}
    assert lora_b
    for name, p in lora_b.items():
        assert p.abs().max() > 0, f"{name} never moved"


def test_reentrant_checkpointing_needs_the_input_gradient_hook():
    """Why the hook matters: with reentrant checkpointing and frozen embeddings, nothing inside the checkpointed
    layers requires grad unless the embedding output does; the trainer's model has the hook."""
    tok = tokenizer()
    model = tiny_random_model("llama", tok)
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    lora.train()
    ids = torch.randint(4, 200, (2, 9))
    embeddings = model.get_input_embeddings()
    assert embeddings._forward_hooks  # installed for the adapters (peft and the trainer's _prepare_model)
    causal_lm_loss(lora, ids, ids, backend="torch").backward()
    assert all(p.grad is not None for name, p in lora.named_parameters() if "lora_B" in name)
    embeddings._forward_hooks.clear()
    lora.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        causal_lm_loss(lora, ids, ids, backend="torch").backward()


class _OutputShapes(TorchDispatchMode):
    """Records the shape of every new tensor (not a view such as W^T) that an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for item in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(item, torch.Tensor):
                    self.shapes.append(tuple(item.shape))
        return out


def _head_shaped_outputs(model, ids):
    vocab, hidden = model.get_output_embeddings().weight.shape
    with _OutputShapes() as record:
        causal_lm_loss(model, ids, ids, backend="torch").backward()
    return [shape for shape in record.shapes if shape in ((vocab, hidden), (hidden, vocab))]


def test_a_frozen_head_costs_no_weight_gradient():
    """Under LoRA (head and embeddings frozen) no [V, D] tensor is ever produced: the dW GEMM is not run and no
    head-gradient buffer is allocated. The control, a trainable head, produces one."""
    tok = tokenizer()
    ids = torch.randint(4, 200, (2, 9))
    lora = peft.get_peft_model(tiny_random_model("llama", tok), peft.LoraConfig(r=4, target_modules="all-linear"))
    assert not lora.get_output_embeddings().weight.requires_grad
    assert _head_shaped_outputs(lora, ids) == []
    assert all(p.grad is not None for name, p in lora.named_parameters() if "lora_B" in name)

    head_only = tiny_random_model("llama", tok).requires_grad_(False)
    head_only.get_output_embeddings().weight.requires_grad_(True)
    assert _head_shaped_outputs(head_only, ids) != []
