"""One SGA training step (K = 3) of a randomly initialized Llama through the engine, against the same step with the
model's own loss and with Liger-Kernel's Llama patch: time per step and peak memory, in one process, for full
fine-tuning and for LoRA (a frozen head: no dW GEMM).

    cd bench && python -m pytest test_bench_engine.py --benchmark-only -rsfE

Shapes: on a GPU a Llama-3.2-1B-shaped model (16 layers, D = 2048, MLP 8192, 32 heads / 8 KV heads, V = 128256,
tied embeddings; random weights, float32 master weights, bf16 autocast, gradient checkpointing off) and a batch
of 8 forget sequences with K - 1 = 2 normal ones each (24 sequences of up to 256 tokens); on the CPU a 2-layer
D = 256 model with the same vocabulary; the smoke shape (the dry run) is tiny. TOFU-like batches: the first half
of every sequence is an unscored prompt, lengths vary, so rows are padded.

Each step is forward, backward and an AdamW step on the same model and batch. The loss:
- ours: the engine's SGA objective (``sga.methods.build_objective``), L = -(1 - r + r/K) l(x_f) + (r/K)
  sum_k l(x_n^k): one forward over forget and normal rows and one fused linear call from the last hidden state
  (kept rows only, the gradient built in forward);
- model_loss: c_f * model(**forget).loss + c_n * model(**normal).loss (transformers' token-mean cross-entropy over
  materialized float32-upcast logits), what a user writes without the engine;
- liger: the same as model_loss after ``liger_kernel.transformers.apply_liger_kernel_to_llama(model=...)`` with only
  its fused linear cross-entropy switched on (rope, rms_norm, swiglu off: the model body stays the same for all
  three, so the ratio is the loss's), where Liger imports on this torch and transformers (CUDA only).
The means differ (per sequence vs over a batch's tokens), not the work. Under LoRA (peft, r = 16, all linear
layers) the head is frozen. Time: the median of the rounds, each step synchronized (on a shared CPU check the load
first). Peak memory (CUDA): ``torch.cuda.max_memory_allocated`` during one step beyond what was allocated before it
(parameters and optimizer state), i.e. activations, gradients and the loss's buffers.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

from conftest import DEVICE, SHAPE_SET
from harness import environment, synchronize, write_rows

RATE, NUM_CLASSES = 0.5, 3


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    vocab_size: int
    tied: bool
    num_forget: int  # forget sequences per batch, each with NUM_CLASSES - 1 normal ones
    length: int  # longest sequence


SHAPES = {
    "cpu": {"tiny_llama_V128256": Shape(2, 256, 512, 4, 2, 128256, False, 4, 128)},
    "smoke": {"smoke_tiny_llama": Shape(1, 16, 32, 4, 2, 500, True, 2, 12)},
    "cuda": {"llama3.2_1b_shape": Shape(16, 2048, 8192, 32, 8, 128256, True, 8, 256)},
}
VARIANTS = ("full", "lora")
IMPLEMENTATIONS = ("ours", "model_loss", "liger")  # ours first: the later rows get their ratios against it
ROUNDS = {"cpu": 3, "cuda": 5}
LORA_RANK = 16
_RESULTS: dict[tuple[str, str, str], dict] = {}
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def make_model(shape: Shape):
    """A randomly initialized Llama of the shape, built on the device (a 1B model's initialization on the CPU
    would take longer than its benchmark)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(1024, shape.length), rope_theta=500000.0, tie_word_embeddings=shape.tied,
        use_cache=False,
    )  # fmt: skip
    with torch.device(DEVICE):
        model = transformers.LlamaForCausalLM(config)
    return model.train()


def model_for(shape_name: str, variant: str):
    """The shape's model, shared by the cases of a variant; the LoRA variant wraps the full one's model (peft
    injects its adapters in place, so the full cases run first)."""
    key = (shape_name, variant)
    if key not in _MODELS:
        base = _MODELS.pop((shape_name, "full"), None) or make_model(SHAPES[SHAPE_SET][shape_name])
        if variant == "lora":
            import peft

            config = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear",
                                     task_type="CAUSAL_LM")  # fmt: skip
            base = peft.get_peft_model(base, config).train()
        _MODELS[key] = base
    return _MODELS[key]


def make_batch(vocab_size: int, num_forget: int, length: int) -> dict[str, torch.Tensor]:
    """The engine's batch (``UnlearningData.batch``) of num_forget forget samples with K - 1 normal samples each."""
    from sga.benchmarks.prompts import IGNORE_INDEX, EncodedExample
    from sga.data.unlearning import UnlearningData

    generator = torch.Generator().manual_seed(1)

    def example(seq: int) -> EncodedExample:
        n = length - seq % (length // 4 + 1)  # varied lengths: rows get padded
        ids = torch.randint(1, vocab_size, (n,), generator=generator).tolist()
        prompt = n // 2
        return EncodedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:], prompt)

    per = NUM_CLASSES - 1
    data = UnlearningData(
        [example(i) for i in range(num_forget)],
        [example(num_forget + j) for j in range(num_forget * per)],
        [[i * per + k for k in range(per)] for i in range(num_forget)],
    )
    return {key: value.to(DEVICE) for key, value in data.batch(list(range(num_forget)), 0).items()}


