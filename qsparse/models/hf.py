"""Hugging Face checkpoint folders: validate, load, and re-load sparsified models.

Folder layout written by :func:`qsparse.models.export.export` (a plain ``transformers`` checkpoint plus two extras)::

    config.json                    transformers config + a "qsparse" entry (settings, see below)
    model.safetensors[.index.json] the model's weights under HF Llama/Mistral/Qwen2 names
    qsparse_extra.safetensors      tensors the conversion added (e.g. SubLN RMSNorm weights of
                                   the sparsifiers); only when there are any
    tokenizer files                when a tokenizer was given

The ``"qsparse"`` entry of ``config.json``::

    {"sparsity": asdict(SparsityConfig), "quant": asdict(QuantConfig), "activation": str,
     "modules_to_not_convert": [...], "extra_weights": "qsparse_extra.safetensors" | null,
     "model_class": "qsparse" | "transformers", "qsparse_version": str}

``AutoModelForCausalLM.from_pretrained(folder)`` loads the dense weights (ignoring the extras);
:func:`load` additionally re-applies :func:`qsparse.sparsify` with the stored settings and loads
the extra tensors, reproducing the exported model bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import UserError

__all__ = [
    "EXTRA_WEIGHTS_NAME",
    "QSPARSE_CONFIG_KEY",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "check_hf_checkpoint",
    "load",
    "load_hf_model",
]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
)
QSPARSE_CONFIG_KEY = "qsparse"
EXTRA_WEIGHTS_NAME = "qsparse_extra.safetensors"

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointError(UserError):
    """A checkpoint folder is missing something or holds an unsupported model."""


# --------------------------------------------------------------------------------------------
# Validation and plain loading
# --------------------------------------------------------------------------------------------


def _has_tokenizer(folder: Path) -> bool:
    return (
        (folder / "tokenizer.json").is_file()
        or (folder / "tokenizer.model").is_file()
        or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    )


def _inside(folder: Path, name: Any, what: str = "weight index") -> Path:
    """``folder / name`` for a file name read from the checkpoint itself; a name that is not
    a plain relative path inside ``folder`` (absolute, ``..``) is refused."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{what}={name!r} must be a file name inside {folder}")
    path = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(
            f"{what}={name!r} points outside the checkpoint folder {folder}; a checkpoint may "
            "only name files inside its own folder (re-export it with qsparse.export())"
        )
    return path


def _check_settings(settings: Any, config_file: Path) -> None:
    """The ``"qsparse"`` entry of ``config.json`` must hold valid settings."""
    from ..nn import QuantConfig, SparsityConfig

    if not isinstance(settings, dict):
        raise CheckpointError(f"{config_file}: '{QSPARSE_CONFIG_KEY}' must be an object")
    try:
        SparsityConfig.from_dict(dict(settings.get("sparsity") or {}))
        QuantConfig.from_dict(dict(settings.get("quant") or {}))
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{config_file}: bad '{QSPARSE_CONFIG_KEY}' entry: {err}; fix it or re-export the "
            "model with qsparse.export()"
        ) from None
    activation = settings.get("activation", "keep")
    from ..convert import ACTIVATION_CHOICES

    if activation not in ACTIVATION_CHOICES:
        raise CheckpointError(
            f"{config_file}: bad '{QSPARSE_CONFIG_KEY}' entry: activation={activation!r} must be "
            f"one of {ACTIVATION_CHOICES}"
        )


