"""The fused smoothed-GA loss for Hugging Face causal LMs, computed from the last hidden state and the LM head.

The model's logits [B, T, V] are never computed: the decoder runs to its last hidden state h (the tensor the
model's own ``lm_head`` receives) and :func:`sga.kernels.linear_smoothed_ga_loss` takes h, the head's weight
and bias, and ``config.final_logit_softcapping``:

    logits = softcap(h @ W^T + b) ;  L = s * w * (lse - (1 - eps) z_y - (eps / V) sum_v z_v)   (DESIGN.md 2.1)

HF conventions: labels [B, T] are aligned with input_ids and shifted inside (position t predicts
labels[:, t + 1]), -100 is ignored, and reduction "mean" divides by the number of non-ignored shifted labels
(or by ``normalizer``, HF's ``num_items_in_batch``).

Only architectures whose logits are exactly ``softcap(a * lm_head(last_hidden_state))`` are accepted, each checked
by the tests against the model's own loss and gradients (``VERIFIED_MODEL_TYPES``); the head must be a plain
``nn.Linear`` (no quantized, LoRA-wrapped or hooked head). Anything else raises NotImplementedError rather than
return a silently different loss; the message names the escape hatch (:func:`register_model_type`, or logits and
:func:`sga.kernels.smoothed_ga_loss`).

Mixture-of-experts models: :func:`causal_lm_loss` is the token loss only (the likelihood the unlearning objectives
are built on); the router load-balancing loss that such a model adds to its own loss when it returns router
logits (``output_router_logits``) is added by the :func:`fused_causal_lm_loss` patch, as the model does.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from sga import distributed
from sga.kernels import linear_smoothed_ga_loss
from sga.kernels.checks import BACKENDS, check_choice, check_smoothing

IGNORE_INDEX = -100

@dataclasses.dataclass(frozen=True)
class LogitRule:
    """How a family's logits come from its head: z = softcap(a * (h @ W^T + b)), h = ``model.get_decoder()(...)``'s
    ``last_hidden_state``, with the cap c * tanh(x / c) read from the config attribute ``softcap_attribute``
    (None: no cap, or the attribute is None) and the scale a = ``logit_scale(config)`` (None: a = 1)."""

    softcap_attribute: Optional[str] = None
    scale: Optional[Callable[[Any], float]] = None

    def softcap(self, config: Any) -> Optional[float]:
        return None if self.softcap_attribute is None else getattr(config, self.softcap_attribute, None)

    def logit_scale(self, config: Any) -> float:
        return 1.0 if self.scale is None else float(self.scale(config))


_PLAIN = LogitRule()
_FINAL_SOFTCAP = LogitRule(softcap_attribute="final_logit_softcapping")
# Granite: logits = lm_head(h) / config.logits_scaling; Cohere: logits = lm_head(h) * config.logit_scale
_DIVIDED_BY_LOGITS_SCALING = LogitRule(scale=lambda config: 1.0 / config.logits_scaling)
_TIMES_LOGIT_SCALE = LogitRule(scale=lambda config: config.logit_scale)

# model_type -> how its logits are made; every entry is checked against the model's own loss and gradients in
# tests/test_hf.py (the first block) or tests/test_hf_families.py (the rest), each read from transformers'
# modeling code (the *ForCausalLM forward: logits = lm_head(last_hidden_state), then the rule's cap if any).
# llama, qwen2, qwen3, mistral, phi3: model.get_decoder() is the base model, which ends with its final norm.
# gemma, gemma2: the same; gemma2 adds config.final_logit_softcapping (tanh cap) on the logits.
# phi: the base model ends with final_layernorm; the head has a bias.
# opt: get_decoder() is model.decoder, which applies final_layer_norm and project_out itself.
# gpt2: get_decoder() is the transformer, which applies ln_f; the head is tied to the token embedding.
# gemma3_text (Gemma3ForCausalLM): final_logit_softcapping when set (None in Gemma 3's released configs); the
#   embedding scale sqrt(D) and query_pre_attn_scalar act inside the decoder, not on the logits.
# granite, granitemoe, granitemoeshared (the last two mixtures of experts): logits divided by
#   config.logits_scaling (a = 1 / logits_scaling).
# cohere, cohere2: logits multiplied by config.logit_scale (a = logit_scale).
# Mixture-of-experts families (mixtral, qwen2_moe, qwen3_moe, olmoe, phimoe, gpt_oss): a plain head; the router
#   load-balancing loss is not part of causal_lm_loss (see its docstring); fused_causal_lm_loss adds it as the
#   model does.
MODEL_FAMILIES: dict[str, LogitRule] = {
    **dict.fromkeys(("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "phi", "opt", "gpt2"), _PLAIN),
    "gemma2": _FINAL_SOFTCAP,
    "gemma3_text": _FINAL_SOFTCAP,
    **dict.fromkeys(
        (
            "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "gpt_oss",
            "olmo", "olmo2", "olmo3", "smollm3", "ministral", "starcoder2", "stablelm", "gpt_neox", "glm", "glm4",
            "helium", "exaone4", "seed_oss", "ernie4_5", "arcee", "apertus", "nemotron",
        ),
        _PLAIN,
    ),
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared"), _DIVIDED_BY_LOGITS_SCALING),
    **dict.fromkeys(("cohere", "cohere2"), _TIMES_LOGIT_SCALE),
}
VERIFIED_MODEL_TYPES = frozenset(MODEL_FAMILIES)

# model types a user declared with register_model_type (not verified by us)
_USER_FAMILIES: dict[str, LogitRule] = {}


def register_model_type(
    model_type: str, *, softcap_attribute: Optional[str] = None, logit_scale: Optional[Callable[[Any], float]] = None
) -> None:
    """Declare, on your own responsibility, that ``model_type``'s logits are ``softcap(a * lm_head(h))`` with h the
    ``last_hidden_state`` of ``model.get_decoder()``, the cap read from ``config.<softcap_attribute>`` (None: no
    cap) and a = ``logit_scale(config)`` (None: a = 1).

    This is the escape hatch for a family that is not in :data:`VERIFIED_MODEL_TYPES` (including remote-code
    models): check it first, e.g. ``causal_lm_loss(model, ids, labels, ascent=False)`` against
    ``model(ids, labels=labels).loss`` on a few batches. A family whose logits are anything else (an extra
    projection, a per-token transform) must not be registered: compute its logits and use
    :func:`sga.kernels.smoothed_ga_loss`.
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be a non-empty string, got {model_type!r}")
    if softcap_attribute is not None and not isinstance(softcap_attribute, str):
        raise TypeError(f"softcap_attribute must be a config attribute name or None, got {softcap_attribute!r}")
    if logit_scale is not None and not callable(logit_scale):
        raise TypeError(f"logit_scale must be a function of the config or None, got {logit_scale!r}")
    _USER_FAMILIES[model_type] = LogitRule(softcap_attribute=softcap_attribute, scale=logit_scale)


