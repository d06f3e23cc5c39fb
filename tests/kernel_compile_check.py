"""Compile every Triton kernel launch qsparse makes to sm_90 machine code, without a GPU.

Run as a script (``tests/test_kernels.py`` does, in a subprocess): the public kernel entry
points are called on CPU tensors with ``JITFunction.__getitem__`` replaced by a recorder, so
each launch (arguments, constexprs, ``num_warps``/``num_stages``/``launch_pdl``) is captured
instead of run; each distinct launch is then compiled by the installed Triton for
``GPUTarget("cuda", 90, 32)`` (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's ptxas).
This is what a Hopper user with the pinned torch/Triton would compile, so a kernel that the
installed Triton cannot build fails here, on a CPU machine. Exit codes: 0 all compiled,
1 a kernel failed, 3 this Triton has no NVIDIA backend or ptxas (nothing checked).
"""

from __future__ import annotations

import functools
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    get_ptxas(90).path  # noqa: B018  (raises when no ptxas ships with this Triton)
except Exception as err:  # noqa: BLE001
    print(f"no NVIDIA backend / ptxas in this Triton: {err}")
    sys.exit(3)

import qsparse.kernels.decode_attention as DA  # noqa: E402
import qsparse.kernels.gemv as G  # noqa: E402
import qsparse.kernels.int8_gemv as I8  # noqa: E402
import qsparse.kernels.ternary_rows as TR  # noqa: E402
import qsparse.kernels.threshold_gemv as TG  # noqa: E402
from qsparse.kernels import _topk_triton as T  # noqa: E402
from qsparse.kernels import quant as Q  # noqa: E402
from qsparse.kernels.topk import KEY_BITS  # noqa: E402

DTYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.int64: "i64",
    torch.bool: "i1",
}


