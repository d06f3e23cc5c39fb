"""A readable Llama-style decoder whose parameter names match Hugging Face's ``LlamaForCausalLM``.

The model is written in the nanoGPT / litgpt spirit: one file, plain PyTorch, no training
concerns. Its numerics follow ``transformers``' Llama exactly (RMSNorm computed in fp32, RoPE with
the ``rotate_half`` convention and the default frequency schedule, HF's shifted-label loss) so that
an HF state dict loads with ``load_state_dict(strict=True)`` and produces the same logits.

Shapes used in the docstrings: ``B`` batch, ``T`` query length, ``S`` key length (past + T),
``d`` = ``hidden_size``, ``H`` attention heads, ``H_kv`` key/value heads, ``D`` = d / H head
dimension, ``F`` = ``intermediate_size``, ``V`` = ``vocab_size``.

Module layout (the contract ``qsparse.sparsify`` relies on)::

    LlamaForCausalLM
      model: LlamaModel
        embed_tokens: Embedding(V, d)
        layers[i]: LlamaDecoderLayer
          input_layernorm: RMSNorm(d)
          self_attn: LlamaAttention  (q_proj, k_proj, v_proj, o_proj), called as self_attn(x, ...)
          post_attention_layernorm: RMSNorm(d)
          mlp: LlamaMLP (gate_proj, up_proj, down_proj, act_fn), called as mlp(x)
        norm: RMSNorm(d)
      lm_head: Linear(d, V)  (shares embed_tokens.weight when tie_word_embeddings)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qsparse.nn import GLUFeedForward

__all__ = [
    "HIDDEN_ACTS",
    "PRESETS",
    "CausalLMOutput",
    "KVCache",
    "LlamaAttention",
    "LlamaConfig",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaMLP",
    "LlamaModel",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary_pos_emb",
    "rotate_half",
]

HIDDEN_ACTS: tuple[str, ...] = ("relu2", "silu")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


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
        positive_ints = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        )
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

    # -- presets -----------------------------------------------------------------------------

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
        """Training FLOPs per token (forward + backward), PaLM-style: ``6·N + 12·L·d·T``.

        ``N`` counts the weights used in matrix multiplies: the non-embedding parameters plus
        the lm head (``V·d``, tied or not; the embedding lookup costs no FLOPs). The attention
        term ``12·L·d·T`` covers QKᵀ and AV (2·2·d·T multiply-adds per layer forward, ×3 for
        backward) at context ``T`` = ``seq_len`` (default ``max_position_embeddings``). Use it
        for MFU = tokens/s · flops_per_token / peak FLOP/s.
        """
        t = self.max_position_embeddings if seq_len is None else seq_len
        if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}.")
        n_matmul = self.num_parameters(exclude_embeddings=True) + self.vocab_size * self.hidden_size
        return 6.0 * n_matmul + 12.0 * self.num_hidden_layers * self.hidden_size * t

    # -- transformers interop ------------------------------------------------------------------

    def to_hf_config(self, **extra: Any):
        """Return the equivalent ``transformers.LlamaConfig`` (``extra`` is passed through,
        e.g. ``bos_token_id``/``eos_token_id``)."""
        from transformers import LlamaConfig as HFLlamaConfig

        return HFLlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": float(self.rope_theta)},
            attention_bias=False,
            mlp_bias=False,
            **extra,
        )

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> LlamaConfig:
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
        return cls(
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


#: Named shapes. The paper's from-scratch shapes (Q-Sparse §4.1, DESIGN.md §1) are named by
#: their non-embedding size; "374M" is the GPU reference model (374M parameters incl. the tied
#: 32000-token embedding); "tiny" is for unit tests and "debug" for the CPU demo.
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


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """``y = w ⊙ x / sqrt(mean(x², -1) + eps)``, normalised in fp32 and cast back before the
    weight multiply (as HF's ``LlamaRMSNorm``). Input/output ``[..., d]``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Split the last dim in halves ``[x1, x2]`` and return ``[-x2, x1]`` (HF convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` [B, H, T, D] and ``k`` [B, H_kv, T, D] by position: ``x·cos + rot(x)·sin``.

    ``cos``/``sin`` are [B or 1, T, D] and broadcast over heads.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RotaryEmbedding(nn.Module):
    """Default RoPE tables. ``inv_freq[i] = theta^(-2i/D)``; for position p the angle vector is
    ``[p·inv_freq, p·inv_freq]`` (length D), returned as ``cos``/``sin`` [B, T, D].

    The frequencies are recomputed in fp32 on each call (D/2 numbers) rather than kept as a
    buffer, so casting the model to bf16 or initialising it on the meta device never degrades
    them.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        return 1.0 / (self.theta ** (exponents / self.head_dim))

    @torch.no_grad()
    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` [B or 1, T] -> (cos, sin), each [B or 1, T, D] in ``dtype``."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


class KVCache:
    """Preallocated key/value cache for generation, the one cache of every decode path.

    Per layer it holds ``k``/``v`` tensors [B, H_kv, max_len, D]. Two ways to track the
    write position:

    - ``static=False``: ``length`` (a Python int) positions are written; :meth:`update`
      returns the written prefix [B, H_kv, length + T, D] (shapes grow step by step).
    - ``static=True``: the position is the device tensor ``pos`` [1] and :meth:`update`
      returns the whole buffers [B, H_kv, max_len, D] (the caller masks keys past the
      query). Every step then has the same shapes and no host sync, so one captured CUDA
      graph (or one ``torch.compile`` graph) serves every position.

    :meth:`positions` gives the positions of the next T tokens, :meth:`advance` moves past
    them (``LlamaModel.forward`` calls both).
    """

    def __init__(
        self,
        config: LlamaConfig,
        batch_size: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        static: bool = False,
    ) -> None:
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)
        ]
        self.values = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)
        ]
        self.max_len = max_len
        self.length = 0
        self.static = static
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self._slots: torch.Tensor | None = None  # static: positions the current forward writes

    def reset(self) -> None:
        """Start over at position 0 (the buffers are kept; old entries are masked/overwritten)."""
        self.length = 0
        self.pos.zero_()

    def positions(self, t: int) -> torch.Tensor:
        """Positions [T] of the next ``t`` tokens (``pos + arange(t)`` when static)."""
        if self.static:
            self._slots = self.pos + torch.arange(t, device=self.pos.device)
            return self._slots
        return torch.arange(self.length, self.length + t, device=self.pos.device)

    def advance(self, t: int) -> None:
        """Mark ``t`` more positions as written."""
        if self.static:
            self.pos.add_(t)
        else:
            self.length += t

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` [B, H_kv, T, D] at the next T positions of layer ``layer_idx`` and
        return the cached keys/values: [B, H_kv, length+T, D], or the whole [B, H_kv, max_len,
        D] buffers when static (after :meth:`positions`)."""
        if self.static:
            if self._slots is None or self._slots.numel() != k.shape[2]:
                raise ValueError("KVCache(static=True): call positions(T) before update")
            self.keys[layer_idx].index_copy_(2, self._slots, k)
            self.values[layer_idx].index_copy_(2, self._slots, v)
            return self.keys[layer_idx], self.values[layer_idx]
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache overflow: {end} positions needed but max_len is {self.max_len}."
            )
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


