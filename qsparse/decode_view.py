"""The model as the decoder runs it: projections that share an input site fused, on kernels.

With ``use_kernels`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) the engine decodes through a
view of the model whose attention and MLP modules fuse the projections that share an input
sparsifier (q|k|v, gate|up) into one :class:`_Projection`, which is, per site:

- dense float weights: ``F.linear`` on the concatenated weight (one cuBLAS GEMV);
- top-k sparse input, float weights: :func:`qsparse.kernels.gemv.sparse_gemv` (reads only the
  kept weight rows; the top-k selection runs inside, starting from the threshold the site
  found at the previous step: one radix pass instead of three when it moved little) at
  batch 1; at batch 2-16 :func:`~qsparse.kernels.gemv.masked_topk` (also from the carried
  thresholds), then one GEMM on the fused weight. The selection kernels of q|k|v and
  gate|up compute the layer's RMSNorm themselves (:class:`~qsparse.kernels.gemv.Producer`;
  the layer then skips its own norm);
- ternary weights (BitNet b1.58, int8 absmax activations), optionally top-k sparse:
  :func:`qsparse.kernels.gemv.ternary_gemv` on 2-bit weights packed along K, up to 16 tokens
  (a site whose ``QuantConfig.eps`` is not the kernels' :data:`~qsparse.kernels.gemv.ACT_EPS`
  runs the reference path). Its activation kernel computes the site input from the raw one:
  the layer's RMSNorm in front of q|k|v and gate|up (the layer then skips its own) and the
  site's SubLN (:class:`~qsparse.kernels.gemv.SubLN`), so neither norm runs as a kernel of
  its own.
  With :data:`TERNARY_ROWS` on, a top-k ternary site (BitNet + Q-Sparse) also keeps its codes
  packed along N (:func:`qsparse.kernels.ternary_rows.pack_ternary_rows`; both layouts, 2/8 of
  the bf16 bytes together) and decodes one token with
  :func:`~qsparse.kernels.ternary_rows.ternary_rows_gemv`, which reads only the kept inputs'
  rows and computes the layer's RMSNorm in its selection kernel, as the sparse site does.

- a fixed per-site threshold (``pattern="threshold"``: TEAL, ``sparsity=threshold`` training),
  float weights, no SubLN or activation quantization:
  :func:`qsparse.kernels.threshold_gemv.threshold_gemv` (one compare-and-list program, which
  computes the layer's RMSNorm in front of q|k|v and gate|up as the top-k selection does, then
  the list GEMV, at batch 1; the masked input through one GEMM at batch 2-16), with the site's
  threshold rounded to the activation dtype as its module compares.

Between the sites, a decode position over the static cache (T = 1, any batch) runs its
attention in one kernel where kernels run (:data:`FUSED_ATTENTION`):
:func:`qsparse.kernels.decode_attention.decode_attention` rotates q and k, writes k and v to
the cache and attends over the positions written so far; the prompt and anything else run the
model's :meth:`~qsparse.models.llama.LlamaAttention.attend`.

Elsewhere (no kernels, prompt prefill, batch sizes or settings the kernels do not cover) a site
runs the model's own sparsifier and linear modules. Without kernels on a qsparse model the view
is the model itself.

``head_bits=8`` (opt-in) replaces the lm head by :class:`Int8Head`: per-row symmetric int8
weights quantized once here (:func:`qsparse.kernels.int8_gemv.quantize_int8_rows`), logits by
:func:`qsparse.kernels.int8_gemv.int8_gemv` (the Triton GEMV at 1-16 tokens where kernels run,
else its fp32 PyTorch reference, which is also what runs without kernels).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .env_flags import check_env_flags, flag_at_import
from .kernels import decode_attention as DA
from .kernels import gemv as G
from .kernels import int8_gemv as I8
from .kernels import kernels_available
from .kernels import ternary_rows as TR
from .kernels import threshold_gemv as TG
from .models.config import LlamaConfig
from .models.hf_config import from_hf_config
from .models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    RMSNorm,
)
from .nn.ffn import ReLUSquared

__all__ = [
    "FUSED_ATTENTION",
    "GLU_IN_SELECTION",
    "GLU_SITE_MODES",
    "HEAD_BITS",
    "RESIDUAL_SUM",
    "SPARSE_MAX_ROWS",
    "TERNARY_MAX_ROWS",
    "TERNARY_ROWS",
    "Int8Head",
    "check_environment",
    "check_head_bits",
    "decoder_view",
]

#: most tokens per call for the sparse-input GEMV (beyond: top-k, then a dense GEMM; the
#: union of kept rows of 2+ tokens is most of W) and for the ternary GEMV
SPARSE_MAX_ROWS = 1
TERNARY_MAX_ROWS = 16
#: batch-1 BitNet + Q-Sparse sites decode on the input-major sparse ternary GEMV
#: (:mod:`qsparse.kernels.ternary_rows`); off until measured end to end on an H200.
#: ``QSPARSE_TERNARY_ROWS=1`` in the environment (read at import) or setting this before
#: :func:`decoder_view` turns it on
TERNARY_ROWS: bool = flag_at_import("QSPARSE_TERNARY_ROWS", False)
#: decode positions over a static cache run :func:`qsparse.kernels.decode_attention.decode_attention`
#: (RoPE, cache write and attention in one kernel) where kernels run; ``QSPARSE_FUSED_ATTENTION=0``
#: in the environment (read at import) or setting this to False before :func:`decoder_view`
#: keeps the model's own path (RoPE, ``index_copy_``, SDPA), e.g. to measure the difference
FUSED_ATTENTION: bool = flag_at_import("QSPARSE_FUSED_ATTENTION", True)
#: a sparse or ternary site that computes its layer's RMSNorm also forms the residual sum in
#: front of it (:meth:`_Projection.sums_residual`); ``QSPARSE_RESIDUAL_SUM=0`` in the
#: environment (read at import) or setting this to False before a step is traced adds in
#: PyTorch instead (an add kernel a site), e.g. to measure the difference
RESIDUAL_SUM: bool = flag_at_import("QSPARSE_RESIDUAL_SUM", True)
#: the site modes whose first kernel can compute the GLU in front of a down site
GLU_SITE_MODES = ("sparse", "threshold", "ternary")
_GLU_SELECTION_ENV = {"0": (), "ternary": ("ternary",), "1": GLU_SITE_MODES}
_GLU_SELECTION_DEFAULT = "ternary"


def _glu_in_selection_from_env(value: str) -> tuple[str, ...]:
    """The site modes of ``QSPARSE_GLU_SELECTION=value``, else ValueError naming the forms."""
    if value not in _GLU_SELECTION_ENV:
        raise ValueError(
            f"QSPARSE_GLU_SELECTION={value!r}: use 0 (no site), ternary (the default) or 1 "
            "(every site that can)"
        )
    return _GLU_SELECTION_ENV[value]


def check_environment() -> None:
    """ValueError naming the variable and its forms when a ``QSPARSE_*`` decode setting in the
    environment has a value this module does not know: ``QSPARSE_GLU_SELECTION``, and every
    on/off setting read at import (:func:`qsparse.env_flags.check_env_flags`: 1 or 0). Called
    when :func:`decoder_view` builds a view, so that a bad value stops a run with one line
    instead of failing ``import``."""
    _glu_in_selection_from_env(os.environ.get("QSPARSE_GLU_SELECTION", _GLU_SELECTION_DEFAULT))
    check_env_flags()


#: the down sites whose first kernel (top-k selection, fixed-threshold list, ternary
#: activation kernel) computes the GLU ``act(g) * u`` from the gate|up output itself, so the
#: GLU runs as no kernel of its own, by site mode (a subset of :data:`GLU_SITE_MODES`). The
#: ternary sites only by default: 7B, batch 1, on an H100 (2026-12-05, three runs each) it
#: gave BitNet + Q-Sparse 1.009-1.015x and BitNet 1.004-1.005x, but Q-Sparse 0.999x (0.971x
#: in a run with the PDL chain on), where the selection's one program recomputes the GLU of
#: the whole row (docs/decode.md). ``QSPARSE_GLU_SELECTION`` in the environment (read at
#: import: ``0``, ``ternary`` or ``1``) or setting this before :func:`decoder_view` changes it.
GLU_IN_SELECTION: tuple[str, ...] = _GLU_SELECTION_ENV.get(
    os.environ.get("QSPARSE_GLU_SELECTION", _GLU_SELECTION_DEFAULT),
    _GLU_SELECTION_ENV[_GLU_SELECTION_DEFAULT],  # an unknown value: check_environment() says so
)

#: the values ``head_bits`` takes: None (the model's own lm head) or 8 (:class:`Int8Head`)
HEAD_BITS = (None, 8)


def check_head_bits(head_bits: object, name: str = "head_bits") -> int | None:
    """``head_bits`` if it is one of :data:`HEAD_BITS`, else ``ValueError`` naming ``name``."""
    if head_bits is None or (type(head_bits) is int and head_bits in HEAD_BITS):
        return head_bits
    raise ValueError(
        f"{name}={head_bits!r} is not supported: use 8 (int8 weight-only lm head) "
        "or leave it unset (None: the model's own lm head)"
    )


class Int8Head(nn.Module):
    """Weight-only int8 lm head: ``logits[..., v] = scale[v] * sum_d h[..., d] * q[v, d]``.

    ``q`` int8 [V, D] (row-major) and ``scale`` fp32 [V] are quantized once from ``weight``
    [V, D] (:func:`~qsparse.kernels.int8_gemv.quantize_int8_rows`: ``scale = max|W[v]| / 127``,
    round to nearest); ``h`` [..., D] -> [..., V] in h's dtype, fp32 sums. Up to
    :data:`~qsparse.kernels.int8_gemv.MAX_ROWS` tokens on the Triton kernel where kernels run,
    otherwise (no kernels, prompt prefill) :func:`~qsparse.kernels.int8_gemv.int8_gemv_reference`.
    Holds V * D bytes beside the model's own head (a tied embedding keeps its weight)."""

    def __init__(self, weight: torch.Tensor, use_kernels: bool = True):
        super().__init__()
        q, scale = I8.quantize_int8_rows(weight)
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.use_kernels = use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_kernels:
            return I8.int8_gemv_reference(x, self.q, self.scale)
        # int8_gemv itself falls back to the reference past MAX_ROWS or without kernels
        y = I8.int8_gemv(x.reshape(-1, x.shape[-1]), self.q, self.scale)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _fused_weight(linears: list[nn.Module]) -> torch.Tensor:
    """The weights of the linears sharing one input site, stacked along the output axis
    ([sum(N_i), K], detached)."""
    return torch.cat([lin.weight.detach() for lin in linears], 0)


