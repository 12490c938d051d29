"""Representation misdirection (RMU; Li et al. 2024, "The WMDP Benchmark"), as open-unlearning runs it.

With h_t^l(x) the output of decoder layer l at position t, u a fixed random unit vector (uniform [0, 1)
entries, normalized; seeded by ``steering_seed``), c the steering coefficient, mse(a, b) = (1/D) ||a - b||^2:

    L = gamma * (1/|A_f|) sum_{t in A_f} mse(h_t^l(x_f), c u)
      + alpha * (1/(K-1)) sum_k (1/|A_n|) sum_{t in A_n} mse(h_t^l(x_n^k), h_ref,t^l(x_n^k))

A the positions of the answer tokens (labels != -100, unshifted, as in open-unlearning), h_ref the frozen
initial model. Defaults are open-unlearning's config: layer 7, c = 2, alpha = 1, gamma = 1, every parameter
trained (its ``trainable_params_regex`` is not offered). The layer is given by its index in the decoder's
layer list. The logged forget NLL comes from the same forward (the decoder runs to the end; the layers after
l get no gradient).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch

from sga.hf.families import resolve_head
from sga.hf.loss import IGNORE_INDEX
from sga.hf.token_loss import answer_nll_from_hidden
from sga.methods.retain import RetainRegularized
from sga.methods.token import kept_positions, token_means


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder-layer list of a Hugging Face causal LM (``layers`` of Llama-style models and OPT's decoder,
    ``h`` of GPT-2)."""
    decoder = model.get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise NotImplementedError(f"cannot find the decoder layers of {type(model).__name__} (no layers / h / blocks list)")


@contextlib.contextmanager
def capture_layer_output(layer: torch.nn.Module):
    """Within the block, ``captured[0]`` is the layer's output hidden states of the last forward."""
    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        captured[:] = [output[0] if isinstance(output, tuple) else output]

    handle = layer.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def masked_mse(activations: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row [B]: mean over the answer positions (labels != -100) of mean_d (a - target)^2."""
    keep = (labels != IGNORE_INDEX).to(activations.dtype)
    per_position = (activations.float() - target.float()).square().mean(dim=-1)
    return (per_position * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


def control_vector(hidden_size: int, coefficient: float, seed: int) -> torch.Tensor:
    """c * u, u uniform [0, 1)^D normalized to unit length, from a generator seeded with ``seed``."""
    direction = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed))
    return coefficient * direction / direction.norm()


class RepresentationMisdirection(RetainRegularized):
    """``rmu``: forget activations at decoder layer ``layer`` pushed to c * u, retain activations kept at the
    frozen model's (see the module docstring for L)."""

    name = "rmu"

    def __init__(self, *, layer: int = 7, steering_coeff: float = 2.0, steering_seed: int = 0, **retain: Any) -> None:
        super().__init__(**retain)
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"rmu's layer must be a decoder-layer index >= 0, got {layer!r}")
        if not math.isfinite(steering_coeff):
            raise ValueError(f"rmu's steering_coeff must be finite, got {steering_coeff}")
        self.layer = layer
        self.steering_coeff = float(steering_coeff)
        self.steering_seed = int(steering_seed)
        self._control: Optional[torch.Tensor] = None

    @property
    def uses_reference_model(self) -> bool:  # type: ignore[override]
        return self.uses_normal  # the retain term compares with the frozen model's activations

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        return cls(layer=config.rmu_layer, steering_coeff=config.steering_coeff, steering_seed=config.steering_seed,
                   backend=backend, forget_weight=config.forget_weight, retain_weight=config.alpha)

    def _layer_of(self, model: torch.nn.Module) -> torch.nn.Module:
        layers = decoder_layers(model)
        if self.layer >= len(layers):
            raise ValueError(f"rmu's layer {self.layer} does not exist: the model has {len(layers)} decoder layers (0..{len(layers) - 1})")
        return layers[self.layer]

    def layer_activations(self, model: torch.nn.Module, batch, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer output [B, T, D], last hidden state [B, T, D]) of the ``prefix`` sequences, one decoder forward."""
        with capture_layer_output(self._layer_of(model)) as captured:
            outputs = model.get_decoder()(input_ids=batch[f"{prefix}_input_ids"], attention_mask=batch[f"{prefix}_attention_mask"],
                                          return_dict=True, use_cache=False)
        return captured[0], outputs.last_hidden_state

    def forget_term(self, model, batch):
        activations, hidden = self.layer_activations(model, batch, "forget")
        if self._control is None or self._control.shape[0] != activations.shape[-1]:
            self._control = control_vector(activations.shape[-1], self.steering_coeff, self.steering_seed)
        labels = batch["forget_labels"]
        losses = masked_mse(activations, self._control.to(activations.device), labels)
        nll = answer_nll_from_hidden(resolve_head(model), hidden, labels, self.backend, kept_positions(batch, "forget"))
        return losses, token_means(nll, labels)

    def retain_term(self, model, batch):
        if not self.uses_normal:
            return torch.zeros(()), None
        if self.reference_model is None:
            raise RuntimeError("rmu needs reference_model set (the trainer sets it): the frozen initial model")
        per_forget = batch["normal_input_ids"].shape[0] // batch["forget_input_ids"].shape[0]
        activations, _ = self.layer_activations(model, batch, "normal")
        with torch.no_grad():
            reference, _ = self.layer_activations(self.reference_model, batch, "normal")
        return masked_mse(activations, reference, batch["normal_labels"]).sum() / per_forget, None

    def describe(self):
        base = {k: v for k, v in super().describe().items() if k != "retain_loss"}
        return {**base, "layer": self.layer, "steering_coeff": self.steering_coeff, "steering_seed": self.steering_seed}
