"""Build a model from a config spec: what every ``conf/model/*.yaml`` ``_target_`` names.

``LMModule`` (``qsparse.training``) calls :func:`build_model` inside ``configure_model`` with
the run's ``model`` spec; the qsparse Llama YAMLs target :func:`llama`, the Hugging Face ones
:func:`qsparse.models.pretrained.hf_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["build_model", "llama"]


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Instantiate a model from a spec.

    ``{"_target_": "pkg.fn", **kwargs}`` calls ``pkg.fn(**kwargs)`` (Hydra semantics); a spec
    without ``_target_`` is ``{"preset": name, **overrides}`` for :func:`llama`.
    """
    spec = dict(spec)
    if "_target_" not in spec:
        return llama(**spec)
    from hydra.utils import instantiate

    try:
        model = instantiate(spec, _convert_="all")
    except Exception as exc:  # hydra wraps the builder's error; surface it with the key
        raise ValueError(f"model: could not build {spec.get('_target_')!r}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model._target_={spec['_target_']!r} returned {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    return model


def llama(preset: str = "tiny", **overrides: Any) -> nn.Module:
    """A qsparse :class:`~qsparse.models.llama.LlamaForCausalLM` from a preset plus overrides
    (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``hidden_act``, ...; ``None``
    values take the preset's)."""
    from .config import LlamaConfig
    from .llama import LlamaForCausalLM

    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        config = LlamaConfig.from_preset(preset, **overrides)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model: {exc} (check the model.* keys)") from exc
    return LlamaForCausalLM(config)
