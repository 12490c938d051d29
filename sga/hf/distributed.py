"""Modules whose parameters a sharding framework holds: recognize them and compute inside their own call.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a module's parameters are DTensor shards outside the
forward of their FSDP module; under DeepSpeed ZeRO-3 they are empty placeholders outside the forward of the
module that owns them. Both frameworks gather the parameters in a forward pre-hook, release them in a forward
hook, and attach to the forward's outputs the backward hooks that gather them again and reduce their gradients.
:func:`call_inside` runs any computation as the module's forward (through ``module.__call__``), so those hooks run
around it exactly as around the module's own forward: the parameters are whole inside, and their gradients are
reduced and sharded by the framework as usual.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

FSDP2 = "FSDP2 (fully_shard)"
ZERO3 = "DeepSpeed ZeRO-3"

# where the forward hooks of each framework are defined (other hooks, e.g. tensor parallelism's, are not theirs)
_HOOK_MODULES = {FSDP2: ("torch.distributed.fsdp.",), ZERO3: ("deepspeed.",)}


def _fsdp_module_class() -> Optional[type]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return None
    return FSDPModule


def sharding_framework(module: torch.nn.Module) -> Optional[str]:
    """:data:`FSDP2` if ``module`` is an FSDP2 module (its own parameter group), :data:`ZERO3` if its own
    parameters are ZeRO-3 partitioned (they carry DeepSpeed's ``ds_id``), else None."""
    fsdp_module = _fsdp_module_class()
    if fsdp_module is not None and isinstance(module, fsdp_module):
        return FSDP2
    if any(hasattr(p, "ds_id") for p in module.parameters(recurse=False)):
        return ZERO3
    return None


def in_fsdp_forward(module: torch.nn.Module) -> bool:
    """Whether the FSDP2 module ``module`` is inside its own forward now (its parameters are unsharded)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    state = module._get_fsdp_state()
    return state._training_state == TrainingState.FORWARD


def only_framework_hooks(module: torch.nn.Module, framework: Optional[str]) -> bool:
    """True when every forward (pre-)hook of ``module`` was registered by ``framework`` (none: no hooks at all)."""
    prefixes = _HOOK_MODULES.get(framework, ())
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return all(getattr(hook, "__module__", "").startswith(prefixes) for hook in hooks) if prefixes else not hooks


def call_inside(
    module: torch.nn.Module, compute: Callable[..., Any], *inputs: Any, through: Optional[torch.nn.Module] = None
) -> Any:
    """``compute(*inputs)`` run as ``module``'s forward, through ``module(*inputs)`` and so between its hooks.

    ``through``: a wrapper of ``module`` (DDP, FSDP, a DeepSpeed engine) to call instead, ``through(*inputs)``,
    whose forward calls ``module``: the wrapper's own forward logic (DDP's gradient-reduction bookkeeping) runs too.

    Pass the tensors the computation differentiates through as ``inputs``: the frameworks attach their
    post-backward hooks (gradient reduction, releasing the gathered parameters) to the forward's inputs.
    ``module.forward`` is replaced for the call only (an instance-level forward, such as a patch, is restored).
    A tensor result (or tuple item) that is a view is returned as a copy (the framework's pre-backward hooks sit
    on the result)."""
    previous = vars(module).get("forward")

    def unview(out: Any) -> Any:
        # a view would make FSDP2 warn that an in-place op on it drops its pre-backward hook: hand back a tensor
        return out.clone() if isinstance(out, torch.Tensor) and out._is_view() else out

    def forward(*args):
        out = compute(*args)
        return tuple(unview(item) for item in out) if isinstance(out, tuple) else unview(out)

    module.forward = forward
    try:
        return (module if through is None else through)(*inputs)
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a sharded or replicated distributed tensor)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)
