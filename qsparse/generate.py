"""Decoding for Llama-style models, dense or converted by :func:`qsparse.sparsify`: the one decode
path of the project (``LlamaForCausalLM.generate`` and ``qsparse-generate`` both run it).

:class:`DecodeEngine` runs the model's own forward (:class:`qsparse.models.llama.LlamaModel`:
its decoder layers, :class:`~qsparse.models.llama.RotaryEmbedding` and attention) over the
model's :class:`~qsparse.models.llama.KVCache` in ``static`` mode: the write position is a
device tensor and attention covers the whole buffer under a mask, so every decode step has the
same shapes and one CUDA graph serves them all. Per step (batch B, one token each)::

    a = input_layernorm(h);   [q|k|v] = P_qkv(a);   RoPE;  cache write;  SDPA
    h = h + P_o(attn);         m = post_attention_layernorm(h)
    [g|u] = P_gate_up(m);      h = h + P_down(act(g) * u);   logits = lm_head(norm(h))

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
  :func:`qsparse.kernels.gemv.ternary_gemv` on 2-bit packed weights, up to 16 tokens.

Elsewhere (no kernels, prompt prefill, batch sizes or settings the kernels do not cover) a site
runs the model's own sparsifier and linear modules. Without kernels on a qsparse model the view
is the model itself. ``compile`` runs the step through ``torch.compile(fullgraph=True,
dynamic=False)`` before the CUDA-graph capture (the GEMV kernels are custom ops and trace
without a graph break); the compiled step is specialised to one (batch, length) shape.
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

from .kernels import HAS_TRITON, kernels_available
from .kernels import gemv as G
from .models.config import LlamaConfig
from .models.hf_config import from_hf_config
from .models.kv_cache import KVCache
from .models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, RMSNorm

MODES = ("dense", "qsparse", "bitnet", "bitnet_qsparse")
#: most tokens per call for the sparse-input GEMV (beyond: top-k, then a dense GEMM; the
#: union of kept rows of 2+ tokens is most of W) and for the ternary GEMV
SPARSE_MAX_ROWS = 1
TERNARY_MAX_ROWS = 16


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
    ``qsparse`` = top-k at ``sparsity`` on every projection input, ``bitnet`` = BitNet b1.58 as
    everywhere in qsparse (``QUANT_PRESETS["bitnet"]``: ternary weights, int8 activations,
    SubLN), ``bitnet_qsparse`` = both, ``dense`` = unchanged."""
    from .convert import sparsify
    from .nn.config import QuantConfig, SparsityConfig

    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    if mode == "dense":
        return model
    sp = SparsityConfig(ratio=sparsity) if mode in ("qsparse", "bitnet_qsparse") else None
    quant = QuantConfig.preset("bitnet") if mode.startswith("bitnet") else None
    sparsify(model, sparsity=sp, quant=quant)
    return model


def pick_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row from ``logits`` [B, V] -> [B]: argmax when ``temperature == 0``, else
    a sample of ``softmax(logits / temperature)`` over the ``top_k`` largest logits."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stop_at_eos(
    nxt: torch.Tensor, finished: torch.Tensor, eos_token_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows already ``finished`` [B] emit ``eos_token_id`` again: (tokens [B], finished [B])."""
    if eos_token_id is None:
        return nxt, finished
    nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
    return nxt, finished | (nxt == eos_token_id)


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
        self.pre: nn.Module | None = None  # producer module fused into the selection
        self.producer = G.NO_PRODUCER
        if not use_kernels or pattern != "token_topk" or rescale:
            return
        dev = linears[0].weight.device
        with torch.no_grad():
            if quant[0] == "ternary":
                if self.act_bits is not None and 2 <= self.act_bits <= 8:
                    self._prepare_ternary(linears)
                    self.mode = "ternary"
                    self.register_buffer("hint", G.new_hint(16, dev), persistent=False)
            elif self.act_bits is None and self.k is not None:
                weight = torch.cat([lin.weight.detach() for lin in linears], 0)
                self.register_buffer("wt", G.prepare_dense(weight), persistent=False)
                self.register_buffer("hint", G.new_hint(16, dev), persistent=False)
                self.mode = "sparse"
            elif self.k is None and self.act_bits is None and norm is None:
                weight = torch.cat([lin.weight.detach() for lin in linears], 0)
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
        self.register_buffer("packed", G.pack_ternary(torch.cat(codes, 0)), persistent=False)
        self.register_buffer("alpha", torch.cat(alphas).float(), persistent=False)

    def fuse_producer(self, norm: nn.Module) -> bool:
        """Take over the layer's RMSNorm in front of this site when the selection kernel can
        compute it (sparse bf16/fp32 site without SubLN:
        :class:`~qsparse.kernels.gemv.Producer`). True when taken: the caller must then hand
        this site the norm's input instead of its output."""
        if self.mode != "sparse" or self.site.norm is not None:
            return False
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
        if not isinstance(norm, RMSNorm) and type(norm).__name__ != "LlamaRMSNorm":
            return False
        if not isinstance(eps, float):
            return False
        self.producer = G.Producer("rmsnorm", norm.weight, eps)
        self.pre = norm
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return F.linear(x, self.weight)
        rows = x.numel() // x.shape[-1]
        if self.mode == "reference" or rows > TERNARY_MAX_ROWS or not kernels_available(x):
            return self.reference(x)
        lead, x2, n = x.shape[:-1], x.reshape(rows, x.shape[-1]), sum(self.sizes)
        if self.mode != "sparse":
            x2 = self._pre(x2)
        if self.site.norm is not None:
            x2 = self.site.norm(x2)
        if self.mode == "sparse" and rows > SPARSE_MAX_ROWS:
            # the kept rows of several tokens cover most of W: top-k (one program per row,
            # from the carried thresholds, computing the site input from its producer's),
            # then one dense GEMM on the fused weight
            xs = G.masked_topk(x2, self.k, self.hint, producer=self.producer)
            return (xs @ self.wt)[:, :n].reshape(*lead, n)
        if self.mode == "sparse":
            y = G.sparse_gemv(x2, self.wt, self.k, n_out=n, hint=self.hint, producer=self.producer)
        else:
            y = G.ternary_gemv(x2, self.packed, self.alpha, self.k, self.act_bits, hint=self.hint)
            y = y[:, :n]
        return y.reshape(*lead, n)


