"""A readable Llama-style decoder whose parameter names match Hugging Face's ``LlamaForCausalLM``.

The model is written in the nanoGPT / litgpt spirit: plain PyTorch, no training concerns. Its
numerics follow ``transformers``' Llama exactly (RMSNorm computed in fp32, RoPE with the
``rotate_half`` convention and the default frequency schedule, HF's shifted-label loss) so
that an HF state dict loads with ``load_state_dict(strict=True)`` and produces the same
logits. Its configuration is :class:`~qsparse.models.config.LlamaConfig` (presets in
:mod:`~qsparse.models.presets`, HF mapping in :mod:`~qsparse.models.hf_config`), RoPE is in
:mod:`~qsparse.models.rope` and the KV cache in :mod:`~qsparse.models.kv_cache`.

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qsparse.nn import GLUFeedForward

from .attention import gqa_attention
from .config import LlamaConfig
from .kv_cache import KVCache, causal_mask, static_mask
from .rope import RotaryEmbedding, apply_rotary_pos_emb

__all__ = [
    "CausalLMOutput",
    "LlamaAttention",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaMLP",
    "LlamaModel",
    "RMSNorm",
]


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


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE, via SDPA (:func:`.attention.gqa_attention`).

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

        ``attention_mask`` is a boolean [B or 1, 1, T, S] mask from
        :func:`~qsparse.models.kv_cache.causal_mask` (None = causal with no past);
        ``kv_cache`` appends this step's keys/values before attending.
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
        out = gqa_attention(q, k, v, attention_mask)
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
        mask = causal_mask(t, past, key_padding, input_ids.device)
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
        ``kv_cache.pos`` (no host sync), RoPE tables read from the cache's
        (:meth:`KVCache.rope_at`), keys over the whole buffer [B, H_kv, max_len, D]."""
        if attention_mask is not None or position_ids is not None:
            raise ValueError("a static KVCache takes no attention_mask or position_ids")
        positions = kv_cache.positions(input_ids.shape[1])  # [T]
        mask = static_mask(positions, kv_cache.max_len)  # [1, 1, T, max_len]
        x = self.embed_tokens(input_ids)
        position_embeddings = kv_cache.rope_at(positions, x.dtype)
        if position_embeddings is None:
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
        x = self._stack(x, position_embeddings, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(x.shape[1])
        return self.norm(x)

    def _stack(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        """The decoder layers in turn: [B, T, d] -> the residual stream [B, T, d] before the
        final norm."""
        for layer in self.layers:
            x = layer(x, position_embeddings, attention_mask=mask, kv_cache=kv_cache)
        return x


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
        from qsparse.generate import generate_tokens  # generate imports this module

        return generate_tokens(
            self, input_ids, max_new_tokens, temperature, top_k, eos_token_id, use_cache, generator
        )
