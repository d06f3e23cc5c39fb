"""Models: a Llama-style decoder with HF-compatible names and Hugging Face checkpoint interop."""

from .config import LlamaConfig
from .export import export
from .hf import (
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    check_hf_checkpoint,
    load,
    load_hf_model,
)
from .llama import LlamaForCausalLM
from .presets import PRESETS

__all__ = [
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "LlamaConfig",
    "LlamaForCausalLM",
    "check_hf_checkpoint",
    "export",
    "load",
    "load_hf_model",
]