class _FusedAttention(LlamaAttention):
    """:class:`LlamaAttention` (same ``forward``/``attend``) whose q|k|v and o projections are
    :class:`_Projection` sites over another attention module's layers."""

    def __init__(self, attn: nn.Module, config: LlamaConfig, layer_idx: int, kernels: bool):
        nn.Module.__init__(self)  # no weights of its own: it reads ``attn``'s
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        site = getattr(attn, "qsparse_input", None)
        lins = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.qkv = _Projection(site, lins, True, kernels)
        o_site = getattr(attn.o_proj, "act", None)
        self.o_proj = _Projection(o_site, [attn.o_proj], False, kernels)

    def project_qkv(self, hidden_states):
        return tuple(self.qkv(hidden_states).split(self.qkv.sizes, dim=-1))


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

    def project_gate_up(self, x):
        return tuple(self.gate_up(x).split(self.gate_up.sizes, dim=-1))


def decoder_view(model: nn.Module, use_kernels: bool) -> LlamaForCausalLM:
    """The :class:`LlamaForCausalLM` the engine runs for ``model`` (an HF or qsparse Llama,
    converted or not): ``model`` itself for a qsparse model without kernels, else a model that
    shares ``model``'s embedding, norms, lm head and projection weights (no copy) and fuses the
    projections of each input site (:class:`_Projection`; kernel layouts are built here)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise ValueError(
            f"{type(model).__name__} is not a Llama-style causal LM (model.layers + lm_head)"
        )
    if isinstance(model, LlamaForCausalLM) and not use_kernels:
        return model
    cfg = model.config
    if not isinstance(cfg, LlamaConfig):
        cfg = from_hf_config(cfg)
    with torch.device("meta"):
        view = LlamaForCausalLM(cfg)
    view.model.embed_tokens, view.model.norm = inner.embed_tokens, inner.norm
    view.lm_head = model.lm_head
    for i, (src, dst) in enumerate(zip(inner.layers, view.model.layers, strict=True)):
        dst.self_attn = _FusedAttention(src.self_attn, cfg, i, use_kernels)
        dst.mlp = _FusedMLP(src.mlp, use_kernels)
        # a sparse q|k|v / gate|up site computes its layer norm inside its selection kernel
        fused = dst.self_attn.qkv.fuse_producer(src.input_layernorm)
        dst.input_layernorm = nn.Identity() if fused else src.input_layernorm
        fused = dst.mlp.gate_up.fuse_producer(src.post_attention_layernorm)
        dst.post_attention_layernorm = nn.Identity() if fused else src.post_attention_layernorm
    return view.eval()


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
    """``tokens`` [B, T + n] (prompt then generated; fewer when every row hit EOS);
    ``decode_s``: seconds spent on the steps after the prompt (the first new token comes with
    the prompt); ``tokens_per_s`` = B * steps / decode_s."""

    tokens: torch.Tensor
    decode_s: float
    tokens_per_s: float


class DecodeEngine(nn.Module):
    """Decoder with a static KV cache over a (converted) Llama model (see the module doc).

    Args:
        model: HF or qsparse ``LlamaForCausalLM`` (after :func:`qsparse.sparsify` or not).
        use_kernels: use the Triton GEMV kernels where they apply (CUDA, or CPU under the
            Triton interpreter).
        cuda_graph: capture the one-token step in a CUDA graph (CUDA only).
        compile: ``False``/``None`` (eager step), ``True`` (= ``"inductor"``) or a
            ``torch.compile`` backend name: :meth:`step` runs through
            ``torch.compile(fullgraph=True, dynamic=False)``, also inside the CUDA graph.
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
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        kernels = bool(use_kernels and HAS_TRITON and kernels_available(param))
        self.decoder = decoder_view(model, kernels)
        self.cuda_graph = bool(cuda_graph and self.device.type == "cuda")
        if self.cuda_graph and self.compile_backend == "cudagraphs":
            raise ValueError("compile='cudagraphs' captures its own graphs: use cuda_graph=False")
        self._graph: torch.cuda.CUDAGraph | None = None
        self._compiled = None  # compiled step (see _compile_step), built per buffer shape
        self._shape: tuple[int, int] | None = None

    def _alloc(self, batch: int, max_len: int) -> None:
        dev = self.device
        self.cache = KVCache(self.decoder.config, batch, max_len, dev, self.dtype, static=True)
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.history = torch.zeros(batch, max_len, dtype=torch.long, device=dev)
        self._shape = (batch, max_len)
        self._graph = None
        self._compiled = None  # new shapes: compile again, with a recompile budget of its own

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Consume ``self.tok`` [B] at the cache position; write K/V, return logits [B, V] and
        store the greedy next token in ``self.tok`` and ``self.history[:, position]``."""
        logits = self.decoder(self.tok[:, None], kv_cache=self.cache).logits[:, -1]
        nxt = logits.argmax(-1)
        self.history.index_copy_(1, self.cache.pos - 1, nxt[:, None])
        self.tok.copy_(nxt)
        return logits

    def _step_fn(self):
        """The one-token step to run: :meth:`step`, or its compiled version (built lazily)."""
        if self.compile_backend is None:
            return self.step
        if self._compiled is None:
            self._compiled = _compile_step(self.compile_backend)
        return functools.partial(self._compiled, self)

    def _capture(self) -> None:
        """Capture the step in a CUDA graph (after two warm-up steps on a side stream, which
        also compile the kernels and the step); the state it consumed is restored."""
        step = self._step_fn()
        saved = (self.cache.pos.clone(), self.tok.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.cache.pos.copy_(saved[0])
                self.tok.copy_(saved[1])
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.cache.pos.copy_(saved[0])
        self.tok.copy_(saved[1])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = step()
        self._graph = graph
        self.cache.pos.copy_(saved[0])
        self.tok.copy_(saved[1])

    def _run_step(self) -> torch.Tensor:
        if not self.cuda_graph:
            return self._step_fn()()
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> DecodeResult:
        """Continue ``input_ids`` [B, T] by up to ``max_new_tokens`` tokens (:func:`pick_next`:
        greedy at ``temperature=0``). The prompt runs as one forward; rows that produced
        ``eos_token_id`` keep emitting it and decoding stops once every row has."""
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
        self.cache.reset()
        ids = input_ids.to(self.device)
        greedy = temperature == 0 and eos_token_id is None
        finished = torch.zeros(b, dtype=torch.bool, device=self.device)

        def pick(logits: torch.Tensor, pos: int) -> None:  # sampling / EOS: override argmax
            nonlocal finished
            nxt = pick_next(logits, temperature, top_k, generator)
            nxt, finished = stop_at_eos(nxt, finished, eos_token_id)
            self.tok.copy_(nxt)
            self.history[:, pos] = nxt

        logits = self.decoder(ids, kv_cache=self.cache).logits[:, -1]  # the prompt, at once
        self.history[:, t - 1] = logits.argmax(-1)
        self.tok.copy_(self.history[:, t - 1])
        if not greedy:
            pick(logits, t - 1)
        if self.cuda_graph and self._graph is None and total - 1 > t:
            self._capture()  # outside the timed steps
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        steps = 0
        for pos in range(t, total - 1):
            if eos_token_id is not None and bool(finished.all()):
                break
            logits = self._run_step()
            steps += 1
            if not greedy:
                pick(logits, pos)
        sync()
        elapsed = time.perf_counter() - start
        tokens = torch.cat([ids, self.history[:, t - 1 : t + steps]], dim=1)
        per_s = b * max(steps, 1) / elapsed if elapsed > 0 else math.inf
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