def unavailable(implementation: str, variant: str) -> str:
    """Why a case cannot run here ("" when it can)."""
    if variant == "lora":
        try:
            importlib.import_module("peft")
        except Exception as error:  # noqa: BLE001 - the reason is the skip message
            return f"LoRA needs peft: import failed: {type(error).__name__}: {error}"
    if implementation == "liger":
        if DEVICE != "cuda":
            return "Liger-Kernel runs on CUDA only"
        try:
            importlib.import_module("liger_kernel.transformers").apply_liger_kernel_to_llama  # noqa: B018
        except Exception as error:  # noqa: BLE001
            return f"import liger_kernel.transformers.apply_liger_kernel_to_llama failed: {type(error).__name__}: {error}"
    return ""


def llama_of(model):
    """The LlamaForCausalLM inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def make_step(implementation: str, model, batch: dict[str, torch.Tensor], shape: Shape):
    """A closure running one training step (its optimizer built here), and a function undoing the case's patch."""
    from sga.config import MethodConfig
    from sga.methods import build_objective

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    objective = build_objective(MethodConfig(name="sga", rate=RATE, num_classes=NUM_CLASSES))
    c_forget, c_normal = objective.coefficients()
    normalizer = torch.tensor(float(shape.num_forget), device=DEVICE)
    undo = lambda: None  # noqa: E731
    if implementation == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        llama = llama_of(model)
        apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=llama)  # fmt: skip

        def undo():  # the patch set an instance attribute over the class's forward
            llama.__dict__.pop("forward", None)

    def prefixed(prefix: str) -> dict[str, torch.Tensor]:
        return {name: batch[f"{prefix}_{name}"] for name in ("input_ids", "attention_mask", "labels")}

    def loss() -> torch.Tensor:
        if implementation == "ours":
            return objective.compute(model, batch, normalizer).loss
        return c_forget * model(**prefixed("forget")).loss + c_normal * model(**prefixed("normal")).loss

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(DEVICE)

    return step, undo, optimizer


def peak_step_bytes(step) -> tuple[int, int]:
    """(peak bytes beyond those allocated before one step, the peak itself) on CUDA."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    return torch.cuda.max_memory_allocated() - before, torch.cuda.max_memory_allocated()


CASES = [(name, variant, impl) for name in SHAPES[SHAPE_SET] for variant in VARIANTS for impl in IMPLEMENTATIONS]


@pytest.mark.parametrize("shape_name, variant, implementation", CASES)
def test_sga_training_step(benchmark, collect_row, shape_name, variant, implementation):
    reason = unavailable(implementation, variant)
    if reason:
        pytest.skip(reason)
    shape = SHAPES[SHAPE_SET][shape_name]
    benchmark.group = f"SGA training step {shape_name} {variant}"
    model = model_for(shape_name, variant)
    batch = make_batch(shape.vocab_size, shape.num_forget, shape.length)
    step, undo, optimizer = make_step(implementation, model, batch, shape)
    try:
        benchmark.pedantic(step, rounds=ROUNDS[DEVICE], iterations=1, warmup_rounds=1)
        memory = peak_step_bytes(step) if DEVICE == "cuda" else None
    except torch.OutOfMemoryError:
        pytest.skip(f"{implementation} ran out of memory at {shape_name} ({variant})")
    finally:
        undo()
        optimizer.state.clear()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    scored = sum(int((batch[f"{p}_labels"][:, 1:] != -100).sum()) for p in ("forget", "normal"))
    row = {
        "op": "engine",
        "implementation": implementation,
        "shape": shape_name,
        "variant": variant,
        "num_tokens": sum(batch[f"{p}_input_ids"].numel() for p in ("forget", "normal")),
        "scored_tokens": scored,
        "hidden_size": shape.hidden_size,
        "vocab_size": shape.vocab_size,
        "layers": shape.layers,
        "dtype": "bf16 autocast" if DEVICE == "cuda" else "float32",
        "phase": f"SGA step ({variant})",
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "median_ms": benchmark.stats.stats.median * 1e3,
        **environment(DEVICE),
    }
    if memory is not None:
        row["peak_extra_bytes"], row["peak_bytes"] = memory
    for (other_shape, other_variant, other), other_row in _RESULTS.items():
        if (other_shape, other_variant) == (shape_name, variant) and other != implementation:
            row[f"time_ratio_vs_{other}"] = row["median_ms"] / other_row["median_ms"]
            if memory is not None and "peak_extra_bytes" in other_row:
                row[f"memory_ratio_vs_{other}"] = row["peak_extra_bytes"] / max(other_row["peak_extra_bytes"], 1)
    _RESULTS[(shape_name, variant, implementation)] = row
    benchmark.extra_info.update(row)
    write_rows("engine", [row])
    collect_row(row)
