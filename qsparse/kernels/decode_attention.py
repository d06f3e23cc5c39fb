"""Attention of one new token over a static KV cache, RoPE and the cache write in the kernel.

Per decoder layer, a decode step of :class:`qsparse.generate.DecodeEngine` otherwise runs
RoPE on q and k, two cache writes (``index_copy_``), the attention mask and SDPA, each a
kernel of its own: about five launches of a few microseconds for a few kilobytes of work.
:func:`decode_attention` does it in one Triton kernel (two when the cache is long enough to be
split over programs), for ``T = 1`` new position ``p`` per batch row (the static cache's
device position, so one CUDA graph serves every step). Shapes: ``B`` batch, ``H``/``H_kv``
query/key heads (GQA: query head ``h`` reads kv head ``h // (H / H_kv)``), ``D`` head dim,
``L`` cache length, ``cos``/``sin`` [P >= L, D] the RoPE tables of every position (the static
cache's, read at row ``p``: no table is computed per step or per layer):

    q' = rope(q, p), k' = rope(k, p)         (HF rotate_half: x cos[p] + rotate_half(x) sin[p])
    K[:, :, p] = k', V[:, :, p] = v
    out_h = softmax(q'_h K_g[:p+1]ᵀ / sqrt(D)) V_g[:p+1]

Program ``(b, g, s)`` handles the ``H / H_kv`` query heads of kv head ``g`` over the keys of
split ``s`` (``L / SPLITS`` positions), with an online softmax in fp32; the key at ``p``
comes from registers (split 0 writes it to the cache, no program reads it back). With more
than one split a second kernel merges the partial sums (``exp(m_s - M)`` weights).

Reference: :func:`decode_attention_reference` (the model's own path: ``apply_rotary_pos_emb``,
``index_copy_``, masked SDPA); the kernel runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from ..models.attention import gqa_attention
from ..models.kv_cache import static_mask
from ..models.rope import apply_rotary_pos_emb
from . import kernels_available
from .gemv import chain_next

__all__ = ["decode_attention", "decode_attention_applies", "decode_attention_reference"]

#: positions one program of the split kernel covers at most (longer caches split further)
SPLIT_POSITIONS = 256
#: most splits of one (batch row, kv head)
MAX_SPLITS = 64
#: most query heads per kv head the kernel holds in registers
MAX_GROUP = 16
#: load each program's first block of cached keys and values before the step's position (the
#: same output bit for bit; off: after it, as the loop loads the later blocks). Off: on one
#: H100 (2026-12-06) the 7B step ran 1.010x (Q-Sparse) and 1.011x (BitNet b1.58) faster
#: without it, and the kernel alone took 6.9 instead of 8.0 us at 40 cached positions
#: (``benchmarks/decode_attention_kernel.py``; at the 1.3B shape it was 1.06-1.08x faster alone)
PRELOAD_FIRST_BLOCK = False


def _dims(q: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int, int, int, int]:
    b, h_kv, length, d = k_cache.shape
    return b, q.shape[1] // d, h_kv, length, d


def decode_attention_applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """True when :func:`decode_attention` runs its kernel for ``q`` [B, H·D] and a cache
    [B, H_kv, L, D] (else it runs the reference): kernels available on ``q``'s device, bf16 or
    fp32, an even D, H a multiple of H_kv with at most :data:`MAX_GROUP` query heads each."""
    b, h, h_kv, _, d = _dims(q, k_cache)
    return (
        kernels_available(q)
        and q.dtype in (torch.bfloat16, torch.float32)
        and d % 2 == 0
        and h % h_kv == 0
        and h // h_kv <= MAX_GROUP
        and q.shape[0] == b
    )


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
) -> torch.Tensor:
    """The model's path, op for op (:meth:`qsparse.models.llama.LlamaAttention.attend` over a
    static cache): q [B, H·D], k/v [B, H_kv·D], cos/sin [P >= L, D] RoPE tables of positions
    0..P-1 (row ``pos`` is used), caches [B, H_kv, L, D] (written at ``pos``), pos int64 [1]
    -> [B, H·D]."""
    b, h, h_kv, length, d = _dims(q, k_cache)
    qh = q.view(b, 1, h, d).transpose(1, 2)
    kh = k.view(b, 1, h_kv, d).transpose(1, 2)
    vh = v.view(b, 1, h_kv, d).transpose(1, 2)
    qh, kh = apply_rotary_pos_emb(qh, kh, cos[pos][:, None], sin[pos][:, None])
    k_cache.index_copy_(2, pos, kh)
    v_cache.index_copy_(2, pos, vh)
    out = gqa_attention(qh, k_cache, v_cache, static_mask(pos, length))
    return out.transpose(1, 2).reshape(b, h * d)


def _splits(length: int) -> int:
    n = 1
    while n < MAX_SPLITS and n * SPLIT_POSITIONS < length:
        n *= 2
    return n


@torch.library.custom_op("qsparse::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
) -> torch.Tensor:
    """The launch behind :func:`decode_attention` (validated, contiguous arguments)."""
    if not decode_attention_applies(q, k_cache):
        return decode_attention_reference(q, k, v, cos, sin, k_cache, v_cache, pos)
    import triton

    from ._attention_triton import _combine_splits_kernel, _decode_attention_kernel

    b, h, h_kv, length, d = _dims(q, k_cache)
    rep = h // h_kv
    splits = _splits(length)
    chunk = -(-length // splits)
    rep_p = triton.next_power_of_2(rep)
    half_p = triton.next_power_of_2(d // 2)
    block_n = max(16, min(64, 4096 // (rep_p * half_p)))
    out = torch.empty_like(q)
    nxt = chain_next(q)  # the o site's selection may launch as this kernel's dependent
    if splits == 1:
        part, m, lse = out, out, out  # m/l unused with one split
    else:
        part = torch.empty((b, h, splits, d), device=q.device, dtype=torch.float32)
        m = torch.empty((b, h, splits), device=q.device, dtype=torch.float32)
        lse = torch.empty_like(m)
    _decode_attention_kernel[(b * h_kv, splits)](
        q, k, v, cos, sin, k_cache, v_cache, pos, part, m, lse,
        h_kv, rep, length, chunk, d // 2, d ** -0.5,
        SPLITS=splits, REP_P=rep_p, HALF=half_p, BLOCK_N=block_n,
        BF16=q.dtype == torch.bfloat16, NEXT=nxt and splits == 1,
        PRELOAD=PRELOAD_FIRST_BLOCK, num_warps=4,
    )  # fmt: skip
    if splits > 1:
        _combine_splits_kernel[(b * h,)](
            part, m, lse, out, d, SPLITS=splits, D_P=triton.next_power_of_2(d), NEXT=nxt,
            num_warps=4,
        )  # fmt: skip
    return out


@decode_attention_op.register_fake
def _decode_attention_fake(q, k, v, cos, sin, k_cache, v_cache, pos):
    return torch.empty_like(q)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
) -> torch.Tensor:
    """Attention output [B, H·D] of one new token per batch row (module docstring).

    Args:
        q: [B, H·D] queries before RoPE; ``k``, ``v``: [B, H_kv·D] this step's keys (before
            RoPE) and values; all of the caches' dtype.
        cos, sin: [P, D] RoPE tables of positions 0..P-1, P >= L (a static
            :class:`~qsparse.models.kv_cache.KVCache`'s ``rope``; row ``pos`` is read, so one
            table serves every layer and step).
        k_cache, v_cache: [B, H_kv, L, D] contiguous caches, written at ``pos``.
        pos: int64 [1] on the caches' device, ``0 <= pos < L`` (not checked: no host sync).

    Raises:
        ValueError: shapes or dtypes that do not fit together.
    """
    b, h_kv, length, d = k_cache.shape
    if q.dim() != 2 or q.shape[0] != b or q.shape[1] % d:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} for a cache {tuple(k_cache.shape)}")
    if k.shape != (b, h_kv * d) or v.shape != k.shape or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"decode_attention: k {tuple(k.shape)}, v {tuple(v.shape)} and v_cache "
            f"{tuple(v_cache.shape)} must be [{b}, {h_kv * d}] and {tuple(k_cache.shape)}"
        )
    if cos.dim() != 2 or cos.shape[1] != d or cos.shape[0] < length or sin.shape != cos.shape:
        raise ValueError(
            f"decode_attention: cos/sin must be RoPE tables [P >= {length}, {d}] (a position "
            f"per row), got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if pos.shape != (1,) or pos.dtype != torch.long:
        raise ValueError("decode_attention: pos must be an int64 tensor of shape [1]")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("decode_attention: the caches must be contiguous")
    dtype = k_cache.dtype
    return decode_attention_op(
        q.to(dtype).contiguous(),
        k.to(dtype).contiguous(),
        v.to(dtype).contiguous(),
        cos.to(dtype).contiguous(),
        sin.to(dtype).contiguous(),
        k_cache,
        v_cache,
        pos,
    )