class _Projection(nn.Module):
    """One input site (optional sparsifier) feeding one or more linear layers, fused.

    ``x`` [..., K] -> [..., sum(N_i)]. ``site``: the ActivationSparsifier of the input (or
    None); ``shared``: it belongs to the parent module (q|k|v, gate|up) rather than to the one
    linear's own ``act`` (o, down), so the reference path applies it once before the linears.
    """

    def __init__(
        self, site: nn.Module | None, linears: list[nn.Module], shared: bool, use_kernels: bool
    ):
        super().__init__()
        self.site = site
        self.shared = shared
        self.linears = nn.ModuleList(linears)
        self.sizes = [lin.out_features for lin in linears]
        if any(getattr(lin, "bias", None) is not None for lin in linears):
            raise ValueError("qsparse.generate supports bias-free projections only")
        quant = [getattr(lin, "weight_quant", "none") for lin in linears]
        if len(set(quant)) != 1:
            raise ValueError(f"projections sharing one input mix weight quantization {quant}")
        self.k = site.keep() if site is not None else None
        self.act_bits = getattr(site, "act_bits", None) if site is not None else None
        pattern = getattr(site, "pattern", "token_topk") if site is not None else "token_topk"
        rescale = bool(getattr(site, "rescale", False)) if site is not None else False
        norm = getattr(site, "norm", None) if site is not None else None
        self.mode = "reference"
        self.rows = False  # batch 1 on the input-major ternary layout (TERNARY_ROWS)
        self.pre: nn.Module | None = None  # producer module fused into the selection
        self.producer = G.NO_PRODUCER
        self.subln: G.SubLN | None = None  # the site's SubLN, computed by the ternary kernel
        threshold = pattern == "threshold" and quant[0] == "none" and self.act_bits is None
        if use_kernels and threshold and norm is None and not rescale:
            # a fixed per-site threshold (TEAL, CATS's sites, sparsity=threshold training)
            weight = _fused_weight(linears)
            self.register_buffer("wt", G.prepare_dense(weight), persistent=False)
            kept = max(1, round((1 - float(site.ratio)) * weight.shape[1]))
            self.threshold_cfg = G.sparse_config_for_weights(self.wt, kept)
            self.mode = "threshold"
            return
        if not use_kernels or pattern != "token_topk" or rescale:
            return
        dev = linears[0].weight.device
        with torch.no_grad():
            if quant[0] == "ternary":
                # the kernels' int8 activation codes floor gamma at their own constant
                eps_ok = getattr(site, "eps", G.ACT_EPS) == G.ACT_EPS
                if self.act_bits is not None and 2 <= self.act_bits <= 8 and eps_ok:
                    self._prepare_ternary(linears)
                    self.mode = "ternary"
                    self.register_buffer("hint", G.new_hint(16, dev), persistent=False)
                    weight = getattr(norm, "weight", None)
                    if (
                        isinstance(norm, nn.RMSNorm)
                        and isinstance(norm.eps, float)
                        and weight is not None
                    ):
                        self.subln = G.SubLN(weight, norm.eps)
            elif self.act_bits is None and self.k is not None:
                weight = _fused_weight(linears)
                self.register_buffer("wt", G.prepare_dense(weight), persistent=False)
                self.register_buffer("hint", G.new_hint(16, dev), persistent=False)
                self.mode = "sparse"
            elif self.k is None and self.act_bits is None and norm is None:
                weight = _fused_weight(linears)
                self.register_buffer("weight", weight, persistent=False)
                self.mode = "dense"  # the site is a no-op: one cuBLAS GEMV

    def _prepare_ternary(self, linears: list[nn.Module]) -> None:
        from .nn.quant import ternary_scale

        codes, alphas = [], []
        for lin in linears:
            a = ternary_scale(lin.weight, lin.eps)
            codes.append((lin.weight.detach().float() / a).round().clamp(-1, 1).to(torch.int8))
            alphas.append(torch.full((lin.out_features,), float(a), device=lin.weight.device))
        # outputs padded with zero weights to a multiple of 64: an aligned row stride keeps the
        # kernel's loads vectorized (sliced off again in forward)
        pad = -sum(self.sizes) % 64
        codes.append(codes[0].new_zeros(pad, codes[0].shape[1]))
        alphas.append(alphas[0].new_zeros(pad))
        codes = torch.cat(codes, 0)
        self.register_buffer("packed", G.pack_ternary(codes), persistent=False)
        self.register_buffer("alpha", torch.cat(alphas).float(), persistent=False)
        if TERNARY_ROWS and self.k is not None and self.k < codes.shape[1] <= TR.MAX_IN:
            rows = TR.pack_ternary_rows(codes)  # outputs padded to a multiple of 256
            alpha = self.alpha.new_zeros(16 * rows.shape[1])
            alpha[: self.alpha.numel()] = self.alpha
            self.register_buffer("packed_rows", rows, persistent=False)
            self.register_buffer("alpha_rows", alpha, persistent=False)
            self.rows = True

    def _computes_producer(self, rows_layout: bool = True) -> bool:
        """Whether this site's first kernel can compute its producer: the sparse selection,
        the fixed-threshold list, or the ternary activation kernel (followed there by the
        site's SubLN, which that kernel then computes too; on the input-major layout
        (``rows_layout``) only without SubLN)."""
        ternary = self.mode == "ternary" and not self.rows
        if not (self.mode in ("sparse", "threshold") or (self.rows and rows_layout) or ternary):
            return False
        return self.site.norm is None or (ternary and self.subln is not None)

    def fuse_producer(self, norm: nn.Module) -> bool:
        """Take over the layer's RMSNorm in front of this site when the site's first kernel can
        compute it (:class:`~qsparse.kernels.gemv.Producer`, :meth:`_computes_producer`).
        True when taken: the caller must then hand this site the norm's input instead of its
        output."""
        if not self._computes_producer():
            return False
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
        if not isinstance(norm, RMSNorm) and type(norm).__name__ != "LlamaRMSNorm":
            return False
        if not isinstance(eps, float):
            return False
        self.producer = G.Producer("rmsnorm", norm.weight, eps)
        self.pre = norm
        return True

    def fuse_glu(self, act_fn: nn.Module) -> bool:
        """Take over the GLU in front of this (down) site, ``act(g) * u`` of the gate|up
        output ``[g | u]``, when :data:`GLU_IN_SELECTION` names this site's mode, the
        activation is ReLU^2 or SiLU and the site's first kernel can compute it (not on the
        input-major ternary layout). True when taken: the caller must then hand this site
        ``[g | u]``."""
        kind = {ReLUSquared: "relu2_glu", nn.SiLU: "silu_glu"}.get(type(act_fn))
        if self.mode not in GLU_IN_SELECTION or kind is None or not self._computes_producer(False):
            return False
        self.producer = G.Producer(kind)
        self.pre = _GLU(act_fn)
        return True

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        """The site input from what its producer reads, with the model's own module."""
        return x if self.pre is None else self.pre(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own modules: shared sparsifier, then each linear (with its own act)."""
        x = self._pre(x)
        if self.shared and self.site is not None:
            x = self.site(x)
        outs = [lin(x) for lin in self.linears]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def sums_residual(self, x: torch.Tensor) -> bool:
        """Whether this site's first kernel forms the residual sum ``x + d`` itself for
        ``x`` (:meth:`forward` with ``residual``): a site that computes its layer's RMSNorm
        (:meth:`fuse_producer`), batch 1 for the top-k selection, up to
        :data:`TERNARY_MAX_ROWS` rows for the ternary activation kernel."""
        if not RESIDUAL_SUM or self.producer.kind != "rmsnorm" or not kernels_available(x):
            return False
        rows = x.numel() // x.shape[-1]
        if self.mode == "sparse":
            return rows <= SPARSE_MAX_ROWS
        return self.mode == "ternary" and not self.rows and rows <= TERNARY_MAX_ROWS

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x`` [..., K] -> [..., sum(N_i)]. ``residual`` (a site that computes its layer's
        norm, :meth:`fuse_producer`): ``d`` [..., K], the site reads ``h = x + d`` (the
        layer's residual add, rounded as torch rounds it) and returns ``(y, h)``; the
        selection / activation kernel forms h where :meth:`sums_residual`, so the add runs as
        no kernel of its own."""
        if residual is not None and not self.sums_residual(x):
            h = x + residual
            return self.forward(h), h
        if self.mode == "dense":
            return F.linear(x, self.weight)
        rows = x.numel() // x.shape[-1]
        if self.mode == "reference" or rows > TERNARY_MAX_ROWS or not kernels_available(x):
            return self.reference(x)
        lead, x2, n = x.shape[:-1], x.reshape(rows, x.shape[-1]), sum(self.sizes)
        # with a residual, sums_residual held: the sparse batch-1 or the ternary branch below
        d2 = residual.reshape(rows, x.shape[-1]) if residual is not None else None
        if self.rows and rows == 1:
            # one token, input-major ternary layout: the list kernel computes the RMSNorm
            if self.site.norm is not None:
                x2 = self.site.norm(x2)
            y = TR.ternary_rows_gemv(
                x2,
                self.packed_rows,
                self.alpha_rows,
                self.k,
                self.act_bits,
                hint=self.hint,
                producer=self.producer,
                n_out=n,
            )
            return y.reshape(*lead, n)
        if self.mode == "ternary" and not self.rows:
            # the activation kernel computes the layer's norm (producer) and the SubLN itself
            if self.site.norm is not None and self.subln is None:
                x2 = self.site.norm(x2)
            y = G.ternary_gemv(
                x2,
                self.packed,
                self.alpha,
                self.k,
                self.act_bits,
                hint=self.hint,
                producer=self.producer,
                subln=self.subln,
                residual=d2,
            )
            return _shaped(y, lead, n, x)
        if self.mode not in ("sparse", "threshold"):
            x2 = self._pre(x2)
        if self.mode == "threshold":
            # the site's own compare, |x| > t with t in x's dtype, then the list GEMV (batch 1;
            # the list kernel computes the layer's norm, the producer) or the masked input
            # through one GEMM
            t = self.site.threshold.to(x2.dtype)
            y = TG.threshold_gemv(
                x2, self.wt, t, self.threshold_cfg, n_out=n, producer=self.producer
            )
            return y.reshape(*lead, n)
        if self.site.norm is not None:
            x2 = self.site.norm(x2)
        if self.mode == "sparse" and rows > SPARSE_MAX_ROWS:
            # the kept rows of several tokens cover most of W: top-k (one program per row,
            # from the carried thresholds, computing the site input from its producer's),
            # then one dense GEMM on the fused weight
            xs = G.masked_topk(x2, self.k, self.hint, producer=self.producer)
            return (xs @ self.wt)[:, :n].reshape(*lead, n)
        if self.mode == "sparse":
            y = G.sparse_gemv(
                x2, self.wt, self.k, n_out=n, hint=self.hint, producer=self.producer,
                residual=d2,
            )  # fmt: skip
        else:
            y = G.ternary_gemv(x2, self.packed, self.alpha, self.k, self.act_bits, hint=self.hint)
        return _shaped(y, lead, n, x)


def _shaped(
    y: torch.Tensor | tuple[torch.Tensor, torch.Tensor], lead: torch.Size, n: int, x: torch.Tensor
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A fused site's kernel output [rows, >= n] -> [*lead, n]; a pair ``(y, h)`` (called with
    a residual) -> ``(y shaped so, h shaped as x)``."""
    if isinstance(y, tuple):
        return y[0][:, :n].reshape(*lead, n), y[1].reshape(x.shape)
    return y[:, :n].reshape(*lead, n)


class _FusedAttention(LlamaAttention):
    """:class:`LlamaAttention` (same ``forward``/``attend``) whose q|k|v and o projections are
    :class:`_Projection` sites over another attention module's layers."""

    def __init__(self, attn: nn.Module, config: LlamaConfig, layer_idx: int, kernels: bool):
        nn.Module.__init__(self)  # no weights of its own: it reads ``attn``'s
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.fused = kernels and FUSED_ATTENTION  # decode positions on the attention kernel
        site = getattr(attn, "qsparse_input", None)
        lins = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.qkv = _Projection(site, lins, True, kernels)
        o_site = getattr(attn.o_proj, "act", None)
        self.o_proj = _Projection(o_site, [attn.o_proj], False, kernels)

    def project_qkv(self, hidden_states):
        return tuple(self.qkv(hidden_states).split(self.qkv.sizes, dim=-1))

    def attend(self, q, k, v, position_embeddings, attention_mask=None, kv_cache=None):
        """One decode position over a static cache with kernels (and :data:`FUSED_ATTENTION`):
        :func:`qsparse.kernels.decode_attention.decode_attention` (RoPE from the cache's
        tables, cache write and attention in one kernel); otherwise
        :meth:`LlamaAttention.attend`."""
        if self.fused and kv_cache is not None and kv_cache.static and q.shape[1] == 1:
            k_cache, v_cache = kv_cache.keys[self.layer_idx], kv_cache.values[self.layer_idx]
            rope = kv_cache.rope  # [max_len, D] tables, read by the kernel at the position
            if (
                rope is not None
                and rope[0].dtype == q.dtype
                and DA.decode_attention_applies(q[:, 0], k_cache)
            ):
                out = DA.decode_attention(
                    q[:, 0], k[:, 0], v[:, 0], rope[0], rope[1], k_cache, v_cache,
                    kv_cache.slots(1),
                )  # fmt: skip
                return out[:, None]
        return super().attend(q, k, v, position_embeddings, attention_mask, kv_cache)


class _FusedMLP(LlamaMLP):
    """:class:`LlamaMLP` (same ``forward``) whose gate|up and down projections are
    :class:`_Projection` sites over another GLU module's layers."""

    def __init__(self, mlp: nn.Module, kernels: bool):
        nn.Module.__init__(self)
        site = getattr(mlp, "qsparse_input", None)
        self.gate_up = _Projection(site, [mlp.gate_proj, mlp.up_proj], True, kernels)
        down_site = getattr(mlp.down_proj, "act", None)
        self.down_proj = _Projection(down_site, [mlp.down_proj], False, kernels)
        self.act_fn = mlp.act_fn

        self.down_proj.fuse_glu(self.act_fn)

    def project_gate_up(self, x):
        return tuple(self.gate_up(x).split(self.gate_up.sizes, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The down site of the gate|up output ``[g | u]``: ``down(act(g) * u)``, the GLU
        computed by the down site's first kernel where it took it over
        (:meth:`_Projection.fuse_glu`)."""
        if self.down_proj.pre is not None:
            return self.down_proj(gate_up)
        gate, up = gate_up.split(self.gate_up.sizes, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class _GLU(nn.Module):
    """``[g | u]`` [..., 2F] -> ``act(g) * u`` [..., F]: the model's GLU arithmetic on a fused
    gate|up output (the reference of a down site that computes it, :meth:`_Projection.fuse_glu`)."""

    def __init__(self, act_fn: nn.Module) -> None:
        super().__init__()
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def _site_sum(
    site: _Projection, norm: nn.Module, x: torch.Tensor, delta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(site output, h): the block input ``h = x + delta`` (``x`` alone when ``delta`` is
    None) through the layer's ``norm`` into ``site``. A site that computes the norm itself
    (``norm`` is then an Identity) also forms the sum (:meth:`_Projection.forward`)."""
    if delta is None:
        return site(norm(x)), x
    if site.pre is not None:
        return site(x, residual=delta)
    h = x + delta
    return site(norm(h)), h


class _DecodeLayer(LlamaDecoderLayer):
    """:class:`LlamaDecoderLayer` over :class:`_FusedAttention` / :class:`_FusedMLP` whose
    residual adds are left to the site after them: :meth:`forward_sum` takes the residual
    stream ``x`` and the previous block's output ``delta`` and returns the same pair one layer
    on, ``h = x + delta``, ``h' = h + attn(norm(h))`` and ``(h', mlp(norm(h')))`` (the
    arithmetic of :meth:`LlamaDecoderLayer.forward`, additions in the same order), so a sparse
    or ternary site forms each sum in its first kernel instead of an add kernel of its own."""

    def forward_sum(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        kv_cache=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, delta [B, T, d] (delta None: nothing pending) -> (h', mlp output) [B, T, d]."""
        attn, mlp = self.self_attn, self.mlp
        qkv, h = _site_sum(attn.qkv, self.input_layernorm, x, delta)
        q, k, v = qkv.split(attn.qkv.sizes, dim=-1)
        out = attn.o_proj(attn.attend(q, k, v, position_embeddings, attention_mask, kv_cache))
        gate_up, h = _site_sum(mlp.gate_up, self.post_attention_layernorm, h, out)
        return h, mlp.down(gate_up)


class _DecodeModel(LlamaModel):
    """:class:`LlamaModel` whose stack runs :meth:`_DecodeLayer.forward_sum`: each residual
    add is formed by the next site (the last one before the final norm)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(
            _DecodeLayer(config, i) for i in range(config.num_hidden_layers)
        )

    def _stack(self, x, position_embeddings, mask, kv_cache):
        delta = None
        for layer in self.layers:
            x, delta = layer.forward_sum(x, delta, position_embeddings, mask, kv_cache)
        return x if delta is None else x + delta


def decoder_view(
    model: nn.Module, use_kernels: bool, head_bits: int | None = None
) -> LlamaForCausalLM:
    """The :class:`LlamaForCausalLM` the engine runs for ``model`` (an HF or qsparse Llama,
    converted or not): ``model`` itself for a qsparse model without kernels and
    ``head_bits=None``, else a model that shares ``model``'s embedding, norms, lm head and
    projection weights (no copy) and fuses the projections of each input site
    (:class:`_Projection`; kernel layouts are built here). ``head_bits=8``: the lm head is an
    :class:`Int8Head` quantized from the model's (:func:`check_head_bits`). ValueError for a
    bad ``QSPARSE_*`` value in the environment (:func:`check_environment`)."""
    check_head_bits(head_bits)
    check_environment()
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise ValueError(
            f"{type(model).__name__} is not a Llama-style causal LM (model.layers + lm_head)"
        )
    if isinstance(model, LlamaForCausalLM) and not use_kernels and head_bits is None:
        return model
    cfg = model.config
    if not isinstance(cfg, LlamaConfig):
        cfg = from_hf_config(cfg)
    with torch.device("meta"):
        view = LlamaForCausalLM(cfg)
        view.model = _DecodeModel(cfg)
    view.model.embed_tokens, view.model.norm = inner.embed_tokens, inner.norm
    if head_bits is None:
        view.lm_head = model.lm_head
    else:
        view.lm_head = Int8Head(model.lm_head.weight, use_kernels)
    for i, (src, dst) in enumerate(zip(inner.layers, view.model.layers, strict=True)):
        dst.self_attn = _FusedAttention(src.self_attn, cfg, i, use_kernels)
        dst.mlp = _FusedMLP(src.mlp, use_kernels)
        # a sparse q|k|v / gate|up site computes its layer norm inside its selection kernel
        fused = dst.self_attn.qkv.fuse_producer(src.input_layernorm)
        dst.input_layernorm = nn.Identity() if fused else src.input_layernorm
        fused = dst.mlp.gate_up.fuse_producer(src.post_attention_layernorm)
        dst.post_attention_layernorm = nn.Identity() if fused else src.post_attention_layernorm
    return view.eval()