@dataclasses.dataclass(frozen=True)
class _Head:
    """What the fused loss needs from a model: the module producing the head's input, and the head itself.

    The logits are softcap(logit_scale * (h @ weight^T + bias)). ``sharded`` is the head module when a framework
    (FSDP2 with the head in a group of its own, ZeRO-3) holds its parameters: they are whole only inside its call,
    so the loss is computed there (:func:`_gathers_a_sharded_head`)."""

    decoder: torch.nn.Module
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]
    logit_scale: float = 1.0
    sharded: Optional[torch.nn.Module] = None


def _is_plain_linear(module: Any, framework: Optional[str] = None) -> bool:
    """An nn.Linear whose forward is nn.Linear's own, with no hooks but those of the sharding ``framework`` that
    holds its parameters (they gather and release them, and leave the output alone): its output is h @ W^T + b."""
    return (
        isinstance(module, torch.nn.Linear)
        and type(module).forward is torch.nn.Linear.forward
        and "forward" not in vars(module)
        and distributed.only_framework_hooks(module, framework)
    )


def _check_whole(weight: torch.Tensor, vocab_size: Optional[int]) -> None:
    """Refuse a head weight that is not the whole [V, D] matrix (a shard, a placeholder) with a clear error."""
    if distributed.is_dtensor(weight):
        raise NotImplementedError(
            f"the LM head weight is a DTensor ({weight.placements}) outside any FSDP2 module's call (tensor "
            "parallelism?): the fused loss needs the whole [V, D] head; shard the model with fully_shard (FSDP2) "
            "or DeepSpeed ZeRO-3, or compute the logits and use sga.kernels.smoothed_ga_loss"
        )
    if weight.dim() != 2 or weight.numel() == 0 or (vocab_size is not None and weight.shape[0] < vocab_size):
        raise NotImplementedError(
            f"the LM head weight has shape {tuple(weight.shape)}, not the whole [vocab_size={vocab_size}, D] matrix: "
            "a shard or placeholder of a sharded model (FSDP1 / a wrapper the fused loss cannot see through). "
            "Use FSDP2 (fully_shard) or DeepSpeed ZeRO-3, whose heads are gathered, or compute the logits and use "
            "sga.kernels.smoothed_ga_loss"
        )


