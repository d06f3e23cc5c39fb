"""Fast greedy decoding for Llama-style models, dense or converted by :func:`qsparse.sparsify`.

:class:`DecodeEngine` reads a model (HF ``LlamaForCausalLM`` or
:class:`qsparse.models.llama.LlamaForCausalLM`, optionally sparsified and/or BitNet-quantized)
and runs one token step per layer as:

    a = input_layernorm(h);   [q|k|v] = P_qkv(a);   RoPE;  KV cache write;  SDPA
    h = h + P_o(attn);         m = post_attention_layernorm(h)
    [g|u] = P_gate_up(m);      h = h + P_down(act(g) * u);   logits = lm_head(norm(h))

Each projection group P (q/k/v and gate/up share one input sparsifier, so they are fused into
one GEMV) is, per layer settings:

- dense float weights: ``F.linear`` (cuBLAS GEMV);
- top-k sparse input, float weights: :func:`qsparse.kernels.gemv.sparse_gemv` (reads only the
  kept weight rows; the top-k selection runs inside);
- ternary weights (BitNet b1.58, int8 absmax activations), optionally top-k sparse:
  :func:`qsparse.kernels.gemv.ternary_gemv` on 2-bit packed weights, one ``alpha`` per column.

The kernels run on CUDA (sparse input at batch 1, ternary up to 16 tokens); elsewhere (CPU, or settings the
kernels do not cover: block top-k, quantized top-k on float weights, rescaling) the model's own
sparsifier modules and quantized weights compute the same function. On CUDA the whole step
(embedding to argmax) is captured once in a CUDA graph and replayed per token.

``compile=True`` (or a backend name) runs the step through ``torch.compile(fullgraph=True,
dynamic=False)`` first, so inductor fuses the small element-wise kernels around the GEMVs (norms,
RoPE, residual adds, ``act(g) * u``) before the capture; the GEMV kernels are custom ops
(``qsparse::sparse_gemv``, ``qsparse::ternary_gemv``) and trace without a graph break. The
compiled step is specialised to one (batch, prompt + new tokens) shape: a new shape compiles again.
"""

from __future__ import annotations

import functools
import math
import time
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import HAS_TRITON
from .kernels import gemv as G

MODES = ("dense", "qsparse", "bitnet", "bitnet_qsparse")


