"""Mapping between qsparse's :class:`~qsparse.models.config.LlamaConfig` and transformers'
Llama/Mistral configs (same field names; RoPE as ``rope_parameters``, no biases)."""

from __future__ import annotations

from typing import Any

from .config import LlamaConfig

__all__ = ["from_hf_config", "to_hf_config"]


def to_hf_config(config: LlamaConfig, **extra: Any) -> Any:
    """The ``transformers.LlamaConfig`` of ``config`` (``extra`` is passed through, e.g.
    ``bos_token_id``/``eos_token_id``)."""
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=False,
        mlp_bias=False,
        **extra,
    )


def from_hf_config(hf_config: Any) -> LlamaConfig:
    """Build from a ``transformers`` Llama (or bias-free, full-attention Mistral) config.

    Raises ``ValueError`` when the HF config uses a feature this model does not implement
    (attention/MLP biases, a head_dim other than hidden/heads, non-default RoPE scaling,
    sliding-window attention, an activation other than relu2/silu).
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ("llama", "mistral"):
        raise ValueError(
            f"from_hf_config: model_type {model_type!r} is not supported by "
            "qsparse.models.llama (supported: 'llama', 'mistral'); use the transformers "
            "model with qsparse.sparsify instead."
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise ValueError(f"from_hf_config: {flag}=True is not supported; it must be False.")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    if head_dim * heads != hf_config.hidden_size:
        raise ValueError(
            f"from_hf_config: head_dim ({head_dim}) * num_attention_heads ({heads}) must equal "
            f"hidden_size ({hf_config.hidden_size})."
        )
    window = getattr(hf_config, "sliding_window", None)
    if window is not None and window < hf_config.max_position_embeddings:
        raise ValueError(
            f"from_hf_config: sliding_window={window} is not supported; it must be None."
        )
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(
            f"from_hf_config: rope_parameters.rope_type={rope_type!r} is not supported; "
            "only 'default' RoPE is implemented."
        )
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    act = hf_config.hidden_act
    if act == "swish":
        act = "silu"
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    return LlamaConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=hf_config.max_position_embeddings,
        rope_theta=float(theta),
        rms_norm_eps=float(hf_config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        hidden_act=act,
        initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
    )