def _gathers_a_sharded_head(loss_from_hidden):
    """Run the loss inside the head module's call when a framework holds the head's parameters, reading them there
    (FSDP2's unsharded parameters, ZeRO-3's gathered data); the framework then reduces and shards their gradients."""

    @functools.wraps(loss_from_hidden)
    def wrapper(head: _Head, hidden: torch.Tensor, *args, **kwargs):
        if head.sharded is None:
            return loss_from_hidden(head, hidden, *args, **kwargs)
        module = head.sharded

        def compute(hidden: torch.Tensor) -> torch.Tensor:
            whole = dataclasses.replace(head, weight=module.weight, bias=module.bias, sharded=None)
            _check_whole(whole.weight, None)
            return loss_from_hidden(whole, hidden, *args, **kwargs)

        return distributed.call_inside(module, compute, hidden)  # hidden: the input the frameworks' hooks see

    return wrapper


def _runs_inside_a_sharded_model(loss_fn):
    """Run ``loss_fn(model, ...)`` inside the model's call when the model is an FSDP2 module: its own parameters
    (embeddings, final norm, a head in its group) are whole only there, and FSDP2 reduces their gradients."""

    @functools.wraps(loss_fn)
    def wrapper(model: torch.nn.Module, *args, **kwargs):
        candidates = (model, _base_model(model))
        sharded = next((m for m in candidates if distributed.sharding_framework(m) == distributed.FSDP2), None)
        if sharded is None or distributed.in_fsdp_forward(sharded):  # not sharded, or already inside its forward
            return loss_fn(model, *args, **kwargs)
        return distributed.call_inside(sharded, lambda: loss_fn(model, *args, **kwargs))

    return wrapper


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _own_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2 and DeepSpeed put classes of their own in front of it."""
    return next(c for c in type(model).__mro__ if not c.__module__.startswith(("torch.distributed.", "deepspeed.")))


_ESCAPE_HATCH = (
    "compute the logits and use sga.kernels.smoothed_ga_loss, or, once you have checked that its logits are "
    "softcap(lm_head(last_hidden_state)), declare it with sga.hf.register_model_type"
)


def _logit_rule(model: torch.nn.Module) -> LogitRule:
    """The family's rule; refuses unverified types and remote-code classes that reuse a verified type's name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _USER_FAMILIES:
        return _USER_FAMILIES[model_type]
    if model_type not in MODEL_FAMILIES:
        raise NotImplementedError(
            f"the fused causal-LM loss is verified only for model types {sorted(VERIFIED_MODEL_TYPES)}, "
            f"got {model_type!r}: {_ESCAPE_HATCH}"
        )
    own = _own_class(_base_model(model))
    if not own.__module__.startswith("transformers."):
        raise NotImplementedError(
            f"{own.__module__}.{own.__qualname__} is not transformers' own {model_type!r} class "
            f"(remote code?), so its verification does not apply: {_ESCAPE_HATCH}"
        )
    return MODEL_FAMILIES[model_type]


def _resolve_head(model: torch.nn.Module) -> _Head:
    rule = _logit_rule(model)
    head = model.get_output_embeddings()
    framework = distributed.sharding_framework(head) if isinstance(head, torch.nn.Module) else None
    if not _is_plain_linear(head, framework):
        raise NotImplementedError(
            f"the LM head must be a plain torch.nn.Linear without hooks (got {type(head).__module__}."
            f"{type(head).__qualname__}); a wrapped, quantized or hooked head does not compute h @ W^T + b"
        )
    if framework is None:
        _check_whole(head.weight, getattr(model.config, "vocab_size", None))
    return _Head(
        decoder=model.get_decoder(), weight=head.weight, bias=head.bias, softcap=rule.softcap(model.config),
        logit_scale=rule.logit_scale(model.config), sharded=head if framework is not None else None,
    )


