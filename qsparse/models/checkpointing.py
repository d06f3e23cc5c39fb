"""Activation (gradient) checkpointing of decoder layers: the one switch.

:func:`enable_gradient_checkpointing` recomputes each decoder layer in backward instead of
storing its activations, with non-reentrant ``torch.utils.checkpoint``:

- a transformers model uses transformers' own mechanism (``activation_checkpointing_enable``,
  called ``gradient_checkpointing_enable`` before transformers 5.2x);
- qsparse's :class:`~qsparse.models.llama.LlamaForCausalLM`, which is no transformers
  ``PreTrainedModel``, gets the same ``checkpoint`` call around each layer's ``forward``.

In a training config one setting reaches it: the run-level ``gradient_checkpointing: true``
(``LMModule``, before any strategy shards the layers); ``model.gradient_checkpointing`` and
``trainer.strategy.activation_checkpointing`` are refused by the config check, naming it. The
Python APIs keep their own arguments, all this one call (``hf_model(gradient_checkpointing=)``,
:func:`~qsparse.training.strategies.fsdp_strategy`'s ``activation_checkpointing``); the call
is idempotent, so turning on more than one of them changes nothing.

Not Lightning's or torch's wrappers: Lightning offers activation checkpointing only as an
argument of its FSDP strategy (``activation_checkpointing_policy``), while this switch must
also work on one device and under DDP; torch's ``checkpoint_wrapper`` /
``apply_activation_checkpointing`` wrap each layer in a module, which inserts
``_checkpoint_wrapped_module`` into parameter and module names (sparsity site names,
optimizer groups, checkpoints), whereas patching ``forward`` keeps every name.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["decoder_layer_list", "enable_gradient_checkpointing"]

_LAYER_PATHS = ("model.layers", "layers", "transformer.h", "model.decoder.layers")


def decoder_layer_list(model: nn.Module) -> Sequence[nn.Module]:
    """The ``nn.ModuleList`` of decoder layers (``model.layers``, ``model.model.layers``, ...).

    Raises ``ValueError`` when there is none.
    """
    for path in _LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(
        "gradient_checkpointing=true needs the decoder layers at model.layers or "
        "model.model.layers (Llama-style names)"
    )


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute every decoder layer of ``model`` in backward (see the module docstring);
    parameter names unchanged, idempotent. Returns the number of decoder layers."""
    layers = decoder_layer_list(model)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        for layer in layers:
            if not getattr(layer, "_qsparse_checkpointed", False):
                layer.forward = functools.partial(_checkpointed, layer.forward)
                layer._qsparse_checkpointed = True
    return len(layers)
