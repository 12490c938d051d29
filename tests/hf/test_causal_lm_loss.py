"""sga.hf against the models' own logits: tiny randomly initialized transformers models, no downloads.

For each verified architecture the fused loss must equal the loss computed from the model's own logits
(model(..., labels=...).loss, or label-smoothed cross-entropy over model(...).logits) and give the same
parameter gradients as autograd through those logits.
"""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from sga.hf import (
    causal_lm_loss,  # noqa: E402
    fused_causal_lm_loss,
)

VOCAB = 211
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
LLAMA_LIKE = dict(COMMON, intermediate_size=48, num_key_value_heads=2, tie_word_embeddings=False)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA_LIKE),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_LIKE),
    "qwen3": lambda: transformers.Qwen3Config(**LLAMA_LIKE, head_dim=8),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_LIKE),
    "phi3": lambda: transformers.Phi3Config(**LLAMA_LIKE, pad_token_id=0),
    "gemma": lambda: transformers.GemmaConfig(**LLAMA_LIKE, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(
        **dict(LLAMA_LIKE, tie_word_embeddings=True), head_dim=8, final_logit_softcapping=5.0,
        query_pre_attn_scalar=8, sliding_window=8, attn_implementation="eager",
    ),
    "phi": lambda: transformers.PhiConfig(**COMMON, intermediate_size=48, partial_rotary_factor=0.5),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=16, max_position_embeddings=64, pad_token_id=1,
    ),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}


def make_model(model_type, seed=0):
    """A tiny model in eval mode (GPT-2 and OPT have dropout on after from_config) whose head weight is scaled
    up so that the logits are far from uniform (and Gemma 2's softcap of 5 bites)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[model_type]()).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model


def make_batch(seed=0):
    """Two sequences of 11 tokens: the second left-padded by 3, prompt positions and pads labelled -100."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (2, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100
    return input_ids, attention_mask, labels


def own_smoothed_loss(model, input_ids, attention_mask, labels, smoothing, ascent, reduction="mean"):
    """Label-smoothed cross-entropy over the model's own logits, shifted, with the sign applied."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        label_smoothing=smoothing,
        reduction=reduction,
    )
    if reduction == "none":
        loss = loss.reshape(labels.shape[0], -1)
    return -loss if ascent else loss


def parameter_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in theirs:
        scale = theirs[name].abs().max().item()
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-5 * max(scale, 1e-3), rtol=1e-4, msg=name)


def assert_equals_the_model_loss_and_gradients(model):
    """Descent, no smoothing: exactly HF's own loss (model(..., labels=...).loss) and its gradients."""
    input_ids, attention_mask, labels = make_batch()
    ours = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask, ascent=False)
    ours_grads = parameter_grads(model, ours)
    theirs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    theirs_grads = parameter_grads(model, theirs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert_same_grads(ours_grads, theirs_grads)


def assert_smoothed_ascent_equals_label_smoothed_ce_of_own_logits(model):
    input_ids, attention_mask, labels = make_batch(seed=1)
    ours = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask, smoothing=0.1, ascent=True)
    ours_grads = parameter_grads(model, ours)
    theirs = own_smoothed_loss(model, input_ids, attention_mask, labels, smoothing=0.1, ascent=True)
    theirs_grads = parameter_grads(model, theirs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert_same_grads(ours_grads, theirs_grads)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_equals_the_model_loss_and_gradients(model_type):
    assert_equals_the_model_loss_and_gradients(make_model(model_type))


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_smoothed_ascent_equals_label_smoothed_ce_of_own_logits(model_type):
    assert_smoothed_ascent_equals_label_smoothed_ce_of_own_logits(make_model(model_type, seed=1))


def test_per_token_losses_and_token_weights_are_shifted_like_the_labels():
    model = make_model("llama")
    input_ids, attention_mask, labels = make_batch()
    per_token = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask, reduction="none")
    assert per_token.shape == (2, 10)  # aligned with labels[:, 1:]
    expected = own_smoothed_loss(model, input_ids, attention_mask, labels, 0.0, True, reduction="none")
    torch.testing.assert_close(per_token, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(per_token[labels[:, 1:] == -100] == 0)

    weights = torch.rand(2, 11, generator=torch.Generator().manual_seed(3))
    weighted = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask, token_weights=weights)
    count = (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(weighted, (weights[:, 1:] * expected).sum() / count, atol=1e-5, rtol=1e-5)


def test_normalizer_is_num_items_in_batch():
    model = make_model("qwen2")
    input_ids, attention_mask, labels = make_batch()
    ours = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask, ascent=False, normalizer=23)
    theirs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=23).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_triton_row_kernel_through_the_model():
    model = make_model("gemma2")
    input_ids, attention_mask, labels = make_batch()
    ours = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask, smoothing=0.1, backend="triton")
    theirs = own_smoothed_loss(model, input_ids, attention_mask, labels, smoothing=0.1, ascent=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_the_model_head_is_never_run(monkeypatch):
    """The fused path never calls the LM head (so never holds [B, T, V] logits)."""
    model = make_model("gpt2")
    head = model.get_output_embeddings()
    head_calls = []
    linear_forward = torch.nn.Linear.forward

    def counting_forward(module, x):
        if module is head:
            head_calls.append(tuple(x.shape))
        return linear_forward(module, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting_forward)
    input_ids, attention_mask, labels = make_batch()
    causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask).backward()
    with fused_causal_lm_loss(model, ascent=False):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    assert head_calls == []
    model(input_ids=input_ids)  # the check can see a head call
    assert head_calls == [(2, 11, 32)]


