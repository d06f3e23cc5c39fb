"""Export a (sparsified) model as a transformers checkpoint folder, atomically.

The layout and the ``"qsparse"`` entry of ``config.json`` are described in
:mod:`qsparse.models.hf`, whose :func:`~qsparse.models.hf.load` reads the folder back
bit-exactly.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_write_dir
from ..version import __version__
from .hf import (
    EXTRA_WEIGHTS_NAME,
    QSPARSE_CONFIG_KEY,
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
)
from .hf_config import to_hf_config

__all__ = ["WRAPPER_PREFIXES", "clean_state_dict", "export"]

#: prefixes that wrappers insert into parameter names (torch.compile, activation
#: checkpointing, FSDP1); stripped before export
WRAPPER_PREFIXES: tuple[str, ...] = (
    "_orig_mod.",
    "_checkpoint_wrapped_module.",
    "_fsdp_wrapped_module.",
)


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``_orig_mod.`` from torch.compile, ...) from every key.

    Raises ``ValueError`` if two keys collide after stripping.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        clean = key
        for prefix in WRAPPER_PREFIXES:
            clean = clean.replace(prefix, "")
        if clean in out:
            raise ValueError(f"state dict keys collide after stripping wrapper prefixes: {clean}")
        out[clean] = value
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip a ``torch.compile`` wrapper and a training wrapper (e.g. qsparse's Lightning
    ``LMModule``, whose causal LM sits at ``.model``)."""
    from .llama import LlamaForCausalLM

    for _ in range(3):
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):  # torch.compile's OptimizedModule
            model = inner
            continue
        supported = isinstance(model, LlamaForCausalLM) or (
            type(model).__name__ in SUPPORTED_ARCHITECTURES
        )
        inner = getattr(model, "model", None)
        if not supported and isinstance(inner, nn.Module):
            model = inner
            continue
        break
    return model


def _hf_skeleton(model: nn.Module) -> tuple[nn.Module, str]:
    """A dense transformers model of ``model``'s architecture on the meta device and the
    model class tag ("qsparse" for our Llama, "transformers" otherwise)."""
    from .llama import LlamaForCausalLM

    if isinstance(model, LlamaForCausalLM):
        import transformers

        dtype = model.lm_head.weight.dtype
        hf_config = to_hf_config(model.config)
        hf_config.dtype = dtype
        cls, tag = transformers.LlamaForCausalLM, "qsparse"
    else:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        name = type(model).__name__
        if model_type not in SUPPORTED_MODEL_TYPES or name not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"export supports qsparse.models.llama.LlamaForCausalLM and transformers "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}; got {type(model).__module__}.{name}"
            )
        hf_config = copy.deepcopy(config)
        cls, tag = type(model), "transformers"
    if hasattr(hf_config, QSPARSE_CONFIG_KEY):
        delattr(hf_config, QSPARSE_CONFIG_KEY)
    with torch.device("meta"):
        skeleton = cls(hf_config)
    return skeleton, tag


def _check_export_target(path: Path) -> None:
    """Refuse to replace anything but a checkpoint folder (or an empty one)."""
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"export path {path} exists and is not a folder")
        if any(path.iterdir()) and not (path / "config.json").is_file():
            raise ValueError(
                f"export path {path} is a non-empty folder that is not a checkpoint; refusing "
                "to overwrite it (choose an empty or new folder)"
            )


def export(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    qsparse_settings: dict[str, Any] | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write ``model`` as a transformers checkpoint folder at ``path`` (atomically).

    Args:
        model: a qsparse :class:`~qsparse.models.llama.LlamaForCausalLM` (saved as a
            transformers ``LlamaForCausalLM`` with the same state dict) or a transformers
            Llama/Mistral/Qwen2 causal LM, sparsified or not, optionally ``torch.compile``-d.
        path: destination folder; an existing checkpoint folder there is replaced.
        tokenizer: a tokenizer object (saved with ``save_pretrained``) or a folder to load one
            from; ``None`` writes no tokenizer.
        qsparse_settings: the settings to record under ``config.json["qsparse"]``; default:
            those the last :func:`qsparse.sparsify` stored on the model (none if never
            sparsified).
        max_shard_size: passed to ``save_pretrained``.

    Returns:
        the folder path. Call it on one process only (rank 0) in distributed runs.
    """
    from safetensors.torch import save_file

    from ..nn.sites import get_settings

    model = _unwrap(model)
    skeleton, tag = _hf_skeleton(model)
    state = clean_state_dict(model.state_dict())
    base_keys = list(skeleton.state_dict().keys())
    tied = bool(getattr(skeleton.config, "tie_word_embeddings", False))
    if tied and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # restore the tied head
    missing = [k for k in base_keys if k not in state]
    if missing:
        raise ValueError(f"export: the model's state dict lacks {missing[:8]} (of {len(missing)})")
    base = {k: state[k] for k in base_keys}
    extra = {k: v for k, v in state.items() if k not in base}
    skeleton.load_state_dict(base, strict=True, assign=True)
    if tied:
        skeleton.lm_head.weight = skeleton.model.embed_tokens.weight

    settings = qsparse_settings if qsparse_settings is not None else get_settings(model)
    if settings is not None or extra or tag == "qsparse":
        entry = copy.deepcopy(dict(settings or {}))
        entry["extra_weights"] = EXTRA_WEIGHTS_NAME if extra else None
        entry["model_class"] = tag
        entry["qsparse_version"] = __version__
        setattr(skeleton.config, QSPARSE_CONFIG_KEY, entry)

    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)

    def write(folder: Path) -> None:
        skeleton.save_pretrained(folder, max_shard_size=max_shard_size)
        if extra:
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in extra.items()}
            save_file(tensors, str(folder / EXTRA_WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    out = Path(path)
    _check_export_target(out)
    # a killed export's .<name>.tmp-<pid> folder is removed by
    # qsparse.training.checkpoint.remove_orphaned_temporaries on the next start
    return atomic_write_dir(out, write)