def _attention_mask(
    q_len: int,
    past: int,
    key_padding: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, T, S] (True = attend) or None when ``is_causal`` suffices.

    Query i (absolute position past+i) sees key j iff ``j <= past + i`` and key j is not
    padding; every query always sees itself so no row is fully masked (padding positions get
    finite, ignored outputs instead of NaN).
    """
    if key_padding is None and past == 0:
        return None  # plain causal: SDPA's is_causal
    s = past + q_len
    q_pos = torch.arange(past, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
    if key_padding is not None:
        keep = key_padding[:, None, None, :s].bool()  # [B, 1, 1, S]
        mask = (mask & keep) | (k_pos == q_pos)[None, None]
    return mask


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE, via ``F.scaled_dot_product_attention``.

    ``q = x W_qᵀ`` [B, H, T, D], ``k, v = x W_{k,v}ᵀ`` [B, H_kv, T, D]; H/H_kv query heads
    share each key/value head; ``out = softmax(q kᵀ / sqrt(D) + mask) v`` then ``o_proj``.
    """

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``hidden_states`` [B, T, d] -> [B, T, d].

        ``attention_mask`` is a boolean [B or 1, 1, T, S] mask from ``_attention_mask`` (None =
        causal with no past); ``kv_cache`` appends this step's keys/values before attending.
        """
        q, k, v = self.project_qkv(hidden_states)
        out = self.attend(q, k, v, position_embeddings, attention_mask, kv_cache)
        return self.o_proj(out)

    def project_qkv(
        self, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, d] -> q [B, T, H·D], k and v [B, T, H_kv·D] (the decode engine fuses them)."""
        return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """RoPE, cache write and SDPA: q [B, T, H·D], k/v [B, T, H_kv·D] -> [B, T, H·D]
        (before ``o_proj``)."""
        b, t, _ = q.shape
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        gqa = self.num_kv_heads != self.num_heads
        if gqa and attention_mask is not None:
            # masked SDPA may fall back to kernels without GQA support: repeat each kv head for
            # its H/H_kv query heads explicitly (query head h uses kv head h // (H/H_kv))
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            gqa = False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_mask,
            is_causal=attention_mask is None and t > 1,
            enable_gqa=gqa,
        )
        return out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)


