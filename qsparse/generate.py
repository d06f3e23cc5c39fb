"""Decoding for Llama-style models, dense or converted by :func:`qsparse.sparsify`: the one decode
path of the project (``LlamaForCausalLM.generate`` and ``qsparse-generate`` both run it).

:class:`DecodeEngine` runs the model's own forward (:class:`qsparse.models.llama.LlamaModel`:
its decoder layers, :class:`~qsparse.models.rope.RotaryEmbedding` and attention) over the
model's :class:`~qsparse.models.kv_cache.KVCache` in ``static`` mode: the write position is a
device tensor and attention covers the whole buffer under a mask, so every decode step has the
same shapes and one CUDA graph serves them all. Per step (batch B, one token each)::

    a = input_layernorm(h);   [q|k|v] = P_qkv(a);   RoPE;  cache write;  SDPA
    h = h + P_o(attn);         m = post_attention_layernorm(h)
    [g|u] = P_gate_up(m);      h = h + P_down(act(g) * u);   logits = lm_head(norm(h))

The engine decodes through :func:`qsparse.decode_view.decoder_view`: with ``use_kernels``
(CUDA, or CPU under ``TRITON_INTERPRET=1``) a view of the model whose projections sharing an
input site run fused on the GEMV kernels, else the model itself. ``compile`` runs the step
through ``torch.compile(fullgraph=True, dynamic=False)`` before the CUDA-graph capture (the
GEMV kernels are custom ops and trace without a graph break); the compiled step is
specialised to one (batch, length) shape. ``head_bits=8`` decodes with a weight-only int8 lm
head (:class:`qsparse.decode_view.Int8Head`; docs/decode.md), off by default.
"""

from __future__ import annotations

import functools
import math
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from .decode_view import check_head_bits, decoder_view
from .kernels import HAS_TRITON, kernels_available
from .models.kv_cache import KVCache

T = TypeVar("T")

MODES = ("dense", "qsparse", "bitnet", "bitnet_qsparse", "qsparse_threshold")


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


def convert(
    model: nn.Module,
    mode: str,
    sparsity: float = 0.6,
    calibration: torch.Tensor | None = None,
    skip: int = 0,
) -> nn.Module:
    """Apply one of :data:`MODES` to ``model`` in place with :func:`qsparse.sparsify`:
    ``qsparse`` = top-k at ``sparsity`` on every projection input, ``bitnet`` = BitNet b1.58 as
    everywhere in qsparse (``QUANT_PRESETS["bitnet"]``: ternary weights, int8 activations,
    SubLN), ``bitnet_qsparse`` = both, ``qsparse_threshold`` = a fixed magnitude threshold per
    site (``sparsity=threshold``, what ``sparsity.pattern=threshold`` training leaves), each set
    by :func:`calibrate_thresholds` on the token ids ``calibration`` [B, T] from position
    ``skip`` on (default: 64 seeded random tokens: right for timing a random model, not for
    text; a trained checkpoint carries its own), ``dense`` = unchanged."""
    from .convert import sparsify
    from .nn.config import QuantConfig, SparsityConfig

    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    if mode == "dense":
        return model
    if mode == "qsparse_threshold":
        sparsify(model, sparsity=SparsityConfig(ratio=sparsity, pattern="threshold"))
        if calibration is None:
            gen = torch.Generator().manual_seed(0)
            calibration = torch.randint(0, model.config.vocab_size, (1, 64), generator=gen)
        calibrate_thresholds(model, calibration, skip)
        return model
    sp = SparsityConfig(ratio=sparsity) if mode in ("qsparse", "bitnet_qsparse") else None
    quant = QuantConfig.preset("bitnet") if mode.startswith("bitnet") else None
    sparsify(model, sparsity=sp, quant=quant)
    return model


def _threshold_sites(model: nn.Module) -> dict[str, nn.Module]:
    from .nn.sites import sparsifiers

    return {n: sp for n, sp in sparsifiers(model).items() if sp.pattern == "threshold"}