def _check_safetensors_complete(path: Path) -> None:
    """A ``.safetensors`` file must be as long as its header says (a cut copy or download is
    otherwise only found deep inside the loader)."""
    size = path.stat().st_size
    fix = "copy or export it again"
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or 8 + n > size:
                raise CheckpointError(
                    f"{path} is truncated ({size} bytes, no complete header); {fix}"
                )
            header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(
            f"{path} is not a safetensors file (unreadable header); {fix}"
        ) from None
    ends = [
        int(v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise CheckpointError(f"{path} is truncated ({size} of {expected} bytes); {fix}")


def check_hf_checkpoint(path: str | os.PathLike, require_tokenizer: bool = False) -> dict:
    """Validate a local transformers checkpoint folder and return its parsed ``config.json``.

    Checks, in order: the folder exists; ``config.json`` exists and parses; ``model_type`` is
    one of :data:`SUPPORTED_MODEL_TYPES` and ``architectures`` (when present) names a
    supported causal LM; weights exist (``model.safetensors``, or an index whose every shard is
    present; ``pytorch_model.bin[.index.json]`` also accepted); the ``"qsparse"`` entry of
    ``config.json`` holds valid settings and its extra-weights file exists inside the folder
    (file names read from the checkpoint never reach outside it); every ``.safetensors`` file
    is as long as its header says (not truncated); and, with ``require_tokenizer``, tokenizer
    files exist.

    Raises:
        CheckpointError (a ``ValueError``) naming what is missing or unsupported.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint path {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint path {folder} is not a folder; pass the directory written by "
            "save_pretrained() or qsparse.export()"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"no config.json in {folder}: not a transformers checkpoint folder "
            "(write one with save_pretrained() or qsparse.export())"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object")

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"model_type={model_type!r} in {config_file} is not supported; supported model "
            f"types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    architectures = config.get("architectures") or []
    if architectures and not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise CheckpointError(
            f"architectures={architectures} in {config_file} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    index = next((folder / n for n in _INDEX_FILES if (folder / n).is_file()), None)
    weight_files: list[Path] = []
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid weight index ({err!r})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not _inside(folder, s).is_file()]
        if missing:
            raise CheckpointError(
                f"{index.name} in {folder} lists shard(s) that are missing: {missing}"
            )
        weight_files = [_inside(folder, s) for s in shards]
    elif not any((folder / n).is_file() for n in _WEIGHT_FILES):
        raise CheckpointError(
            f"no weights in {folder}: expected model.safetensors or "
            "model.safetensors.index.json with its shards (or pytorch_model.bin[.index.json])"
        )
    else:
        weight_files = [folder / n for n in _WEIGHT_FILES if (folder / n).is_file()]

    settings = config.get(QSPARSE_CONFIG_KEY)
    if settings is not None:
        _check_settings(settings, config_file)
        extra = settings.get("extra_weights")
        if extra is not None:
            extra_file = _inside(folder, extra, f"{config_file}: qsparse.extra_weights")
            if not extra_file.is_file():
                raise CheckpointError(
                    f"{config_file} names qsparse extra weights {extra!r} but {extra_file} is "
                    "missing; re-export the model with qsparse.export()"
                )
            weight_files.append(extra_file)
    for weights in weight_files:
        if weights.suffix == ".safetensors":
            _check_safetensors_complete(weights)

    if require_tokenizer and not _has_tokenizer(folder):
        raise CheckpointError(
            f"no tokenizer in {folder}: expected tokenizer.json, tokenizer.model or "
            "vocab.json + merges.txt (export with tokenizer=... or save the tokenizer there)"
        )
    return config


def load_hf_model(
    path: str | os.PathLike,
    dtype: torch.dtype | Literal["auto"] = torch.float32,
    require_tokenizer: bool = False,
) -> nn.Module:
    """Validate ``path`` (:func:`check_hf_checkpoint`) and load it with
    ``AutoModelForCausalLM.from_pretrained`` from local files only, in ``dtype`` ("auto" keeps
    the checkpoint's dtype), in eval mode. No qsparse settings are applied (see :func:`load`)."""
    from transformers import AutoModelForCausalLM

    check_hf_checkpoint(path, require_tokenizer=require_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Load (re-applying the swap)
# --------------------------------------------------------------------------------------------


def _to_qsparse_model(hf_model: nn.Module) -> nn.Module:
    """Move a transformers Llama's weights into qsparse's own ``LlamaForCausalLM``."""
    from .hf_config import from_hf_config
    from .llama import LlamaForCausalLM

    config = from_hf_config(hf_model.config)
    state = hf_model.state_dict()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | Literal["auto"] = "auto",
    model_class: Literal["auto", "transformers", "qsparse"] = "auto",
) -> nn.Module:
    """Load a checkpoint folder and restore its qsparse conversion.

    Loads with ``AutoModelForCausalLM.from_pretrained`` (local files only), then, when
    ``config.json`` has a "qsparse" entry, re-applies :func:`qsparse.sparsify` with the stored
    sparsity/quant/activation settings and loads the extra tensors. A model exported by
    :func:`export` comes back bit-exactly (same logits, ``torch.equal``).

    Args:
        path: checkpoint folder (validated with :func:`check_hf_checkpoint`).
        dtype: parameter dtype; ``"auto"`` keeps the stored one.
        model_class: ``"transformers"`` returns the transformers model; ``"qsparse"`` our
            :class:`~qsparse.models.llama.LlamaForCausalLM` (Llama checkpoints only);
            ``"auto"`` the class the checkpoint was exported from (transformers for plain HF
            folders).

    Returns:
        the model in eval mode.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if model_class not in ("auto", "transformers", "qsparse"):
        raise ValueError(f"model_class={model_class!r} must be 'auto', 'transformers' or 'qsparse'")
    folder = Path(path)
    config = check_hf_checkpoint(folder)
    entry = config.get(QSPARSE_CONFIG_KEY) or {}
    if model_class == "auto":
        model_class = "qsparse" if entry.get("model_class") == "qsparse" else "transformers"
    if model_class == "qsparse" and config.get("model_type") not in ("llama", "mistral"):
        raise ValueError(
            f"model_class='qsparse' needs a llama checkpoint, {folder} holds "
            f"model_type={config.get('model_type')!r}; use model_class='transformers'"
        )
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    if model_class == "qsparse":
        model = _to_qsparse_model(model)

    if "sparsity" in entry or "quant" in entry:
        from ..convert import sparsify
        from ..nn import QuantConfig, SparsityConfig

        sparsify(
            model,
            sparsity=SparsityConfig.from_dict(entry.get("sparsity") or {}),
            quant=QuantConfig.from_dict(entry.get("quant") or {}),
            activation=entry.get("activation", "keep"),
            modules_to_not_convert=tuple(entry.get("modules_to_not_convert", ("lm_head",))),
        )
    if entry.get("method"):  # modules a method added beyond the sites (e.g. CATS gates)
        from ..methods import restore_method

        restore_method(model, entry["method"])
    extra_name = entry.get("extra_weights")
    if extra_name:
        extra = load_file(str(_inside(folder, extra_name, "qsparse.extra_weights")))
        result = model.load_state_dict(extra, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(
                f"{folder / extra_name} holds tensors the re-sparsified model does not have: "
                f"{result.unexpected_keys[:8]}; the stored qsparse settings do not match them"
            )
    return model.eval()
