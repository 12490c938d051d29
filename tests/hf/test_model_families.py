"""sga.hf's newer model families against the models' own loss and gradients (tiny random configs, no downloads).

Each family in sga.hf.MODEL_FAMILIES beyond tests/hf/test_causal_lm_loss.py's set is checked here: descent without smoothing
must equal ``model(..., labels=...).loss`` and give every parameter gradient autograd gives through the model's
own logits. A family that the installed transformers does not have is skipped (it cannot be loaded there).
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_causal_lm_loss import CONFIGS as BASE_CONFIGS  # noqa: E402
from test_causal_lm_loss import (  # noqa: E402
    VOCAB,
    assert_equals_the_model_loss_and_gradients,
    assert_same_grads,
    assert_smoothed_ascent_equals_label_smoothed_ce_of_own_logits,
    make_batch,
    own_smoothed_loss,
    parameter_grads,
)

from sga import hf  # noqa: E402
from sga.hf import (
    causal_lm_loss,  # noqa: E402
    families,  # noqa: E402
    fused_causal_lm_loss,
)
from sga.hf.families import resolve_head  # noqa: E402

DECODER = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
    bos_token_id=1, eos_token_id=2,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)

# model_type -> extra config arguments over DECODER
FAMILIES = {
    # Gemma 3: tied head; a softcap of 5 so the cap bites (Gemma 3's released configs have none)
    "gemma3_text": dict(tie_word_embeddings=True, final_logit_softcapping=5.0, query_pre_attn_scalar=8, sliding_window=8),
    "mixtral": dict(MOE, num_local_experts=4),
    "qwen2_moe": dict(MOE, num_experts=4, shared_expert_intermediate_size=16),
    "qwen3_moe": dict(MOE, num_experts=4),
    "olmoe": dict(MOE, num_experts=4),
    "phimoe": dict(MOE, num_local_experts=4),
    "gpt_oss": dict(MOE, num_local_experts=4),
    "olmo": {},
    "olmo2": {},
    "olmo3": {},
    "smollm3": {},
    "ministral": {},
    "starcoder2": {},
    "stablelm": {},
    "gpt_neox": {},
    "glm": {},
    "glm4": {},
    "helium": {},
    "exaone4": {},
    "seed_oss": {},
    "ernie4_5": {},
    "arcee": {},
    "apertus": {},
    "nemotron": {},
    # logits / logits_scaling (Granite) and logits * logit_scale (Cohere), with scales that change the loss
    "granite": dict(logits_scaling=4.0),
    "granitemoe": dict(MOE, num_local_experts=4, logits_scaling=4.0),
    "granitemoeshared": dict(MOE, num_local_experts=4, shared_intermediate_size=16, logits_scaling=4.0),
    "cohere": dict(logit_scale=0.25),
    "cohere2": dict(logit_scale=0.25, sliding_window=8),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "gpt_oss", "granitemoe", "granitemoeshared")


def family_config(model_type, **overrides):
    mapping = transformers.models.auto.configuration_auto.CONFIG_MAPPING
    if model_type not in mapping:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type} model")
    return mapping[model_type](**{**DECODER, **FAMILIES[model_type], **overrides})


def make_family_model(model_type, seed=0, **overrides):
    """A tiny model in eval mode whose head weight is scaled up so that the logits are far from uniform."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(family_config(model_type, **overrides)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model


def test_the_scales_are_read_from_the_configs():
    assert resolve_head(make_family_model("granite")).logit_scale == 0.25  # 1 / logits_scaling
    assert resolve_head(make_family_model("cohere")).logit_scale == 0.25
    assert resolve_head(make_family_model("gemma3_text")).softcap == 5.0
    assert resolve_head(make_family_model("olmo2")).logit_scale == 1.0


def test_every_verified_type_is_tested():
    assert set(BASE_CONFIGS) | set(FAMILIES) == set(hf.VERIFIED_MODEL_TYPES)
    assert not set(BASE_CONFIGS) & set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_equals_the_model_loss_and_gradients(model_type):
    model = make_family_model(model_type)
    assert model.config.model_type == model_type
    assert_equals_the_model_loss_and_gradients(model)


@pytest.mark.parametrize("model_type", ["gemma3_text", "granite", "cohere"])
def test_capped_or_scaled_logits_smoothed_ascent_equals_label_smoothed_ce_of_own_logits(model_type):
    """Smoothing weighs every logit, so a softcap or a logit scale left out would show here too."""
    assert_smoothed_ascent_equals_label_smoothed_ce_of_own_logits(make_family_model(model_type, seed=1))


# --------------------------------------------------------------------------------------------------------------
# mixture of experts: the router load-balancing loss


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_moe_router_aux_loss(model_type):
    """With output_router_logits the model adds router_aux_loss_coef * aux_loss to its loss when given labels.
    causal_lm_loss is the token loss alone (the unlearning objectives' likelihood); the fused_causal_lm_loss
    patch, a drop-in for the model's loss, adds the auxiliary term as the model does, with its gradient."""
    model = make_family_model(model_type, output_router_logits=True, router_aux_loss_coef=0.5)
    input_ids, attention_mask, labels = make_batch()
    theirs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert theirs.aux_loss is not None and theirs.aux_loss > 0
    theirs_grads = parameter_grads(model, theirs.loss)
    token_loss = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask, ascent=False)
    torch.testing.assert_close(token_loss, theirs.loss - 0.5 * theirs.aux_loss, atol=1e-5, rtol=1e-5)
    with fused_causal_lm_loss(model, ascent=False):
        ours = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        assert ours.logits is None
        torch.testing.assert_close(ours.aux_loss, theirs.aux_loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)
        assert_same_grads(parameter_grads(model, ours.loss), theirs_grads)
        # the call's own switch wins over the config, as in the model
        plain = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=False)
        torch.testing.assert_close(plain.loss, token_loss, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# refusals and the escape hatch


def _relabelled_gemma3(model_type):
    model = make_family_model("gemma3_text")  # a verified family, relabelled as an unknown one
    model.config.model_type = model_type
    return model


def test_unverified_type_names_the_escape_hatch_and_register_model_type_opens_it():
    model = _relabelled_gemma3("my_gemma_fork")
    input_ids, attention_mask, labels = make_batch()
    with pytest.raises(NotImplementedError, match="my_gemma_fork.*smoothed_ga_loss.*register_model_type"):
        causal_lm_loss(model, input_ids, labels)
    hf.register_model_type("my_gemma_fork", softcap_attribute="final_logit_softcapping")
    try:
        assert "my_gemma_fork" not in hf.VERIFIED_MODEL_TYPES
        ours = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask, smoothing=0.1)
        theirs = own_smoothed_loss(model, input_ids, attention_mask, labels, smoothing=0.1, ascent=True)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    finally:
        families._USER_FAMILIES.pop("my_gemma_fork")
    with pytest.raises(ValueError, match="non-empty"):
        hf.register_model_type("")


def test_a_remote_code_class_reusing_a_verified_type_name_is_refused():
    base = make_family_model("olmo2")
    remote = type("Olmo2ForCausalLM", (type(base),), {"__module__": "transformers_modules.someone.modeling_olmo2"})
    base.__class__ = remote
    input_ids, _, labels = make_batch()
    with pytest.raises(NotImplementedError, match="remote code"):
        causal_lm_loss(base, input_ids, labels)