def capture_launches() -> list[tuple[JITFunction, tuple, dict]]:
    """Every kernel launch of the decode GEMVs, the training top-k and the ternary weight."""
    launches = []

    def recorder(self, grid):
        return lambda *args, **kw: launches.append((self, args, kw))

    JITFunction.__getitem__ = recorder
    G._pdl_ok = lambda x: True  # the Hopper launch path (programmatic dependent launch)
    G._interpreted = lambda x: False  # inline PTX (dp4a, fence), bf16 dots
    bf16 = torch.bfloat16
    x1, x4 = torch.randn(1, 4096, dtype=bf16), torch.randn(4, 2048, dtype=bf16)
    x5460 = torch.randn(1, 5460, dtype=bf16)
    w = torch.randn(3000, 2048, dtype=bf16)
    for wt, x, k, cfg in [
        (G.prepare_dense(torch.randn(11008, 4096, dtype=bf16)), x1, 1638, None),  # 64 columns
        (G.prepare_dense(torch.randn(2048, 5460, dtype=bf16)), x5460, 2184, None),  # split 4
        (G.prepare_dense(w, None, 1), x4, 819, None),  # batch 4: dot, masked columns
        (G.prepare_dense(w, 64), x4[:1], 819, G.GemvConfig(split=3)),  # panels, split list
        (G.prepare_dense(w, 64), x4[:1], 819, G.GemvConfig(packed=False)),  # two lists
    ]:
        G.sparse_gemv(x, wt, k, cfg)
        G.sparse_gemv(x, wt, k, cfg, hint=G.new_hint(4))  # threshold carried over
    codes, alpha = G.ternarize(torch.randn(5460, 2048))
    packed = G.pack_ternary(codes)
    shipped_evict = G.WEIGHTS_EVICT_FIRST  # the weight loads with and without an L2 policy
    G.WEIGHTS_EVICT_FIRST = not shipped_evict
    G.sparse_gemv(
        x1, G.prepare_dense(torch.randn(4096, 4096, dtype=bf16)), 1638, hint=G.new_hint(1)
    )
    G.ternary_gemv(x4[:1], packed, alpha, None, 8)
    G.WEIGHTS_EVICT_FIRST = shipped_evict
    for x, k in [(x4[:1], None), (x4[:1], 819), (x4, None), (x4, 819)]:
        G.ternary_gemv(x, packed, alpha, k, 8)
    G.ternary_gemv(x4, packed, alpha, 819, 8, hint=G.new_hint(4))
    subln = G.SubLN(torch.ones(2048, dtype=bf16), 1e-6)  # BitNet decode: norms in the kernel
    layer_norm = G.Producer("rmsnorm", torch.ones(2048, dtype=bf16), 1e-6)
    G.ternary_gemv(
        x4[:1], packed, alpha, 819, 8, hint=G.new_hint(1), producer=layer_norm, subln=subln
    )
    G.ternary_gemv(x4, packed, alpha, None, 8, subln=subln)
    G.select_rows(x4, 819)
    G.masked_topk(x4, 819, G.new_hint(4))  # batch 2-16: top-k from carried thresholds
    w11 = G.prepare_dense(torch.zeros(4096, 11008, dtype=bf16))
    G.sparse_gemv(torch.randn(1, 11008, dtype=bf16), w11, 4403, hint=G.new_hint(1))  # 32 warps
    for c in (  # the carried GEMV (GemvConfig.carry), 11008 wide
        G.sparse_config_for(11008, 4096, 4403, carry=True),
        G.GemvConfig(block_k=64, block_n=32, split=1, carry=True),
    ):
        G.sparse_gemv(torch.randn(1, 11008, dtype=bf16), w11, 4403, c, hint=G.new_hint(1))
    TG._pdl_ok = lambda x: True  # fixed-threshold sites: list kernel + GEMV
    TG._interpreted = lambda x: False
    t = torch.tensor([0.5])
    for x, prod in ((x1, G.NO_PRODUCER), (x1, G.Producer("rmsnorm", torch.ones(4096, dtype=bf16)))):
        wt = G.prepare_dense(torch.randn(4096, 4096, dtype=bf16))
        cfg = G.sparse_config_for_weights(wt, 2048)
        G._sparse_gemv_launch(
            x,
            wt,
            -1,
            cfg,
            bf16,
            None,
            list_rows=functools.partial(TG.threshold_rows, x, t, producer=prod),
        )
    for dtype in (bf16, torch.float32):
        xt = torch.randn(64, 2048, dtype=dtype)
        mask = torch.empty(64, 2048, dtype=torch.bool)
        T.launch_token_topk(xt, torch.empty_like(xt), mask, 819, 127, 1e-5, True, KEY_BITS[dtype])
        T.launch_token_topk(xt, torch.empty_like(xt), None, 819, 0, 1e-5, True, KEY_BITS[dtype])
        T.launch_block_topk(xt, torch.empty_like(xt), mask, 16, 32, 0, 1e-5, KEY_BITS[dtype])
    Q._launch(torch.randn(300, 70, dtype=bf16), 1e-5)
    TR._pdl_ok = lambda x: True
    TR._interpreted = lambda x: False
    rows = TR.pack_ternary_rows(codes)  # 2048 -> 5460 (5632 padded)
    x11 = torch.randn(1, 11008, dtype=bf16)
    down = TR.pack_ternary_rows(torch.zeros(4096, 11008, dtype=torch.int8))
    norm = G.Producer("rmsnorm", torch.ones(2048, dtype=bf16))
    for x, p, k, cfg, prod in [  # input-major sparse ternary GEMV: default, split, plain, fused
        (x4[:1], rows, 819, None, G.NO_PRODUCER),
        (x11, down, 4403, None, G.NO_PRODUCER),
        (
            x11,
            down,
            4403,
            G.GemvConfig(block_k=64, block_n=256, split=8, num_warps=8),
            G.NO_PRODUCER,
        ),
        (x4[:1], rows, 819, G.GemvConfig(block_k=16, block_n=64, num_stages=1), G.NO_PRODUCER),
        (x4[:1], rows, 819, None, norm),
    ]:
        TR.ternary_rows_gemv(
            x, p, torch.ones(p.shape[1] * 16), k, cfg=cfg, hint=G.new_hint(1), producer=prod
        )
    given = (torch.zeros(2048, dtype=torch.int32),) * 2 + (torch.ones(1),)
    TR.ternary_rows_gemv(x4[:1], rows, 0.5, 819, rows=given)  # list given: no PDL
    DA.kernels_available = lambda x: True  # the decode attention: one split and two
    shipped = DA.PRELOAD_FIRST_BLOCK
    for length, preload in ((80, True), (80, False), (600, True), (600, False)):
        q = torch.randn(1, 4 * 64, dtype=bf16)
        kv = torch.randn(1, 2 * 64, dtype=bf16)
        cache = torch.zeros(1, 2, length, 64, dtype=bf16)
        cos = torch.ones(length, 64, dtype=bf16)
        DA.PRELOAD_FIRST_BLOCK = preload
        DA.decode_attention(q, kv, kv, cos, cos, cache, cache.clone(), torch.tensor([5]))
    DA.PRELOAD_FIRST_BLOCK = shipped
    I8._interpreted = lambda x: False  # bf16 dots at batch > 1
    q, scale = I8.quantize_int8_rows(torch.randn(1000, 2048))  # the int8 lm head
    for x in (x4[:1], x4, x4[:1].float(), x4.float()):
        for cfg in (None, I8.Int8GemvConfig(16, 512, 4, 3), I8.Int8GemvConfig(128, 64, 8, 3)):
            cfg = cfg or I8.int8_config_for(x.shape[0])
            ints = [cfg.block_v, cfg.block_d, cfg.num_warps, cfg.num_stages]
            I8.int8_gemv_op(x, q, scale, x.dtype, ints)
    return launches


def source_of(fn: JITFunction, args: tuple, kw: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, compile options) of one recorded launch."""
    values = dict(zip(fn.arg_names, args, strict=False))
    values.update({k: v for k, v in kw.items() if k in fn.arg_names})
    signature, constexprs = {}, {}
    for p in fn.params:
        if p.name not in values:
            continue  # a constexpr left at its default
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + DTYPES[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v).__name__}")
    options = {k: v for k, v in kw.items() if k not in fn.arg_names}
    return signature, constexprs, options


def main() -> int:
    seen, failed = set(), 0
    for fn, args, kw in capture_launches():
        signature, constexprs, options = source_of(fn, args, kw)
        key = (fn.__name__, repr(signature), repr(constexprs), repr(options))
        if key in seen:
            continue
        seen.add(key)
        try:
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            print(f"ok   {fn.__name__} {options}")
        except Exception as err:  # noqa: BLE001
            failed += 1
            print(f"FAIL {fn.__name__} {constexprs} {options}: {type(err).__name__}: {err}")
    print(f"{len(seen)} distinct launches, {failed} failed (Triton {triton.__version__}, sm_90)")
    return 1 if failed or not seen else 0


if __name__ == "__main__":
    sys.exit(main())
