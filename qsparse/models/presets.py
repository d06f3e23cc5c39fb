"""Named shapes of the qsparse Llama (``LlamaConfig.from_preset(name, **overrides)``).

The paper's from-scratch shapes (Q-Sparse §4.1) are named by their non-embedding size;
"374M" is the GPU reference model (374M parameters with the tied 32000-token embedding);
"tiny" is for unit tests and "debug" for the CPU demo. The model YAMLs (``conf/model/``)
leave fields null to take these values.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

#: the columns of the table below, in order
FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
)

# fmt: off
_TABLE: dict[str, tuple[int, int, int, int, int, int, int, bool]] = {
    #         V      d     F      L   H   H_kv  T     tied
    "tiny":  (256,   64,   176,   2,  4,  2,    256,  True),
    "debug": (4096,  256,  688,   4,  4,  4,    512,  True),
    "374M":  (32000, 2048, 5632,  6,  16, 16,   2048, True),
    "300M":  (32000, 1024, 2730,  24, 16, 16,   2048, False),
    "700M":  (32000, 1536, 4096,  24, 24, 24,   2048, False),
    "1.3B":  (32000, 2048, 5460,  24, 32, 32,   2048, False),
    "7B":    (32000, 4096, 11008, 32, 32, 32,   2048, False),
}
# fmt: on

#: preset name -> LlamaConfig field values
PRESETS: dict[str, dict[str, Any]] = {
    name: dict(zip(FIELDS, row, strict=True)) for name, row in _TABLE.items()
}