def compile_backend(compile: bool | str | None) -> str | None:
    """Resolve the ``compile`` argument of :class:`DecodeEngine`: ``False``/``None`` -> None
    (eager step), ``True`` -> ``"inductor"``, a ``torch.compile`` backend name -> itself."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "inductor"
    if isinstance(compile, str) and compile in torch._dynamo.list_backends(exclude_tags=()):
        return compile
    raise ValueError(
        f"compile={compile!r} must be False/None (off), True (= 'inductor') or a torch.compile "
        "backend name: 'inductor', 'aot_eager', 'eager', ... "
        "(torch._dynamo.list_backends(exclude_tags=()))"
    )


def convert(model: nn.Module, mode: str, sparsity: float = 0.6) -> nn.Module:
    """Apply one of :data:`MODES` to ``model`` in place with :func:`qsparse.sparsify`:
    ``qsparse`` = top-k at ``sparsity`` on every projection input, ``bitnet`` = ternary weights +
    int8 activations, ``bitnet_qsparse`` = both, ``dense`` = unchanged."""
    from .convert import sparsify
    from .nn.config import QuantConfig, SparsityConfig

    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    if mode == "dense":
        return model
    sp = SparsityConfig(ratio=sparsity) if mode in ("qsparse", "bitnet_qsparse") else None
    quant = QuantConfig(weights="ternary", act_bits=8) if mode.startswith("bitnet") else None
    sparsify(model, sparsity=sp, quant=quant)
    return model


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None)
    if theta is None and isinstance(params, dict):
        if params.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters.rope_type={params['rope_type']!r} is not supported")
        theta = params.get("rope_theta")
    scaling = getattr(config, "rope_scaling", None)  # transformers 5: an alias of rope_parameters
    if scaling and not (isinstance(scaling, dict) and scaling.get("rope_type") == "default"):
        raise ValueError("config.rope_scaling is not supported by qsparse.generate")
    return float(theta if theta is not None else 10000.0)


class _Projection(nn.Module):
    """One input site (optional sparsifier) feeding one or more fused linear layers.

    ``x`` [B, K] -> [B, sum(N_i)]. ``site`` is the model's ActivationSparsifier (or None),
    ``linears`` the nn.Linear / QSparseLinear modules sharing that input.
    """

    def __init__(self, site: nn.Module | None, linears: list[nn.Module], use_kernels: bool):
        super().__init__()
        self.site = site
        self.sizes = [lin.out_features for lin in linears]
        if any(getattr(lin, "bias", None) is not None for lin in linears):
            raise ValueError("qsparse.generate supports bias-free projections only")
        quant = [getattr(lin, "weight_quant", "none") for lin in linears]
        self.ternary = quant[0] == "ternary"
        if len(set(quant)) != 1:
            raise ValueError(f"projections sharing one input mix weight quantization {quant}")
        with torch.no_grad():
            if self.ternary:
                weights = [lin.quantized_weight().detach() for lin in linears]
            else:
                weights = [lin.weight.detach() for lin in linears]
            self.register_buffer("weight", torch.cat(weights, 0), persistent=False)
        self.k = site.keep() if site is not None else None
        self.act_bits = getattr(site, "act_bits", None) if site is not None else None
        pattern = getattr(site, "pattern", "token_topk") if site is not None else "token_topk"
        rescale = bool(getattr(site, "rescale", False)) if site is not None else False
        self.mode = "reference"
        if use_kernels and pattern == "token_topk" and not rescale:
            if self.ternary and self.act_bits is not None and 2 <= self.act_bits <= 8:
                self._prepare_ternary(linears)
                self.mode = "ternary"
            elif not self.ternary and self.act_bits is None and self.k is not None:
                self.register_buffer("wt", G.prepare_dense(self.weight), persistent=False)
                self.mode = "sparse"
        if self.mode == "reference" and not self.ternary:
            norm = getattr(site, "norm", None) if site is not None else None
            if self.k is None and self.act_bits is None and norm is None:
                self.mode = "dense"  # the site is a no-op: plain cuBLAS GEMV

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
        self.register_buffer("packed", G.pack_ternary(torch.cat(codes, 0)), persistent=False)
        self.register_buffer("alpha", torch.cat(alphas).float(), persistent=False)
        self.weight = None  # the packed codes replace the dequantized copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the sparse-input kernel only pays off at batch 1 (rows kept by any token are read)
        kernel_ok = x.is_cuda and x.shape[0] <= (1 if self.mode == "sparse" else 16)
        if self.mode == "dense" or (self.mode == "reference" and self.site is None):
            return F.linear(x, self.weight)
        if self.mode == "reference" or not kernel_ok:
            if self.mode == "ternary" and self.weight is None:
                n = sum(self.sizes)  # drop the padding outputs
                w = G.unpack_ternary(self.packed, x.shape[-1])[:n].to(x.dtype)
                w = w * self.alpha[:n, None].to(x.dtype)
            else:
                w = self.weight
            return F.linear(self.site(x) if self.site is not None else x, w)
        if self.site is not None and self.site.norm is not None:
            x = self.site.norm(x)
        if self.mode == "sparse":
            return G.sparse_gemv(x, self.wt, self.k, n_out=sum(self.sizes))
        y = G.ternary_gemv(x, self.packed, self.alpha, self.k, self.act_bits)
        return y[:, : sum(self.sizes)]


def _decode_step(engine: DecodeEngine) -> torch.Tensor:
    return engine.step()


def _compile_step(backend: str):
    """``torch.compile`` of a private copy of :func:`_decode_step`, called with the engine.

    Dynamo keeps compiled graphs, and counts recompiles against ``recompile_limit`` (default
    8; ``fullgraph=True`` fails past it), per code object: compiling ``engine.step`` itself
    would share one budget among every engine and buffer shape in the process. A fresh code
    object per engine and shape gets its own cache, freed with it."""
    code = _decode_step.__code__.replace(co_name=_decode_step.__name__)  # a new code object
    fn = types.FunctionType(code, _decode_step.__globals__, _decode_step.__name__)
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)


@dataclass
class DecodeResult:
    """``tokens`` [B, T + n] (prompt then generated); ``decode_s``: seconds spent generating
    the ``n`` new tokens (prompt steps excluded); ``tokens_per_s`` = B * n / decode_s."""

    tokens: torch.Tensor
    decode_s: float
    tokens_per_s: float


class DecodeEngine(nn.Module):
    """Greedy decoder with a static KV cache over a (converted) Llama model.

    Args:
        model: HF or qsparse ``LlamaForCausalLM`` (after :func:`qsparse.sparsify` or not).
        use_kernels: use the Triton GEMV kernels where they apply (CUDA + Triton).
        cuda_graph: capture the one-token step in a CUDA graph (CUDA only).
        compile: ``False``/``None`` (eager step), ``True`` (= ``"inductor"``) or a
            ``torch.compile`` backend name (``"inductor"``, ``"aot_eager"``, ``"eager"``, ...):
            :meth:`step` runs through ``torch.compile(fullgraph=True, dynamic=False)``, also
            inside the CUDA graph (compiled in the warm-up steps before the capture).
    """

    def __init__(
        self,
        model: nn.Module,
        use_kernels: bool = True,
        cuda_graph: bool = True,
        compile: bool | str | None = False,
    ):
        super().__init__()
        self.compile_backend = compile_backend(compile)
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
            raise ValueError(
                f"{type(model).__name__} is not a Llama-style causal LM (model.layers + lm_head)"
            )
        cfg = model.config
        self.embed = inner.embed_tokens
        self.final_norm = inner.norm
        self.lm_head = model.lm_head
        self.num_heads = cfg.num_attention_heads
        self.num_kv = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.theta = _rope_theta(cfg)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        kernels = bool(use_kernels and HAS_TRITON and self.device.type == "cuda")
        self.layers = nn.ModuleList()
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            block = nn.Module()
            block.input_layernorm = layer.input_layernorm
            block.post_attention_layernorm = layer.post_attention_layernorm
            block.qkv = _Projection(
                getattr(attn, "qsparse_input", None),
                [attn.q_proj, attn.k_proj, attn.v_proj],
                kernels,
            )
            block.o = _Projection(getattr(attn.o_proj, "act", None), [attn.o_proj], kernels)
            block.gate_up = _Projection(
                getattr(mlp, "qsparse_input", None), [mlp.gate_proj, mlp.up_proj], kernels
            )
            block.down = _Projection(getattr(mlp.down_proj, "act", None), [mlp.down_proj], kernels)
            block.act_fn = mlp.act_fn
            self.layers.append(block)
        self.head_dim = self.layers[0].qkv.sizes[0] // self.num_heads
        self.cuda_graph = bool(cuda_graph and self.device.type == "cuda")
        if self.cuda_graph and self.compile_backend == "cudagraphs":
            raise ValueError("compile='cudagraphs' captures its own graphs: use cuda_graph=False")
        self._graph: torch.cuda.CUDAGraph | None = None
        self._compiled = None  # compiled step (see _compile_step), built per buffer shape
        self._shape: tuple[int, int] | None = None

    # -- one step -----------------------------------------------------------------------------

    def _alloc(self, batch: int, max_len: int) -> None:
        shape = (batch, self.num_kv, max_len, self.head_dim)
        dev, dt = self.device, self.dtype
        self.k_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in self.layers]
        half = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=dev)
        inv_freq = 1.0 / (self.theta ** (half / self.head_dim))
        freqs = torch.arange(max_len, device=dev, dtype=torch.float32)[:, None] * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = angles.cos().to(dt), angles.sin().to(dt)  # [max_len, D]
        self.positions = torch.arange(max_len, device=dev)
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.history = torch.zeros(batch, max_len, dtype=torch.long, device=dev)
        self._shape = (batch, max_len)
        self._graph = None
        self._compiled = None  # new shapes: compile again, with a recompile budget of its own

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Consume ``self.tok`` [B] at position ``self.pos``; write K/V, return logits [B, V]
        and store the greedy next token in ``self.tok`` / ``self.history[:, pos]``; pos += 1."""
        b = self.tok.shape[0]
        h_, kv, d = self.num_heads, self.num_kv, self.head_dim
        cos = self.cos.index_select(0, self.pos)  # [1, D]
        sin = self.sin.index_select(0, self.pos)
        mask = (self.positions <= self.pos)[None, None, None, :]  # [1, 1, 1, S]
        x = self.embed(self.tok)  # [B, hidden]
        for i, blk in enumerate(self.layers):
            qkv = blk.qkv(blk.input_layernorm(x))
            q, k, v = qkv.split([h_ * d, kv * d, kv * d], dim=-1)
            q = self._rotate(q.view(b, h_, 1, d), cos, sin)
            k = self._rotate(k.view(b, kv, 1, d), cos, sin)
            self.k_cache[i].index_copy_(2, self.pos, k)
            self.v_cache[i].index_copy_(2, self.pos, v.view(b, kv, 1, d))
            keys, values = self.k_cache[i], self.v_cache[i]
            if kv != h_:
                keys = keys.repeat_interleave(h_ // kv, dim=1)
                values = values.repeat_interleave(h_ // kv, dim=1)
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = x + blk.o(att.reshape(b, h_ * d))
            m = blk.post_attention_layernorm(x)
            gate, up = blk.gate_up(m).split(blk.gate_up.sizes, dim=-1)
            x = x + blk.down(blk.act_fn(gate) * up)
        logits = self.lm_head(self.final_norm(x))
        nxt = logits.argmax(-1)
        self.history.index_copy_(1, self.pos, nxt[:, None])
        self.tok.copy_(nxt)
        self.pos.add_(1)
        return logits

    def _step_fn(self):
        """The one-token step to run: :meth:`step`, or its compiled version (built lazily)."""
        if self.compile_backend is None:
            return self.step
        if self._compiled is None:
            self._compiled = _compile_step(self.compile_backend)
        return functools.partial(self._compiled, self)

    def _run_step(self) -> None:
        step = self._step_fn()
        if not self.cuda_graph:
            step()
            return
        if self._graph is None:
            saved = (self.pos.clone(), self.tok.clone())
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile kernels (and the step), warm cuBLAS before capture
                    self.pos.copy_(saved[0])
                    self.tok.copy_(saved[1])
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            self.pos.copy_(saved[0])
            self.tok.copy_(saved[1])
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            self._graph = graph
            self.pos.copy_(saved[0])
            self.tok.copy_(saved[1])
        self._graph.replay()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> DecodeResult:
        """Greedy continuation of ``input_ids`` [B, T] by ``max_new_tokens`` tokens."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [B, T], got {tuple(input_ids.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        b, t = input_ids.shape
        total = t + max_new_tokens
        if self._shape != (b, total):
            self._alloc(b, total)
        ids = input_ids.to(self.device)
        for p in range(t):  # prompt, one position at a time through the same step
            self.tok.copy_(ids[:, p])
            self.pos.fill_(p)
            self._run_step()
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            self._run_step()
        sync()
        elapsed = time.perf_counter() - start
        new = self.history[:, t - 1 : total - 1]
        tokens = torch.cat([ids, new], dim=1)
        steps = max(max_new_tokens - 1, 1)
        per_s = b * steps / elapsed if elapsed > 0 else math.inf
        return DecodeResult(tokens=tokens, decode_s=elapsed, tokens_per_s=per_s)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    use_kernels: bool = True,
    cuda_graph: bool = True,
    compile: bool | str | None = False,
) -> DecodeResult:
    """Greedy decoding of ``input_ids`` [B, T] with :class:`DecodeEngine` (see module doc)."""
    engine = DecodeEngine(model, use_kernels=use_kernels, cuda_graph=cuda_graph, compile=compile)
    return engine.generate(input_ids, max_new_tokens)
