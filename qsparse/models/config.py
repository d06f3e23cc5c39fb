"""``LlamaConfig``: shape and numerics of qsparse's Llama decoder, with parameter and FLOP counts.

Named shapes are in :mod:`qsparse.models.presets`, the mapping to and from transformers'
configs in :mod:`qsparse.models.hf_config`, the model in :mod:`qsparse.models.llama`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .flops import training_flops_per_token
from .presets import PRESETS

__all__ = ["HIDDEN_ACTS", "LlamaConfig"]

HIDDEN_ACTS: tuple[str, ...] = ("relu2", "silu")


@dataclass
class LlamaConfig:
    """Shape and numerics of a Llama-style decoder.

    Attributes:
        vocab_size: V, rows of the embedding and of the lm head.
        hidden_size: d, the residual-stream width.
        intermediate_size: F, width of the GLU hidden layer (gate/up output, down input).
        num_hidden_layers: L, decoder layers.
        num_attention_heads: H; must divide ``hidden_size``.
        num_key_value_heads: H_kv for grouped-query attention; must divide H (H_kv = H is
            multi-head attention, H_kv = 1 multi-query attention).
        max_position_embeddings: longest sequence the model is meant for (RoPE itself has no
            hard limit; generation refuses to go past it).
        rope_theta: RoPE base b; frequencies are ``b^(-2i/D)`` for i in [0, D/2).
        rms_norm_eps: epsilon inside RMSNorm's square root.
        tie_word_embeddings: lm head shares the embedding matrix.
        hidden_act: GLU activation, ``"relu2"`` (ReLU², Q-Sparse) or ``"silu"`` (SwiGLU).
        initializer_range: std of the normal init of linear and embedding weights.
    """

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    hidden_act: str = "relu2"
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    # -- derived quantities ------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """D = hidden_size / num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> LlamaConfig:
        """Check the configuration; raise ``ValueError`` naming the offending field and the fix.

        Returns ``self`` so it can be chained.
        """
        # every int field is a size or a count (the annotations are strings here)
        positive_ints = [f.name for f in dataclasses.fields(self) if f.type == "int"]
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}.")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(
                f"LlamaConfig.tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}."
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(
                f"LlamaConfig.hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}."
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"LlamaConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads}); pick a head count that "
                "divides the hidden size."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"LlamaConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads}) for grouped-query attention."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"LlamaConfig: head dim hidden_size/num_attention_heads = {self.head_dim} must be "
                "even for RoPE; change hidden_size or num_attention_heads."
            )
        return self

    # -- presets -------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """Build a preset configuration (see ``PRESETS``), optionally overriding fields.

        Raises ``ValueError`` for an unknown preset or an unknown field name.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown LlamaConfig preset {name!r}; choose one of {list(PRESETS)}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"Unknown LlamaConfig field(s) {unknown} in overrides; valid fields: {sorted(known)}."
            )
        return cls(**{**PRESETS[name], **overrides})

    # -- parameter and FLOP counts ---------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct trainable parameters of ``LlamaForCausalLM(self)``.

        Per layer: attention ``d·(H·D) + 2·d·(H_kv·D) + (H·D)·d``, GLU ``3·d·F``, two RMSNorm
        weights ``2·d``; plus the final norm ``d``, the embedding ``V·d`` and, when untied, the
        lm head ``V·d``. ``exclude_embeddings=True`` drops the embedding and the lm head (the
        Kaplan et al. "non-embedding" count).
        """
        d, hd = self.hidden_size, self.head_dim
        attn = d * self.num_attention_heads * hd * 2 + 2 * d * self.num_key_value_heads * hd
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        body = self.num_hidden_layers * per_layer + d
        if exclude_embeddings:
            return body
        embed = self.vocab_size * d
        return body + embed * (1 if self.tie_word_embeddings else 2)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM-style: ``6·N + 12·L·d·T``
        (:func:`qsparse.models.flops.training_flops_per_token`).

        ``N`` counts the weights used in matrix multiplies: the non-embedding parameters plus
        the lm head (``V·d``, tied or not; the embedding lookup costs no FLOPs). The attention
        term ``12·L·d·T`` covers QKᵀ and AV (2·2·d·T multiply-adds per layer forward, ×3 for
        backward) at context ``T`` = ``seq_len`` (default ``max_position_embeddings``). Use it
        for MFU = tokens/s · flops_per_token / peak FLOP/s.
        """
        t = self.max_position_embeddings if seq_len is None else seq_len
        n_matmul = self.num_parameters(exclude_embeddings=True) + self.vocab_size * self.hidden_size
        return training_flops_per_token(n_matmul, self.num_hidden_layers, self.hidden_size, t)