def router_aux_loss(
    model: torch.nn.Module, router_logits: tuple[torch.Tensor, ...], attention_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """The router load-balancing loss of a mixture-of-experts model, exactly as its *ForCausalLM computes it:
    its modeling module's ``load_balancing_loss_func(router_logits, num_experts, num_experts_per_tok, mask)``
    (the loss the model adds, times ``router_aux_loss_coef``, when it returns router logits and gets labels)."""
    import sys

    base = _base_model(model)
    function = getattr(sys.modules[_own_class(base).__module__], "load_balancing_loss_func", None)
    if function is None or not hasattr(base, "router_aux_loss_coef"):
        raise NotImplementedError(
            f"{type(base).__qualname__} returned router logits but has no load_balancing_loss_func / "
            "router_aux_loss_coef to turn them into its auxiliary loss; set output_router_logits=False"
        )
    return function(router_logits, base.num_experts, base.num_experts_per_tok, attention_mask)


def _check_labels(labels: torch.Tensor, token_weights: Optional[torch.Tensor]) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a [B, T] tensor aligned with input_ids, got {shape}")
    if token_weights is not None and (
        not isinstance(token_weights, torch.Tensor) or tuple(token_weights.shape) != tuple(labels.shape)
    ):
        shape = tuple(token_weights.shape) if isinstance(token_weights, torch.Tensor) else type(token_weights).__name__
        raise ValueError(f"token_weights must have the labels' shape {tuple(labels.shape)}, got {shape}")


@_gathers_a_sharded_head
def _loss_from_hidden(
    head: _Head,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool,
    token_weights: Optional[torch.Tensor],
    smoothing: float,
    ascent: bool,
    reduction: str,
    normalizer: Union[None, float, torch.Tensor],
    backend: str,
    validate: bool = True,
    accumulate_in_float32: bool = True,
    kept_rows: Optional[torch.Tensor] = None,
    skip_ignored: bool = True,
    return_token_losses: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The fused loss of hidden [B, T, D] against labels [B, T].

    shift=True: position t is scored against labels[:, t + 1] (the labels and weights move left by one, the last
    position gets ignore_index), so no slice of hidden is copied; reduction "none" (and the token losses of
    return_token_losses) come back as [B, T - 1]. shift=False: labels are already aligned with the positions
    (HF's ``shift_labels``). kept_rows index the flattened [B * T] positions (after the shift).
    """
    labels = labels.to(hidden.device)
    if token_weights is not None:
        token_weights = token_weights.to(hidden.device)
    if shift:
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        if token_weights is not None:
            token_weights = F.pad(token_weights[:, 1:], (0, 1), value=0.0)
    loss = linear_smoothed_ga_loss(
        hidden,
        head.weight,
        labels,
        bias=head.bias,
        softcap=head.softcap,
        smoothing=smoothing,
        ascent=ascent,
        token_weights=token_weights,
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
        normalizer=normalizer,
        backend=backend,
        validate=validate,
        accumulate_in_float32=accumulate_in_float32,
        logit_scale=head.logit_scale,
        kept_rows=None if kept_rows is None else kept_rows.to(hidden.device),
        skip_ignored=skip_ignored,
        return_token_losses=return_token_losses,
    )
    token_losses = None
    if return_token_losses:
        loss, token_losses = loss
    if shift:
        if reduction == "none":
            loss = loss[:, :-1]
        if token_losses is not None:
            token_losses = token_losses[:, :-1]
    return loss if token_losses is None else (loss, token_losses)


@_runs_inside_a_sharded_model
def causal_lm_loss(
    model: torch.nn.Module,
    input_ids: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    smoothing: float = 0.0,
    ascent: bool = True,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    backend: str = "auto",
    validate: bool = True,
    accumulate_in_float32: bool = True,
    kept_rows: Optional[torch.Tensor] = None,
    skip_ignored: bool = True,
    return_token_losses: bool = False,
    **model_kwargs: Any,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Smoothed-GA loss of a Hugging Face causal LM on (input_ids, labels), without computing its logits.

    Args:
        model: a ``*ForCausalLM`` of a type in ``VERIFIED_MODEL_TYPES`` (tied head weights work as is).
        input_ids: [B, T] token ids (None when ``inputs_embeds`` is passed in model_kwargs).
        labels: [B, T] aligned with input_ids, -100 for ignored positions; shifted inside.
        attention_mask: passed to the model.
        token_weights: optional [B, T] per-token weights aligned with labels (shifted the same way).
        smoothing, ascent, reduction, normalizer, backend: as in :func:`sga.kernels.linear_smoothed_ga_loss`.
            With ascent=False, smoothing=0 and reduction "mean" this is ``model(..., labels=labels).loss``;
            ``normalizer`` plays the role of HF's ``num_items_in_batch``.
        validate: check every label is -100 or in [0, V) (one host sync on CUDA per call); set False in a
            training loop whose labels come from the tokenizer.
        accumulate_in_float32: as in :func:`sga.kernels.linear_smoothed_ga_loss` (matters for a bf16 / fp16
            head only; a float32 head under autocast always accumulates in its float32 gradient).
        kept_rows: int64 indices into the flattened [B * T] positions that include every position whose shifted
            label (labels[:, t + 1]) is not -100, each once (row * T + t of ``sga.data.answer_positions``, built on
            the host with the batch): only those positions go through the head's GEMMs. None: computed with one ``nonzero`` (a host
            sync on CUDA), or not at all with ``skip_ignored=False``.
        return_token_losses: also return the detached per-token losses of the same pass, [B, T - 1] aligned with
            labels[:, 1:] (0 on ignored positions): ``(loss, token_losses)``.
        **model_kwargs: passed to the decoder (position_ids, inputs_embeds, token_type_ids, ...); use_cache
            defaults to False.

    Returns:
        The loss: a float32 scalar, or [B, T - 1] per-token losses aligned with labels[:, 1:] for "none"; with
        return_token_losses, ``(loss, token_losses)``.
    """
    head = _resolve_head(model)
    _check_labels(labels, token_weights)
    model_kwargs.setdefault("use_cache", False)
    model_kwargs.pop("return_dict", None)
    outputs = head.decoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **model_kwargs)
    return _loss_from_hidden(
        head,
        outputs.last_hidden_state,
        labels,
        shift=True,
        token_weights=token_weights,
        smoothing=smoothing,
        ascent=ascent,
        reduction=reduction,
        normalizer=normalizer,
        backend=backend,
        validate=validate,
        accumulate_in_float32=accumulate_in_float32,
        kept_rows=kept_rows,
        skip_ignored=skip_ignored,
        return_token_losses=return_token_losses,
    )


class FusedLossPatch:
    """The undoable patch installed by :func:`fused_causal_lm_loss`.

    Use it as a context manager (``with fused_causal_lm_loss(model): ...``, which yields the model) or call
    :meth:`remove` to restore the model's previous ``forward``.
    """

    def __init__(self, model: torch.nn.Module, smoothing: float, ascent: bool, backend: str) -> None:
        _resolve_head(model)  # refuse unverified models now, not at the first training step
        if _installed_patch(model) is not None:
            raise ValueError("the model already carries a fused_causal_lm_loss patch; remove it first")
        self.model = model
        self.smoothing = check_smoothing(smoothing)
        if not isinstance(ascent, bool):
            raise TypeError(f"ascent must be a bool, got {type(ascent).__name__}")
        self.ascent = ascent
        self.backend = check_choice("backend", backend, BACKENDS)
        self._previous = vars(model).get("forward")  # an instance-level forward (another wrapper), or None
        self._original = model.forward
        # the class's forward signature names the arguments, whatever wrapper an instance forward may be
        self._signature = inspect.signature(types.MethodType(type(model).forward, model))

        def forward(module, *args, **kwargs):
            return self._forward(*args, **kwargs)

        forward.sga_fused_loss_patch = self
        # the class forward's signature: HF's Trainer reads the argument names from it (remove_unused_columns keeps
        # only the columns it names; **kwargs in it means the model accepts num_items_in_batch)
        forward.__signature__ = inspect.signature(type(model).forward)
        # a bound method, so that wrappers that re-bind forward.__func__ (accelerate's autocast) keep working
        self._patched = types.MethodType(forward, model)
        model.forward = self._patched
        self.active = True

    def _forward(self, *args, **kwargs):
        arguments = dict(self._signature.bind(*args, **kwargs).arguments)
        for name, parameter in self._signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        if arguments.pop("fused_lm_head", False):
            raise TypeError(
                "fused_lm_head=True is TRL SFTTrainer's call of its own fused head, which bypasses this patch's loss: "
                "train with sga.sft.FusedSFTTrainer, the SFTTrainer that uses the fused smoothed loss"
            )
        labels = arguments.pop("labels", None)
        shift_labels = arguments.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return self._original(*args, **kwargs)
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("logits_to_keep is not supported together with labels under fused_causal_lm_loss")
        normalizer = arguments.pop("num_items_in_batch", None)
        return_dict = arguments.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.model.config, "return_dict", True)
        head = _resolve_head(self.model)  # looked up per call: resize_token_embeddings may replace the head
        outputs = head.decoder(return_dict=True, **arguments)
        loss = _loss_from_hidden(
            head,
            outputs.last_hidden_state,
            shift_labels if shift_labels is not None else labels,
            shift=shift_labels is None,
            token_weights=None,
            smoothing=self.smoothing,
            ascent=self.ascent,
            reduction="mean",
            normalizer=normalizer,
            backend=self.backend,
        )
        from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

        output_class, extra = CausalLMOutputWithPast, {}
        if outputs.get("router_logits") is not None:
            # what a mixture-of-experts *ForCausalLM adds when it returns router logits and gets labels
            aux_loss = router_aux_loss(self.model, outputs.router_logits, arguments.get("attention_mask"))
            loss = loss + _base_model(self.model).router_aux_loss_coef * aux_loss.to(loss.device)
            output_class, extra = MoeCausalLMOutputWithPast, {"aux_loss": aux_loss}
        fields = {field.name for field in dataclasses.fields(output_class)} - {"loss", "logits", "aux_loss"}
        result = output_class(loss=loss, logits=None, **extra, **{k: v for k, v in outputs.items() if k in fields})
        return result if return_dict else result.to_tuple()

    def remove(self) -> None:
        """Restore the forward the model had before the patch (a no-op when already removed)."""
        if not self.active:
            return
        if vars(self.model).get("forward") is not self._patched:
            raise RuntimeError(
                "model.forward was replaced after fused_causal_lm_loss was applied (e.g. by accelerate.prepare); "
                "undo that wrapper first"
            )
        if self._previous is None:
            del self.model.forward
        else:
            self.model.forward = self._previous
        self.active = False

    def __enter__(self) -> torch.nn.Module:
        return self.model

    def __exit__(self, *exc_info) -> None:
        self.remove()


def _installed_patch(model: torch.nn.Module) -> Optional[FusedLossPatch]:
    forward = vars(model).get("forward")
    return getattr(getattr(forward, "__func__", None), "sga_fused_loss_patch", None)


def fused_causal_lm_loss(
    model: torch.nn.Module, *, smoothing: float = 0.0, ascent: bool = False, backend: str = "auto"
) -> FusedLossPatch:
    """Patch ``model`` so that ``model(**batch).loss`` is the fused smoothed-GA loss; undo with the handle.

    Behaviour while patched:
    - A call with ``labels`` (or HF's pre-shifted ``shift_labels``) runs the decoder only and returns a
      ``CausalLMOutputWithPast`` with the fused loss, ``logits=None``, and the decoder's cache / hidden states /
      attentions when it produced them (a tuple without the None entries for return_dict=False).
      The loss is the mean over non-ignored shifted labels, or the sum divided by ``num_items_in_batch`` when
      the caller (e.g. HF's Trainer) passes it; with the defaults (smoothing 0, ascent False) it equals the
      model's own cross-entropy loss. ``logits_to_keep`` other than 0 is refused together with labels.
    - A call without labels (generation, evaluation of logits) runs the original forward unchanged.
    - Apply it to the bare model before wrapping it (DDP, FSDP, ``accelerator.prepare``): the wrappers call
      ``model.forward`` and so reach the patch. Remove such a wrapper's own forward replacement before
      :meth:`FusedLossPatch.remove` (it refuses otherwise).
    - TRL's ``SFTTrainer`` computes its loss with a fused head of its own (``model(..., fused_lm_head=True)``),
      which never reaches this patch: use :class:`sga.sft.FusedSFTTrainer` there.

    Returns:
        A :class:`FusedLossPatch`: a context manager yielding the model, or call ``.remove()``.
    """
    return FusedLossPatch(model, smoothing, ascent, backend)
