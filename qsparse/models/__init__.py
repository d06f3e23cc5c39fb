"""Models: a Llama-style decoder with HF-compatible names and Hugging Face checkpoint interop."""

from .hf import (
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    check_hf_checkpoint,
    export,
    load,
    load_hf_checkpoint,
    load_hf_model,
)
from .llama import PRESETS, LlamaConfig, LlamaForCausalLM

__all__ = [
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "LlamaConfig",
    "LlamaForCausalLM",
    "check_hf_checkpoint",
    "export",
    "load",
    "load_hf_checkpoint",
    "load_hf_model",
]
