"""The quantization attack: bitsandbytes' NF4 (blocksize 64) and int8 round trips on weights known by hand, and the
weights of a model reloaded through transformers' BitsAndBytesConfig equal to our round trip of the same weights."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes.functional")

from sga.attacks.quantize import (
    NF4_BLOCKSIZE,
    QUANTIZATIONS,
    fake_quantized,
    load_quantized,
    quantize_dequantize,
)
from sga.models import tiny_random_model, tiny_tokenizer

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023), as bitsandbytes stores them (float32).
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_nf4_levels_are_bitsandbytes_levels():
    assert bnb.get_4bit_type("nf4", device="cpu").tolist() == pytest.approx(NF4, abs=0.0)


def test_nf4_round_trip_of_a_known_weight():
    # two blocks of 64: block 0 has absmax 0.5, block 1 absmax 2.0; every value is absmax * an NF4 level
    levels = torch.tensor(NF4 * 4, dtype=torch.float32)
    weight = torch.stack([0.5 * levels, 2.0 * levels.flip(0)])
    assert NF4_BLOCKSIZE == 64 and weight.shape == (2, 64)
    assert torch.equal(quantize_dequantize(weight, "nf4"), weight)  # on the grid: unchanged, bit for bit


def test_nf4_rounds_to_the_nearest_level_of_its_block():
    weight = torch.zeros(1, 64)
    weight[0, 0] = 1.0        # absmax of the block
    weight[0, 1] = 0.03       # nearest level 0.0           (0.03 < 0.0796 / 2)
    weight[0, 2] = 0.05       # nearest level 0.07958...    (0.05 > 0.0796 / 2)
    weight[0, 3] = -0.9       # nearest level -1.0          (|-0.9 + 1| = 0.1 < |-0.9 + 0.696| = 0.204)
    weight[0, 4] = 0.64       # nearest level 0.5626...     (0.64 < (0.5626 + 0.7230) / 2 = 0.6428)
    out = quantize_dequantize(weight, "nf4")[0, :5].tolist()
    assert out == pytest.approx([1.0, 0.0, NF4[8], -1.0, NF4[13]], abs=1e-7)


def test_int8_round_trip_by_hand():
    # row-wise absmax: w' = round(127 w / absmax) * absmax / 127 (the weight in fp16, as LLM.int8 stores it)
    weight = torch.tensor([[1.0, -0.5, 0.1, 0.0], [4.0, 1.0, -3.0, 0.02]])
    expected = torch.tensor([[127, -64, 13, 0], [127, 32, -95, 1]], dtype=torch.float32)  # 63.5 -> 64, 12.7 -> 13, 31.75 -> 32, 95.25 -> 95, 0.635 -> 1
    expected *= torch.tensor([[1.0], [4.0]]) / 127
    assert quantize_dequantize(weight, "int8") == pytest.approx(expected, abs=1e-6)


def test_bad_quantization_input():
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize_dequantize(torch.zeros(2, 64), "int4")
    with pytest.raises(ValueError, match="2-D weight"):
        quantize_dequantize(torch.zeros(64), "nf4")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    model = tiny_random_model("llama", tokenizer, seed=3)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    return model, folder


def _linear_weights(model):
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_reloaded_weights_equal_our_round_trip(saved_model, quantization):
    model, folder = saved_model
    loaded = load_quantized(folder, quantization, device="cpu")
    ours = _linear_weights(fake_quantized(model, quantization))
    layers = {name: m for name, m in loaded.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
    assert set(layers) == set(ours)  # every linear layer but the LM head is quantized, as transformers does
    assert type(loaded.get_output_embeddings()) is torch.nn.Linear
    for name, layer in layers.items():
        weight = layer.weight
        if quantization == "nf4":
            assert weight.quant_state.blocksize == 64 and weight.quant_state.quant_type == "nf4"
            stored = bnb.dequantize_4bit(weight.data, weight.quant_state)
        else:
            stored = bnb.int8_vectorwise_dequant(weight.data, weight.SCB)
        assert torch.equal(stored, ours[name].weight.data), name
    # the input model is untouched
    assert not torch.equal(_linear_weights(model)["model.layers.0.mlp.up_proj"].weight, ours["model.layers.0.mlp.up_proj"].weight)


def test_nf4_reload_and_round_trip_give_the_same_logits(saved_model):
    model, folder = saved_model
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        loaded = load_quantized(folder, "nf4", device="cpu")(ids).logits
        rounded = fake_quantized(model, "nf4")(ids).logits
        full = model(ids).logits
    assert torch.equal(loaded, rounded) and not torch.equal(rounded, full)
