"""One SGA training step (K = 3) of a tiny Llama with a Llama-3-sized vocabulary: through the engine (the
objective's one fused call from the last hidden state, kept rows from the batch, the gradient built in
forward) against the same step with the model's own loss (``model(**batch).loss`` on materialized logits).

    cd bench && python -m pytest test_bench_engine.py --benchmark-only

Both steps: forward, backward and an AdamW step on the same model and batch (B forget sequences, each with
K - 1 = 2 normal ones; TOFU-like, the first half of every sequence is an unscored prompt, lengths vary, so
rows are padded). The loss:
- ours: ``sga.methods.base`` SGA, L = -(1 - r + r/K) l(x_f) + (r/K) sum_k l(x_n^k), one forward over forget and
  normal rows and one fused linear call;
- model_loss: c_f * model(**forget).loss + c_n * model(**normal).loss (HF's token-mean cross-entropy over
  materialized float32-upcast logits), what a user writes without the engine.
The two differ in the mean (per sequence vs over a batch's tokens), not in the work. Time is wall clock: on a
shared machine, check the load first.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, SHAPE_SET
from harness import environment, synchronize, write_rows

RATE, NUM_CLASSES = 0.5, 3
# (layers, hidden size, vocabulary, forget sequences per batch, sequence length)
SHAPES = {
    "cpu": {"tiny_llama_V128256": (2, 256, 128256, 4, 128)},
    "smoke": {"smoke_tiny_llama": (1, 16, 500, 2, 12)},
    "cuda": {"tiny_llama_V128256": (2, 1024, 128256, 8, 512)},
}
ROUNDS = {"cpu": 3, "cuda": 5}
IMPLEMENTATIONS = ("model_loss", "ours")  # ours last: its row gets the ratio
_RESULTS: dict[tuple[str, str], dict] = {}


def make_model(layers: int, hidden_size: int, vocab_size: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(DEVICE).train()


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


def make_step(implementation: str, shape: tuple):
    """A closure running one training step; the model, batch and optimizer are built once."""
    from sga.config import MethodConfig
    from sga.methods import build_objective

    layers, hidden_size, vocab_size, num_forget, length = shape
    model = make_model(layers, hidden_size, vocab_size)
    batch = make_batch(vocab_size, num_forget, length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    objective = build_objective(MethodConfig(name="sga", rate=RATE, num_classes=NUM_CLASSES))
    c_forget, c_normal = objective.coefficients()
    normalizer = torch.tensor(float(num_forget), device=DEVICE)

    def prefixed(prefix: str) -> dict[str, torch.Tensor]:
        return {
            "input_ids": batch[f"{prefix}_input_ids"],
            "attention_mask": batch[f"{prefix}_attention_mask"],
            "labels": batch[f"{prefix}_labels"],
        }

    def loss() -> torch.Tensor:
        if implementation == "ours":
            return objective.compute(model, batch, normalizer).loss
        return c_forget * model(**prefixed("forget")).loss + c_normal * model(**prefixed("normal")).loss

    def step() -> None:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(DEVICE)

    tokens = sum(batch[f"{p}_input_ids"].numel() for p in ("forget", "normal"))
    return step, tokens


CASES = [(impl, name) for name in SHAPES[SHAPE_SET] for impl in IMPLEMENTATIONS]


@pytest.mark.parametrize("implementation, shape_name", CASES)
def test_sga_training_step(benchmark, collect_row, implementation, shape_name):
    shape = SHAPES[SHAPE_SET][shape_name]
    layers, hidden_size, vocab_size, num_forget, length = shape
    benchmark.group = f"SGA training step {shape_name}"
    step, tokens = make_step(implementation, shape)
    benchmark.pedantic(step, rounds=ROUNDS[DEVICE], iterations=1, warmup_rounds=1)
    row = {
        "op": "engine",
        "implementation": implementation,
        "shape": shape_name,
        "num_tokens": tokens,
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
        "dtype": "float32",
        "phase": "training step",
        "median_ms": benchmark.stats.stats.median * 1e3,
        **environment(DEVICE),
    }
    for (other_shape, other), other_row in _RESULTS.items():
        if other_shape == shape_name and other != implementation:
            row[f"time_ratio_vs_{other}"] = row["median_ms"] / other_row["median_ms"]
    _RESULTS[(shape_name, implementation)] = row
    benchmark.extra_info.update(row)
    write_rows("engine", [row])
    collect_row(row)
