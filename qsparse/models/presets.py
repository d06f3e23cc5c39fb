"""Named shapes of the qsparse Llama (``LlamaConfig.from_preset(name, **overrides)``).

The paper's from-scratch shapes (Q-Sparse §4.1) are named by their non-embedding size;
"374M" is the GPU reference model (374M parameters with the tied 32000-token embedding);
"tiny" is for unit tests and "debug" for the CPU demo. The model YAMLs (``conf/model/``)
leave fields null to take these values.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "debug": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "374M": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=6,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
    "300M": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2730,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "700M": dict(
        vocab_size=32000,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=24,
        num_key_value_heads=24,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "1.3B": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5460,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "7B": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}
