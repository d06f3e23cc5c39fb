"""Model builders for starting training from an existing checkpoint (``model=hf``).

The training module builds its model from a ``_target_`` spec inside
``LMModule.configure_model`` and then applies ``qsparse.sparsify`` with the run's
``sparsity``/``quant``/``activation`` settings, so these builders only load: they check the
folder (config, weights, tokenizer; :func:`qsparse.models.hf.check_hf_checkpoint` names
what is missing), load the weights from local files, switch off the KV cache (training does
not need it) and optionally turn on gradient checkpointing.

``conf/model/hf.yaml``::

    _target_: qsparse.models.pretrained.hf_model
    path: ???                  # a local folder: config.json, *.safetensors, tokenizer files

The data module must tokenize with the checkpoint's own tokenizer: the ``model=hf`` recipes
set ``data.tokenizer: ${model.path}``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from torch import nn

from ..dtypes import torch_dtype
from .checkpointing import enable_gradient_checkpointing


def hf_model(
    path: str | os.PathLike,
    dtype: str = "float32",
    model_class: Literal["transformers", "qsparse"] = "transformers",
    gradient_checkpointing: bool = False,
    require_tokenizer: bool = True,
    attn_implementation: str | None = "sdpa",
) -> nn.Module:
    """Load a local Llama / Mistral / Qwen2 checkpoint folder for training.

    Args:
        path: folder written by ``save_pretrained`` or :func:`qsparse.export` (a folder
            exported with qsparse settings comes back sparsified; the run's settings are
            applied on top by the training module).
        dtype: parameter dtype, ``"float32"`` (default: fp32 master weights; mixed precision
            comes from ``trainer.precision``), ``"bfloat16"``, ``"float16"`` or ``"auto"``
            (the checkpoint's).
        model_class: ``"transformers"`` keeps the transformers class;
            ``"qsparse"`` moves a Llama checkpoint into qsparse's own
            :class:`~qsparse.models.llama.LlamaForCausalLM` (same parameter names).
        gradient_checkpointing: per-layer activation checkpointing
            (:func:`qsparse.models.checkpointing.enable_gradient_checkpointing`, the same call
            as the run-level ``gradient_checkpointing: true``).
        require_tokenizer: fail when the folder has no tokenizer files (the data module and the
            export need the checkpoint's tokenizer).
        attn_implementation: transformers attention backend (``"sdpa"``, ``"eager"``, None =
            transformers' default); ignored for ``model_class="qsparse"``.

    Returns:
        the model in train mode, ``config.use_cache = False``.

    Raises:
        CheckpointError (``ValueError``): the folder is missing, or lacks ``config.json``,
            weights, shards listed in the index or tokenizer files, or holds an unsupported
            architecture; the message names which.
        ValueError: bad ``dtype``/``model_class``, or the tokenizer has more tokens than the
            model's embedding rows.
    """
    from .hf import QSPARSE_CONFIG_KEY, check_hf_checkpoint, load

    torch_dtype_ = torch_dtype(dtype, "model.dtype", allow_auto=True)
    if model_class not in ("transformers", "qsparse"):
        raise ValueError(f"model.model_class={model_class!r} must be 'transformers' or 'qsparse'")
    if path is None or str(path) in ("", "???"):
        raise ValueError(
            "model.path is not set: give a local checkpoint folder, e.g. model=hf "
            "model.path=/path/to/checkpoint"
        )
    config = check_hf_checkpoint(path, require_tokenizer=require_tokenizer)
    if model_class == "qsparse" and config.get("model_type") not in ("llama", "mistral"):
        raise ValueError(
            f"model.model_class='qsparse' needs a Llama checkpoint; {path} is "
            f"model_type={config.get('model_type')!r}: use model.model_class=transformers"
        )
    if require_tokenizer:
        _check_tokenizer_fits(path, config)

    if model_class == "transformers" and QSPARSE_CONFIG_KEY not in config:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": torch_dtype_, "local_files_only": True}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    else:
        # qsparse.load restores stored sparsity settings and the qsparse class if asked
        model = load(path, dtype=torch_dtype_, model_class=model_class)

    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "use_cache"):
        hf_config.use_cache = False
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()


def _check_tokenizer_fits(path: str | os.PathLike, config: dict[str, Any]) -> None:
    """The tokenizer's ids must index the embedding: ``len(tokenizer) <= vocab_size``."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"the tokenizer files in {path} do not load: {err}") from err
    vocab = config.get("vocab_size")
    if vocab is not None and len(tokenizer) > int(vocab):
        raise ValueError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's "
            f"vocab_size is {vocab}: token ids would overflow the embedding; save the "
            "checkpoint with its own tokenizer"
        )