@torch.no_grad()
def _site_inputs(
    model: nn.Module, ids: torch.Tensor, skip: int, fn: Callable[[nn.Module, torch.Tensor], T]
) -> dict[str, T]:
    """``fn(site, x)`` for every threshold site's input ``x`` [B, T - skip, K] of one eval
    forward of ``model`` over the token ids ``ids`` [B, T] (positions ``skip`` on), called just
    before the site runs (so ``fn`` may set its threshold); the model is left in eval mode."""
    sites = _threshold_sites(model)
    if ids.dim() != 2 or not 0 <= skip < ids.shape[1]:
        raise ValueError(
            f"token ids [B, T] and 0 <= skip < T expected, got {tuple(ids.shape)}, skip={skip}"
        )
    out: dict[str, T] = {}
    if not sites:
        return out

    def hook(name: str):
        def record(site: nn.Module, args: tuple) -> None:
            x = args[0]
            out[name] = fn(site, x.reshape(ids.shape[0], -1, x.shape[-1])[:, skip:])

        return record

    handles = [sp.register_forward_pre_hook(hook(n)) for n, sp in sites.items()]
    try:
        model.eval()
        model(ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return out


def calibrate_thresholds(model: nn.Module, ids: torch.Tensor, skip: int = 0) -> int:
    """Set every threshold site of ``model`` (``pattern="threshold"``) to its ratio's quantile
    of |x| over one eval forward of the token ids ``ids`` [B, T], positions ``skip`` on, each
    site as the forward reaches it, so its input already passed the thresholds set before it:
    on these tokens every site then keeps ``1 - ratio`` of its inputs (up to ties). With
    ``skip`` = the prompt length these are the positions a decode reads (the attention output's
    magnitude falls with the context a random model averages over). Returns the number of
    thresholds set."""
    return len(_site_inputs(model, ids, skip, lambda sp, x: sp.set_threshold_from(x)))


def kept_fraction(model: nn.Module, ids: torch.Tensor, skip: int = 0) -> float | None:
    """Mean over the threshold sites of ``model`` of the fraction of inputs each keeps
    (``|x| > t``) in one eval forward of ``ids`` [B, T], positions ``skip`` on; None without
    threshold sites. What a decode of those tokens kept, for reporting beside its speed."""
    found = _site_inputs(
        model,
        ids,
        skip,
        lambda sp, x: float(sp.threshold_mask(x).float().mean()),
    )
    return sum(found.values()) / len(found) if found else None


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


def check_request(
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    vocab_size: int,
    min_new_tokens: int = 1,
) -> None:
    """Raise ``ValueError`` naming the argument unless ``input_ids`` is a non-empty [B, T],
    ``max_new_tokens`` an int >= ``min_new_tokens``, ``temperature`` finite and >= 0 and
    ``top_k`` None or in [1, ``vocab_size``] (the arguments of every ``generate``)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [B, T], got {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < min_new_tokens:
        raise ValueError(f"max_new_tokens must be >= {min_new_tokens}, got {max_new_tokens}")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if top_k is not None and not (1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be in [1, vocab_size={vocab_size}], got {top_k}")


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
        head_bits: None (the model's own lm head) or 8: a weight-only int8 lm head, per-row
            symmetric (:class:`qsparse.decode_view.Int8Head`), quantized once here; its logits
            are ``scale[v] * sum_d h[d] * q[v, d]`` (fp32 sums). Built without kernels too
            (then the PyTorch reference computes them).
    """

    def __init__(
        self,
        model: nn.Module,
        use_kernels: bool = True,
        cuda_graph: bool = True,
        compile: bool | str | None = False,
        head_bits: int | None = None,
    ):
        super().__init__()
        self.compile_backend = compile_backend(compile)
        self.head_bits = check_head_bits(head_bits)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        kernels = bool(use_kernels and HAS_TRITON and kernels_available(param))
        self.decoder = decoder_view(model, kernels, head_bits)
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
        check_request(input_ids, max_new_tokens, temperature, top_k, self.decoder.config.vocab_size)
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
    head_bits: int | None = None,
) -> DecodeResult:
    """Greedy decoding of ``input_ids`` [B, T] with :class:`DecodeEngine` (see module doc)."""
    engine = DecodeEngine(
        model, use_kernels=use_kernels, cuda_graph=cuda_graph, compile=compile, head_bits=head_bits
    )
    return engine.generate(input_ids, max_new_tokens)


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``LlamaForCausalLM.generate`` (its docstring has the arguments): ``input_ids`` [B, T] ->
    [B, T + n], n <= ``max_new_tokens``, in eval mode. With the cache: :class:`DecodeEngine`
    over the model's own modules (no kernels, no CUDA graph); ``use_cache=False`` recomputes
    the whole prefix at each step (reference path)."""
    config = model.config
    check_request(
        input_ids, max_new_tokens, temperature, top_k, config.vocab_size, min_new_tokens=0
    )
    b, t = input_ids.shape
    total = t + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt length {t} + max_new_tokens {max_new_tokens} exceeds "
            f"max_position_embeddings={config.max_position_embeddings}."
        )
    if max_new_tokens == 0:
        return input_ids

    was_training = model.training
    model.eval()
    try:
        if use_cache:  # the project's one decode path, over this model's own modules
            engine = DecodeEngine(model, use_kernels=False, cuda_graph=False)
            res = engine.generate(
                input_ids, max_new_tokens, temperature, top_k, eos_token_id, generator
            )
            return res.tokens
        out = input_ids
        finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = pick_next(model(out).logits[:, -1].float(), temperature, top_k, generator)
            nxt, finished = stop_at_eos(nxt, finished, eos_token_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_token_id is not None and bool(finished.all()):
                break
        return out
    finally:
        model.train(was_training)