class LlamaMLP(GLUFeedForward):
    """GLU feed-forward ``down( act(x W_gateᵀ) ⊙ (x W_upᵀ) )``: [B, T, d] -> [B, T, d] via
    [B, T, F]; ``act_fn`` is ReLU² (Q-Sparse Eq. 11) or SiLU (SwiGLU), from ``qsparse.nn``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config.hidden_size, config.intermediate_size, config.hidden_act)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``; ``out = h + mlp(norm(h))``."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """[B, T, d] -> [B, T, d]."""
        h = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings,
            attention_mask=attention_mask,
            kv_cache=kv_cache,
        )
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """Embedding, decoder stack and final norm: ``input_ids`` [B, T] -> hidden [B, T, d]."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``input_ids`` [B, T]; ``attention_mask`` [B, S] with 1 = real token, 0 = padding
        (S = cached + T); ``position_ids`` [B or 1, T] default ``past + arange(T)``."""
        b, t = input_ids.shape
        if kv_cache is not None and kv_cache.static:
            return self._forward_static(input_ids, attention_mask, position_ids, kv_cache)
        past = kv_cache.length if kv_cache is not None else 0
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device)[None]
        key_padding = None
        if attention_mask is not None:
            if attention_mask.shape != (b, past + t):
                raise ValueError(
                    f"attention_mask must have shape [B, past+T] = {(b, past + t)}, "
                    f"got {tuple(attention_mask.shape)}."
                )
            if not bool(attention_mask.bool().all()):
                key_padding = attention_mask
        mask = _attention_mask(t, past, key_padding, input_ids.device)
        position_embeddings = self.rotary_emb(position_ids, x.dtype)
        return self._layers(x, position_embeddings, mask, kv_cache)

    def _forward_static(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """Forward over a ``static`` cache: positions and mask from the device position
        ``kv_cache.pos`` (no host sync), keys over the whole buffer [B, H_kv, max_len, D]."""
        if attention_mask is not None or position_ids is not None:
            raise ValueError("a static KVCache takes no attention_mask or position_ids")
        positions = kv_cache.positions(input_ids.shape[1])  # [T]
        keys = torch.arange(kv_cache.max_len, device=input_ids.device)
        mask = (keys[None, :] <= positions[:, None])[None, None]  # [1, 1, T, max_len]
        x = self.embed_tokens(input_ids)
        position_embeddings = self.rotary_emb(positions[None], x.dtype)
        return self._layers(x, position_embeddings, mask, kv_cache)

    def _layers(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        """Decoder stack and final norm: [B, T, d] -> [B, T, d]; advances ``kv_cache``."""
        for layer in self.layers:
            x = layer(x, position_embeddings, attention_mask=mask, kv_cache=kv_cache)
        if kv_cache is not None:
            kv_cache.advance(x.shape[1])
        return self.norm(x)


@dataclass
class CausalLMOutput:
    """``logits`` [B, T, V]; ``loss`` scalar mean next-token cross-entropy (None w/o labels)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class LlamaForCausalLM(nn.Module):
    """Llama decoder with an lm head; parameter names identical to HF ``LlamaForCausalLM``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    # -- init ---------------------------------------------------------------------------------

    def _init_weights(self, module: nn.Module) -> None:
        """Linear/Embedding weights ~ N(0, initializer_range²), biases 0, RMSNorm weights 1."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def tie_weights(self) -> None:
        """Share ``model.embed_tokens.weight`` with ``lm_head`` when ``tie_word_embeddings``."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_parameters(self) -> None:
        """(Re-)initialise every weight with ``_init_weights`` and re-tie the lm head."""
        self.apply(self._init_weights)
        self.tie_weights()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters of this module (tied weights counted once); with
        ``exclude_embeddings`` the embedding and lm-head matrices are left out."""
        skip: set[int] = set()
        if exclude_embeddings:
            skip = {id(self.model.embed_tokens.weight), id(self.lm_head.weight)}
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) in seen or id(p) in skip:
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> CausalLMOutput:
        """``input_ids`` [B, T] -> logits [B, T, V] and, given ``labels`` [B, T], the loss.

        HF semantics: labels are *unshifted* (the model predicts ``labels[:, t+1]`` from
        position t), ``-100`` marks positions without loss, and the loss is the mean
        cross-entropy over the remaining targets, computed in fp32.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}.")
        hidden = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            kv_cache=kv_cache,
        )
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(labels.shape)}."
                )
            targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutput(logits=logits, loss=loss)

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Autoregressively extend ``input_ids`` [B, T] to [B, T + n], n <= ``max_new_tokens``.

        ``temperature == 0`` is greedy (argmax); otherwise sample from
        ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits when given.
        Rows that produced ``eos_token_id`` keep emitting it; generation stops early once every
        row has. With the cache this is the project's one decoder,
        :class:`qsparse.generate.DecodeEngine`, over this model's own modules (no kernels, no
        CUDA graph; ``qsparse.generate.generate`` is the fast path). ``use_cache=False``
        recomputes the whole prefix at each step (reference path).
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [B, T], got {tuple(input_ids.shape)}.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}.")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}.")
        if top_k is not None and not (1 <= top_k <= self.config.vocab_size):
            raise ValueError(f"top_k must be in [1, vocab_size={self.config.vocab_size}].")
        b, t = input_ids.shape
        total = t + max_new_tokens
        if total > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt length {t} + max_new_tokens {max_new_tokens} exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}."
            )
        if max_new_tokens == 0:
            return input_ids
        from qsparse.generate import DecodeEngine, pick_next, stop_at_eos

        was_training = self.training
        self.eval()
        try:
            if use_cache:  # the project's one decode path, over this model's own modules
                engine = DecodeEngine(self, use_kernels=False, cuda_graph=False)
                res = engine.generate(
                    input_ids, max_new_tokens, temperature, top_k, eos_token_id, generator
                )
                return res.tokens
            out = input_ids
            finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
            for _ in range(max_new_tokens):
                nxt = pick_next(self(out).logits[:, -1].float(), temperature, top_k, generator)
                nxt, finished = stop_at_eos(nxt, finished, eos_token_id)
                out = torch.cat([out, nxt[:, None]], dim=1)
                if eos_token_id is not None and bool(finished.all()):
                    break
            return out
        finally:
            self.train(was_training)