def test_autocast_bf16_runs_in_the_autocast_dtype():
    model = make_model("llama")
    input_ids, attention_mask, labels = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask, ascent=False)
        theirs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    ours.backward()
    assert ours.dtype == torch.float32
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=2e-2)  # both from bf16 logits


# --------------------------------------------------------------------------------------------------------------
# the patch


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "opt", "gpt2"])
def test_patch_gives_the_model_loss_without_logits_and_is_undone(model_type):
    model = make_model(model_type)
    input_ids, attention_mask, labels = make_batch()
    theirs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    theirs_grads = parameter_grads(model, theirs)
    with fused_causal_lm_loss(model, ascent=False) as patched:
        assert patched is model
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        assert output.logits is None
        torch.testing.assert_close(output.loss, theirs, atol=1e-5, rtol=1e-5)
        assert_same_grads(parameter_grads(model, output.loss), theirs_grads)
        without_labels = model(input_ids, attention_mask=attention_mask)  # positional input_ids, no labels
        assert without_labels.logits.shape == (2, 11, VOCAB)
    assert "forward" not in vars(model)
    assert model(input_ids=input_ids, labels=labels).logits is not None


def test_patch_options_num_items_and_tuple_output():
    model = make_model("mistral")
    input_ids, attention_mask, labels = make_batch()
    expected = own_smoothed_loss(model, input_ids, attention_mask, labels, smoothing=0.2, ascent=True)
    patch = fused_causal_lm_loss(model, smoothing=0.2, ascent=True)
    try:
        loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
        count = (labels[:, 1:] != -100).sum()
        scaled = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=2 * count)
        torch.testing.assert_close(scaled.loss, expected / 2, atol=1e-5, rtol=1e-5)
        as_tuple = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], expected, atol=1e-5, rtol=1e-5)
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        pre_shifted = model(input_ids=input_ids, attention_mask=attention_mask, shift_labels=shifted)
        torch.testing.assert_close(pre_shifted.loss, expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="already carries"):
            fused_causal_lm_loss(model, ascent=False)
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(input_ids=input_ids, labels=labels, logits_to_keep=1)
    finally:
        patch.remove()
    patch.remove()  # idempotent
    assert "forward" not in vars(model)


def test_patch_keeps_an_existing_instance_forward_and_refuses_a_later_wrapper():
    model = make_model("llama")
    input_ids, _, labels = make_batch()
    calls = []
    class_forward = model.forward

    def wrapper(*args, **kwargs):
        calls.append(1)
        return class_forward(*args, **kwargs)

    model.forward = wrapper
    patch = fused_causal_lm_loss(model, ascent=False)
    model(input_ids=input_ids)  # no labels: through the previous (instance) forward
    assert calls == [1]
    fused = model(input_ids, None, labels=labels)  # positional arguments are named by the class's forward
    assert fused.logits is None and calls == [1]
    model.forward = lambda *a, **k: None  # e.g. a wrapper installed after the patch
    with pytest.raises(RuntimeError, match="replaced after"):
        patch.remove()
    model.forward = patch._patched
    patch.remove()
    assert vars(model)["forward"] is wrapper


# --------------------------------------------------------------------------------------------------------------
# refusals


def test_unverified_architecture_is_refused():
    """BLOOM is not among the verified families (tests/hf/test_model_families.py holds the newer ones)."""
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    model = transformers.AutoModelForCausalLM.from_config(config)
    input_ids, _, labels = make_batch()
    with pytest.raises(NotImplementedError, match="'bloom'.*register_model_type"):
        causal_lm_loss(model, input_ids, labels)
    with pytest.raises(NotImplementedError, match="bloom"):
        fused_causal_lm_loss(model, ascent=False)


def test_hooked_head_is_refused():
    model = make_model("llama")
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: out * 2)
    input_ids, _, labels = make_batch()
    with pytest.raises(NotImplementedError, match="plain torch.nn.Linear"):
        causal_lm_loss(model, input_ids, labels)


def test_peft_lora_model_works_and_a_lora_head_is_refused():
    peft = pytest.importorskip("peft")
    input_ids, attention_mask, labels = make_batch()
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(make_model("llama"), lora)
    ours = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask, ascent=False)
    ours_grads = parameter_grads(model, ours)
    theirs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert_same_grads(ours_grads, parameter_grads(model, theirs))  # the LoRA factors' gradients
    head_lora = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(NotImplementedError, match="plain torch.nn.Linear"):
        causal_lm_loss(head_lora, input_ids, labels)


def test_bad_labels_are_refused_before_the_model_runs():
    model = make_model("llama")
    input_ids, _, labels = make_batch()
    with pytest.raises(ValueError, match=r"labels must be a \[B, T\]"):
        causal_lm_loss(model, input_ids, labels[0])
    with pytest.raises(ValueError, match="token_weights"):
        causal_lm_loss(model, input_ids, labels, token_weights=torch.ones(2, 10))


def test_validate_false_skips_the_label_range_check(monkeypatch):
    """validate=False reaches the fused loss: no label scan (and no host sync on CUDA) per call."""
    import sga.kernels.linear as linear_module
    from sga.models import tiny_random_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_random_model("llama", tokenizer)
    input_ids = torch.randint(4, 100, (2, 9))
    def refuse(*args, **kwargs):
        raise AssertionError("checked")

    monkeypatch.setattr(linear_module, "check_labels_in_range", refuse)
    loss = causal_lm_loss(model, input_ids, input_ids, validate=False)
    assert torch.isfinite(loss)
    with pytest.raises(AssertionError, match="checked"):
        causal_lm_loss(model, input_ids, input_ids)
