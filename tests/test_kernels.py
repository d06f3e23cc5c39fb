"""CPU tier for qsparse.kernels: dispatch falls back to the references without a GPU, argument
errors name the field, the GEMV references and the 2-bit packing are right, and (when Triton is
installed) the kernels themselves match the references under Triton's CPU interpreter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import qsparse.kernels as K
from qsparse.kernels import gemv as G
from qsparse.nn.quant import absmax_quantize, absmean_ternarize
from qsparse.nn.topk import topk_mask

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Triton is not installed (the optional 'kernels' extra: pip install -e '.[kernels]')",
)
#: streaming multiprocessors of the H100 SXM the launch rule was measured on
H100_SMS = 132


@pytest.mark.skipif(K.INTERPRET, reason="the interpreter routes CPU tensors to the kernels")
def test_cpu_tensors_fall_back_to_the_reference():
    x = torch.randn(4, 64)
    assert K.fused_token_topk(x, 10, True, None) is None
    assert K.fused_block_topk(x, 4, 32, True, 8) is None
    assert K.fused_ternary_weight(x) is None
    assert not K.kernels_available(x)


def test_unsupported_cases_return_none_even_when_available(monkeypatch):
    monkeypatch.setattr(K, "kernels_available", lambda x: True)
    x = torch.randn(4, 64)
    assert K.fused_token_topk(x.to(torch.int32), 10, True, None) is None  # dtype
    assert K.fused_token_topk(x, 0, True, None) is None  # k out of range
    assert K.fused_token_topk(x, 65, True, None) is None
    assert K.fused_block_topk(x, 4, 24, True, None) is None  # block not a power of two
    assert K.fused_block_topk(torch.randn(4, 48), 4, 32, True, None) is None  # 32 ∤ 48
    assert K.fused_token_topk(torch.randn(2, K.MAX_ROW + 1), 3, True, None) is None


@pytest.mark.parametrize("bad", [1, 17, 8.0, True, "8"])
def test_act_bits_errors_name_the_field(bad):
    with pytest.raises(ValueError, match="act_bits"):
        K.fused_token_topk(torch.randn(2, 8), 3, True, bad)


def test_disabled_flag_turns_kernels_off(monkeypatch):
    monkeypatch.setattr(K, "ENABLED", False)
    monkeypatch.setattr(K, "INTERPRET", True)
    assert not K.kernels_available(torch.randn(3))


def test_pack_unpack_roundtrip_and_padding():
    codes = torch.randint(-1, 2, (20, 37), dtype=torch.int8)  # [N, K], K not a multiple of 16
    packed = G.pack_ternary(codes)
    assert packed.shape == (3, 20) and packed.dtype == torch.int32
    assert torch.equal(G.unpack_ternary(packed, 37), codes)
    # padding inputs decode to weight 0
    assert (G.unpack_ternary(packed)[:, 37:] == 0).all()
    # bit layout: input 16g + 4s + j of output n in bits 8j+2s..8j+2s+1 of P[g, n], as code + 1
    one = torch.zeros(1, 16, dtype=torch.int8)
    one[0, 9] = 1  # s = 2, j = 1
    zeros = sum(1 << (8 * j + 2 * s) for j in range(4) for s in range(4))
    assert G.pack_ternary(one)[0, 0].item() == zeros + (1 << 12)


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="codes"):
        G.pack_ternary(torch.full((4, 16), 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="codes"):
        G.pack_ternary(torch.zeros(16, dtype=torch.int8))


def test_ternarize_matches_absmean_reference():
    w = torch.randn(48, 32)
    codes, alpha = G.ternarize(w)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    torch.testing.assert_close(codes.float() * alpha, absmean_ternarize(w, ste=False))


def _programs(cfg: G.GemvConfig, n: int) -> int:
    """Programs a batch-1 sparse GEMV launches for ``n`` padded output columns."""
    return -(-n // cfg.block_n) * cfg.split


@pytest.mark.parametrize("n", [2048, 4096, 6144, 8192, 10944, 11008, 14336, 32000])
@pytest.mark.parametrize("k", [256, 819, 1638, 2184, 4096])
def test_sparse_launch_shape_keeps_every_sm_busy(n: int, k: int):
    """What the shape rule is for (benchmarks/README.md): a batch-1 launch gives every SM a
    program whenever some allowed shape can (32- or 64-column programs, the kept-input list
    split in 4 only when each part keeps >= 512 rows); among shapes that do, it takes 64-column
    programs without a split (fewest programs reading each kept input); the program width
    divides the 64-aligned padded width."""
    cfg = G.sparse_config_for(4096, n, k)
    splits = (1, 4) if k // 4 >= 512 else (1,)
    shapes = [G.GemvConfig(block_n=b, split=s) for b in (32, 64) for s in splits]
    best = max(_programs(c, n) for c in shapes)
    assert cfg.split in splits and n % cfg.block_n == 0
    assert _programs(cfg, n) >= min(H100_SMS, best), (cfg, _programs(cfg, n), best)
    if _programs(G.GemvConfig(block_n=64), n) >= H100_SMS:
        assert (cfg.block_n, cfg.split) == (64, 1)
    batched = G.sparse_config_for(4096, n, k, batch=4)
    assert batched.block_k >= 16 and batched.split == 1  # tensor-core tiles: K of 16 or more


@needs_triton
def test_selection_warps_grow_with_the_row_width():
    """Warps of the one-program selection: a power of two in [8, 16], never fewer for a wider
    row; an explicit count wins."""
    widths = [256, 1024, 2048, 4096, 5460, 8192, 11008, 32768]
    warps = [G.select_warps_for(w) for w in widths]
    assert all(8 <= w <= 16 and w & (w - 1) == 0 for w in warps)
    assert warps == sorted(warps) and warps[0] < warps[-1]
    assert G.select_warps_for(5460, 4) == 4
    # one warp per 1024 lanes (8 at 8192 lanes, 16 at 16384)
    assert [G.select_warps_for(w, 0, 1024) for w in (4096, 5632, 8192, 11008)] == [8, 8, 8, 16]
    # the batch-1 list kernel: so up to 8192 inputs, WIDE_LIST_WARPS (32) above
    widths = (4096, 5632, 8192, 8193, 11008, 14336)
    assert [G.list_select_warps(w) for w in widths] == [8, 8, 8, 32, 32, 32]
    assert G.list_select_warps(11008, 8) == 8


def test_prepare_dense_rejects_bad_alignment():
    with pytest.raises(ValueError, match="align"):
        G.prepare_dense(torch.zeros(4, 4), align=0)


def test_gemv_references_against_hand_computation():
    torch.manual_seed(0)
    w = torch.randn(24, 40, dtype=torch.float64)
    x = torch.randn(3, 40, dtype=torch.float64)
    k = 10
    mask = torch.zeros_like(x, dtype=torch.bool)
    for b in range(3):  # hand top-k: sort by |x| descending, first k
        mask[b, x[b].abs().argsort(descending=True)[:k]] = True
    y = G.sparse_gemv_reference(x, G.prepare_dense(w, None, align=1), k)
    torch.testing.assert_close(y, (x * mask) @ w.t())
    yp = G.sparse_gemv_reference(x, G.prepare_dense(w), k)  # 24 columns padded to 64 (zeros)
    assert yp.shape == (3, 64) and torch.equal(yp[:, 24:], torch.zeros(3, 40, dtype=yp.dtype))
    torch.testing.assert_close(yp[:, :24], y)
    codes, alpha = G.ternarize(w)
    packed = G.pack_ternary(codes)
    yt = G.ternary_gemv_reference(x, packed, alpha, k, 8)
    xq = absmax_quantize(x, 8, ste=False) * topk_mask(x, k)
    torch.testing.assert_close(yt, xq @ (codes.double() * alpha).t())


def test_gemv_argument_errors():
    wt = torch.randn(16, 8)
    with pytest.raises(ValueError, match="x must be"):
        G.sparse_gemv(torch.randn(16), wt)
    with pytest.raises(ValueError, match="features"):
        G.sparse_gemv(torch.randn(1, 15), wt)
    with pytest.raises(ValueError, match="k must be"):
        G.sparse_gemv(torch.randn(1, 16), wt, k=17)
    with pytest.raises(ValueError, match="digit_bits"):
        G.sparse_gemv(torch.randn(1, 16), wt, 8, G.GemvConfig(digit_bits=0))
    with pytest.raises(ValueError, match="int32"):
        G.ternary_gemv(torch.randn(1, 16), torch.zeros(1, 16, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="features"):
        G.ternary_gemv(torch.randn(1, 40), torch.zeros(2, 16, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="act_bits"):
        G.ternary_gemv(torch.randn(1, 32), torch.zeros(2, 16, dtype=torch.int32), 1.0, act_bits=9)
    with pytest.raises(ValueError, match="alpha"):
        G.ternary_gemv(torch.randn(1, 32), torch.zeros(2, 16, dtype=torch.int32), torch.ones(3))


INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    import qsparse.kernels as K
    from qsparse.kernels import gemv as G
    from qsparse.nn.quant import absmax_quantize, absmean_ternarize
    from qsparse.nn.topk import block_topk_mask, topk_mask

    torch.manual_seed(0)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        x = (torch.randn(3, 5, 96) * 3).round().to(dt)  # many ties
        for k in (1, 38, 95):
            for ab in (None, 8):
                out = K.fused_token_topk(x, k, True, ab)
                vals = absmax_quantize(x, ab, ste=False) if ab else x
                torch.testing.assert_close(out, vals * topk_mask(x, k), rtol=1e-6, atol=0)
        for k in (1, 16, 31):
            out = K.fused_block_topk(x, k, 32, True, 8)
            ref = absmax_quantize(x, 8, ste=False) * block_topk_mask(x, k, 32)
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    x = torch.randn(4, 64, requires_grad=True)
    g = torch.randn(4, 64)
    K.fused_token_topk(x, 9, False, None).backward(g)
    assert torch.equal(x.grad, g * topk_mask(x, 9))
    out, mask = torch.ops.qsparse.token_topk(x.detach(), 9, 0, 1e-5, True)
    assert (mask.sum(-1) == 9).all()
    w = torch.randn(300, 70, dtype=torch.bfloat16)
    assert torch.equal(K.fused_ternary_weight(w), absmean_ternarize(w, ste=False))
    w = torch.randn(300, 70, requires_grad=True)  # straight-through: zero codes get grad too
    g = torch.randn(300, 70)
    K.fused_ternary_weight(w).backward(g)
    assert torch.equal(w.grad, g)
    wd = torch.randn(72, 80, dtype=torch.bfloat16)
    codes, alpha = G.ternarize(wd)
    packed = G.pack_ternary(codes)
    for b in (1, 3):
        x = ((torch.randn(b, 80) * 3).round() / 2).to(torch.bfloat16)  # many ties
        for k in (None, 30, 1):
            r = G.sparse_gemv_reference(x, G.prepare_dense(wd, None, align=1), k)
            # 3: split list summed by the last program; 64: two programs share each 64-wide
            # panel; None: row-major padded to 128 columns, or (align 1) with masked columns
            for split, layout, align in ((1, 32, 64), (3, 32, 64), (1, None, 64), (1, None, 1), (1, 64, 64)):
                wt = G.prepare_dense(wd, layout, align)
                cfg = G.GemvConfig(block_k=16, block_n=32, split=split)
                y = G.sparse_gemv(x, wt, k, cfg, n_out=72)
                torch.testing.assert_close(y, r, rtol=1e-2, atol=1e-2)
            for bits in (8, 4):
                for a in (alpha, torch.linspace(0.5, 1.5, 72)):
                    r = G.ternary_gemv_reference(x, packed, a, k, bits)
                    cfg = G.GemvConfig(block_k=2, block_n=32, digit_bits=4)
                    y = G.ternary_gemv(x, packed, a, k, bits, cfg)
                    torch.testing.assert_close(y, r, rtol=1e-2, atol=1e-2)
        for digit_bits in (4, 5, 8):  # radix digit widths: 16, 32 or 256 bins per pass
            idx, val, cnt = G.compact_rows(x, 30, digit_bits=digit_bits)
            mask = topk_mask(x, 30)
            n = int(cnt)
            assert torch.equal(idx[:n].long(), mask.any(0).nonzero().flatten())
            assert torch.equal(val[:, :n], (x.float() * mask)[:, idx[:n].long()])
    w2 = torch.randn(40, 37)  # K not a multiple of 16: padded group
    c2, a2 = G.ternarize(w2)
    p2 = G.pack_ternary(c2)
    x2 = torch.randn(2, 37)
    y2 = G.ternary_gemv(x2, p2, a2, 10, 8, G.GemvConfig(block_k=2, block_n=16))
    torch.testing.assert_close(y2, G.ternary_gemv_reference(x2, p2, a2, 10, 8), rtol=1e-4, atol=1e-4)
    for wt in (G.prepare_dense(wd), G.prepare_dense(wd, 96)):  # cfg=None: shape-chosen
        y = G.sparse_gemv(x[:1], wt, 30, n_out=72)
        r = G.sparse_gemv_reference(x[:1], G.prepare_dense(wd, None, align=1), 30)
        torch.testing.assert_close(y, r, rtol=1e-2, atol=1e-2)
    # the decode GEMVs run inside custom ops: dynamo traces a call whole (fullgraph=True)
    xs = torch.randn(1, 80, dtype=torch.bfloat16)
    wt32 = G.prepare_dense(wd, 32)

    def decode_step(x):
        cfg = G.GemvConfig(block_k=16, block_n=32)
        y = G.sparse_gemv(x, wt32, 30, cfg, n_out=72)
        return y + G.ternary_gemv(x, packed, alpha, 30, 8, G.GemvConfig(block_k=2, block_n=32))

    got = torch.compile(decode_step, fullgraph=True, backend="eager")(xs)
    torch.testing.assert_close(got, decode_step(xs))
    print("INTERPRETER OK")
    """
)


HINT_SCRIPT = textwrap.dedent(
    """
    import torch
    from qsparse.kernels import gemv as G
    from qsparse.nn.topk import topk_mask

    def check(x, k, hint):
        idx, val, cnt = G.compact_rows(x, k, hint=hint)
        m = topk_mask(x, k).bool()
        union, n = m.any(0), int(cnt)
        assert n == int(union.sum()) and torch.equal(idx[:n].long(), union.nonzero().flatten())
        assert torch.equal(val[:, :n], torch.where(m, x.float(), 0)[:, idx[:n].long()])
        packed = G.pack_ternary(torch.randint(-1, 2, (64, x.shape[1])).to(torch.int8))
        y = G.ternary_gemv(x, packed, 0.5, k, 8, hint=hint)
        r = G.ternary_gemv_reference(x, packed, 0.5, k, 8)
        torch.testing.assert_close(y.float(), r.float(), rtol=2e-2, atol=2e-2)

    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for width, k, bsz in ((300, 120, 1), (300, 120, 3)):
            x = torch.randn(bsz, width)
            x[:, :40] = x[:, 5:6]  # ties at the threshold
            x = x.to(dtype)
            # carried hints: none yet (0), the exact threshold moved inside the band (one
            # pass), and off the band either way (the full radix select)
            kth = x.float().abs().topk(k, dim=1).values[:, -1].view(torch.int32)
            low = 31 - G.KEY_BITS[dtype]
            for shift in (None, 0, -14, 14, 15, -(2**20)):
                hint = G.new_hint(4)
                if shift is not None:
                    hint[:bsz] = (kth >> low) + shift
                check(x, k, hint)
            hint = G.new_hint(4)
            for step in range(3):  # the hint carried from call to call
                check((x.float() * (1 + 0.01 * step)).to(dtype), k, hint)
    x = torch.randn(1, 300, dtype=torch.bfloat16)
    wd = torch.randn(72, 300, dtype=torch.bfloat16)
    hint = G.new_hint(1)
    for _ in range(2):
        y = G.sparse_gemv(x, G.prepare_dense(wd), 120, n_out=72, hint=hint)
        r = G.sparse_gemv_reference(x, G.prepare_dense(wd, None, align=1), 120)
        torch.testing.assert_close(y.float(), r.float(), rtol=2e-2, atol=2e-2)
    # batch 1, carried GEMV: the inputs above the carried band summed before the selection
    # is known, the rest from its list; on a miss (threshold above the band) sweep 1 dropped
    for dtype in (torch.bfloat16, torch.float32):
        wd = torch.randn(72, 300, dtype=dtype)
        x = torch.randn(1, 300)
        x[:, :40] = x[:, 5:6]  # ties at the threshold
        x = x.to(dtype)
        r = G.sparse_gemv_reference(x, G.prepare_dense(wd, None, align=1), 120)
        kth = x.float().abs().topk(120, dim=1).values[:, -1].view(torch.int32)
        low = 31 - G.KEY_BITS[dtype]
        for split in (1, 3):
            cfg = G.GemvConfig(block_k=16, block_n=32, split=split, carry=True)
            for shift in (None, 0, -14, -15, -300, 15, -(2**20)):  # -15, -300: misses
                hint = G.new_hint(1)
                if shift is not None:
                    hint[:1] = (kth >> low) + shift
                y = G.sparse_gemv(x, G.prepare_dense(wd), 120, cfg, n_out=72, hint=hint)
                torch.testing.assert_close(y.float(), r.float(), rtol=2e-2, atol=2e-2)
                assert int(hint[0]) == int(kth[0]) >> low  # the grid's last program set it
        # batch 2-16: top-k from the carried thresholds, values copied
        hint = G.new_hint(4)
        for step in range(2):
            xb = (torch.randn(3, 300) * (1 + step)).to(dtype)
            xb[:, :40] = xb[:, 5:6]
            for h in (None, hint):
                assert torch.equal(G.masked_topk(xb, 120, h), xb * topk_mask(xb, 120))
    print("HINT OK")
    """
)


EPS_SCRIPT = textwrap.dedent(
    """
    import torch
    import qsparse.kernels as K
    from qsparse.nn.linear import ActivationSparsifier
    from qsparse.nn.quant import absmax_quantize
    from qsparse.nn.topk import block_topk_mask, topk_mask

    torch.manual_seed(0)
    x = torch.randn(6, 64) * torch.logspace(-4, 0, 6)[:, None]  # rows with gamma below eps
    for eps in (1e-5, 0.05):
        q = absmax_quantize(x, 8, eps, ste=False)
        out = K.fused_token_topk(x, 20, True, 8, eps)
        torch.testing.assert_close(out, q * topk_mask(x, 20), rtol=1e-6, atol=0)
        out = K.fused_token_topk(x, 64, True, 8, eps)  # quantize only
        torch.testing.assert_close(out, q, rtol=1e-6, atol=0)
        out = K.fused_block_topk(x, 8, 16, True, 8, eps)
        torch.testing.assert_close(out, q * block_topk_mask(x, 8, 16), rtol=1e-6, atol=0)
    small = absmax_quantize(x, 8, 0.05, ste=False)
    assert not torch.equal(small, absmax_quantize(x, 8, 1e-5, ste=False))  # eps matters here
    # the sparsifier hands its eps (QuantConfig.eps) to the kernels
    for pattern, ratio in (("token_topk", 0.5), ("block_topk", 0.5), ("token_topk", 0.0)):
        sp = ActivationSparsifier(64, ratio, pattern=pattern, block_size=16, act_bits=8, eps=0.05)
        out = sp._fused(x, sp.keep())
        torch.testing.assert_close(out, sp._reference(x, sp.keep()), rtol=1e-6, atol=0)
    print("EPS OK")
    """
)


@needs_triton
def test_topk_kernels_use_the_configured_eps_in_the_triton_interpreter():
    """``QuantConfig.eps`` reaches the fused top-k (it was a fixed 1e-5): kernel == reference
    for two eps values, on rows whose max |x| is below eps."""
    from conftest import run_interpreted

    assert "EPS OK" in run_interpreted(EPS_SCRIPT, timeout=300)


BAND_WIDTH_SCRIPT = textwrap.dedent(
    """
    import torch
    from qsparse.kernels import gemv as G
    from qsparse.nn.topk import topk_mask

    K, k, half = 300, 120, 15  # 32 bins: bins 1..30 hold 2^e key values each

    def fits(d, e):
        return -(half << e) <= d < (half << e)

    def need(d):  # the narrowest band (0..3) that holds a threshold d keys away
        return next((e for e in range(3) if fits(d, e)), 3)

    def key_of(x):
        kth = x.float().abs().topk(k, dim=1).values[:, -1].view(torch.int32)
        return (kth >> (31 - G.KEY_BITS[x.dtype])).tolist()

    def check(x, hint):
        idx, val, cnt = G.compact_rows(x, k, hint=hint)
        m = topk_mask(x, k).bool()
        n = int(cnt)
        assert torch.equal(idx[:n].long(), m.any(0).nonzero().flatten())
        assert torch.equal(val[:, :n], torch.where(m, x.float(), 0)[:, idx[:n].long()])

    torch.manual_seed(0)
    x = torch.randn(1, K)
    x[:, :40] = x[:, 5:6]  # ties at the threshold
    x = x.to(torch.bfloat16)
    (t,) = key_of(x)
    # a carried word with a wide band: a hit inside it (two passes) or off it (radix), exact
    # either way; the new word holds the exact key and the width the rule gives
    for e in (1, 2, 3):
        w = half << e
        for d in (half << (e - 1), -(half << (e - 1)) - 1, w - 1, -w, w, -w - 1):
            hint = G.new_hint(1)
            hint[0] = (e << 28) | (t - d)
            check(x, hint)
            key, e_new, calm = (int(f[0]) for f in G.hint_fields(hint, x.dtype))
            assert key == t, (e, d, key, t)
            grown = max(e, need(d))
            assert e_new == grown, (e, d, e_new)
            assert calm == (1 if grown == e and fits(d, e - 1) else 0), (e, d, calm)
    # carried from call to call: no hint (radix, width 0), a jump (the band widens at once),
    # then steady calls (narrower by one after 8 in a row that a half-width band held)
    hint = G.new_hint(1)
    check(x, hint)
    assert [int(f[0]) for f in G.hint_fields(hint, x.dtype)] == [t, 0, 0]
    big = (x.float() * 1.5).to(torch.bfloat16)
    (t2,) = key_of(big)
    e = need(t2 - t)
    assert e >= 2, t2 - t
    check(big, hint)
    assert [int(f[0]) for f in G.hint_fields(hint, x.dtype)] == [t2, e, 0]
    for want in range(e - 1, -1, -1):
        for step in range(8):
            check(big, hint)
        key, e_now, calm = (int(f[0]) for f in G.hint_fields(hint, x.dtype))
        assert (key, e_now, calm) == (t2, want, 0), (key, e_now, calm, want)
    # every kernel that selects reads and writes the same word: ternary activations and the
    # batched top-k (one word per row)
    packed = G.pack_ternary(torch.randint(-1, 2, (64, K)).to(torch.int8))
    hint = G.new_hint(4)
    rows = torch.randn(3, K).to(torch.bfloat16)
    for scale in (1.0, 1.6, 1.6, 0.7):
        xb = (rows.float() * scale).to(torch.bfloat16)
        assert torch.equal(G.masked_topk(xb, k, hint), xb * topk_mask(xb, k))
    assert G.hint_fields(hint, torch.bfloat16)[1][:3].max() >= 2  # widened by the jumps
    h1 = G.new_hint(1)
    for scale in (1.0, 1.6, 1.6, 0.7):
        x1 = (rows[:1].float() * scale).to(torch.bfloat16)
        y = G.ternary_gemv(x1, packed, 0.5, k, 8, hint=h1)
        r = G.ternary_gemv_reference(x1, packed, 0.5, k, 8)
        torch.testing.assert_close(y.float(), r.float(), rtol=2e-2, atol=2e-2)
    # fp32 keys fill the word: the band stays one key value wide
    x32 = torch.randn(1, K)
    hint = G.new_hint(1)
    for scale in (1.0, 1.5, 1.5):
        check(x32 * scale, hint)
    assert int(hint[0]) == key_of(x32 * 1.5)[0]
    print("BAND OK")
    """
)


@needs_triton
def test_carried_band_widens_for_moving_thresholds_in_the_triton_interpreter():
    """The carried threshold's band: exact kept sets whatever the width and the hit, and the
    width rule (grow at once, shrink after 8 calm calls) read back from the hint word."""
    from conftest import run_interpreted

    assert "BAND OK" in run_interpreted(BAND_WIDTH_SCRIPT, timeout=300)


@needs_triton
def test_threshold_carry_matches_reference_in_the_triton_interpreter():
    from conftest import run_interpreted

    assert "HINT OK" in run_interpreted(HINT_SCRIPT, timeout=300)


@needs_triton
def test_kernels_match_references_in_the_triton_interpreter():
    from conftest import run_interpreted

    assert "INTERPRETER OK" in run_interpreted(INTERPRETER_SCRIPT, timeout=300)


PACKED_SCRIPT = textwrap.dedent(
    """
    import torch
    from qsparse.kernels import gemv as G

    torch.manual_seed(3)
    for width, k in ((300, 120), (1000, 1)):
        x = torch.randn(1, width)
        x[:, :40] = x[:, 5:6]  # ties at the threshold
        x = x.to(torch.bfloat16)
        norm_w = (1 + 0.1 * torch.randn(width)).to(torch.bfloat16)
        glu = torch.randn(1, 2 * width, dtype=torch.bfloat16)
        for xin, prod, pw in ((x, 0, None), (x, 1, norm_w), (glu, 2, None), (glu, 3, None)):
            idx, val, _ = G.compact_rows(xin, k, hint=G.new_hint(1), prod=prod, prod_w=pw, eps=1e-6)
            words, empty, cnt = G.compact_rows(
                xin, k, hint=G.new_hint(1), prod=prod, prod_w=pw, eps=1e-6, packed=True
            )
            assert int(cnt) == k and empty.numel() == 0
            assert torch.equal(words[:k] & 65535, idx[:k]), prod
            assert torch.equal((words[:k] & -65536).view(torch.float32), val[0, :k]), prod
        wd = torch.randn(72, width, dtype=torch.bfloat16)
        wt = G.prepare_dense(wd)
        ref = G.sparse_gemv_reference(x, G.prepare_dense(wd, None, align=1), k)
        ys = []
        for packed in (True, False):
            hint = G.new_hint(1)
            for _ in range(2):  # no hint yet, then the carried one
                y = G.sparse_gemv(x, wt, k, G.GemvConfig(packed=packed), n_out=72, hint=hint)
                torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
            ys.append(y)
        assert torch.equal(ys[0], ys[1])  # the same values summed in the same order
    for bad in (torch.randn(1, 64), torch.randn(2, 64, dtype=torch.bfloat16)):
        try:
            G.compact_rows(bad, 8, packed=True)
        except ValueError as e:
            assert "packed=True" in str(e)
        else:
            raise AssertionError("packed=True accepted " + str((bad.dtype, bad.shape)))
    print("PACKED OK")
    """
)


@needs_triton
def test_packed_kept_list_matches_the_two_lists_in_the_triton_interpreter():
    """Batch 1, bf16: the list as one word per kept input (``GemvConfig.packed``, the default)
    holds the indices and values of the two-list form for every producer, and the GEMV on it
    gives the same output bit for bit; other inputs are refused by name."""
    from conftest import run_interpreted

    assert "PACKED OK" in run_interpreted(PACKED_SCRIPT, timeout=300)


BISECTION_SCRIPT = textwrap.dedent(
    """
    import torch
    from qsparse.kernels import gemv as G
    from qsparse.nn.topk import topk_mask

    torch.manual_seed(1)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for b in (1, 3):
            x = ((torch.randn(b, 80) * 3).round() / 2).to(dt)  # many ties
            x[0, :5] = 0  # zeros and exact ties at the threshold
            for k in (1, 30, 79):
                mask = topk_mask(x, k)
                for bits in (1, 2, 3):  # one or several candidate bits per bisection pass
                    idx, val, cnt = G.compact_rows(x, k, radix=False, bits_per_pass=bits)
                    n = int(cnt)
                    assert torch.equal(idx[:n].long(), mask.any(0).nonzero().flatten()), (dt, b, k, bits)
                    assert torch.equal(val[:, :n], (x.float() * mask)[:, idx[:n].long()])
                thr, cut, gamma = G.select_rows(x, k)
                key = x.float().abs().view(torch.int32).long()
                i = torch.arange(x.shape[1])
                kept = (key > thr[:, None]) | ((key == thr[:, None]) & (i <= cut[:, None]))
                assert torch.equal(kept, mask), (dt, b, k)
                assert torch.equal(gamma, x.float().abs().amax(-1))
    print("BISECTION OK")
    """
)


@needs_triton
def test_bisection_selection_matches_topk_in_the_triton_interpreter():
    """The bisection path of the shared top-k rule (``compact_rows(radix=False)`` at 1-3 bits
    per pass, ``select_rows``) keeps exactly ``topk_mask``'s entries, ties to the lower index,
    in every dtype and at batch 1 and 3."""
    from conftest import run_interpreted

    assert "BISECTION OK" in run_interpreted(BISECTION_SCRIPT, timeout=300)


#: where ``make install`` puts the GPU image's Triton (Makefile ``GPU_TRITON``)
GPU_TRITON_DIR = ROOT / ".triton-gpu"


def _gpu_image_triton() -> str | None:
    """The version of the Triton in :data:`GPU_TRITON_DIR`, or None where there is none."""
    infos = sorted(GPU_TRITON_DIR.glob("triton-*.dist-info"))
    if not infos or not (GPU_TRITON_DIR / "triton").is_dir():
        return None
    return infos[-1].name.removeprefix("triton-").removesuffix(".dist-info")


@needs_triton
@pytest.mark.parametrize("triton_build", ["installed", "gpu-image"])
def test_every_kernel_launch_compiles_for_hopper_without_a_gpu(triton_build):
    """The installed Triton (the one the pinned torch brings) and the GPU image's Triton (put in
    ``.triton-gpu`` by ``make install``; the two differ, e.g. in how a nested ``@triton.jit``
    helper takes a constexpr default) each build every launch qsparse makes down to sm_90
    cubin: decode GEMVs (incl. PDL, inline dp4a/fence PTX, the pipelined loop), training
    top-k and the ternary weight kernel."""
    path = str(ROOT)
    version = None
    if triton_build == "gpu-image":
        version = _gpu_image_triton()
        if version is None:
            pytest.skip(f"no Triton in {GPU_TRITON_DIR} (make install puts the GPU image's there)")
        path = f"{GPU_TRITON_DIR}{os.pathsep}{path}"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "kernel_compile_check.py")],
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert int(last.split()[0]) >= 20, proc.stdout
    if version is not None:
        assert f"(Triton {version}," in last, last  # that Triton, not the venv's, compiled


@needs_triton
def test_compact_rows_rejects_bad_digit_bits():
    with pytest.raises(ValueError, match="digit_bits"):
        G.compact_rows(torch.randn(1, 16), 8, digit_bits=9)


def test_gemv_config_round_trips_through_the_custom_op_encoding():
    for cfg in (
        G.GemvConfig(),
        G.GemvConfig(use_dot=True, radix=False, pdl=False),
        G.TERNARY_CONFIG,
    ):
        assert G._cfg_from_ints(G._cfg_ints(cfg)) == cfg


def test_sparse_gemv_default_config_fits_the_panel_width(monkeypatch):
    """cfg=None picks the launch shape from the weight: a program width dividing the panel."""
    seen = []

    def fake_op(*args):
        seen.append(G._cfg_from_ints(args[7]))
        return torch.zeros(1, 128)

    monkeypatch.setattr(G, "sparse_gemv_op", fake_op)
    x = torch.randn(1, 80)
    for layout, width in ((96, 32), (64, 32), (16, 16), (None, 32)):
        G.sparse_gemv(x, G.prepare_dense(torch.randn(72, 80), layout), 30, n_out=72)
        assert seen[-1].block_n == width


PRODUCER_SCRIPT = textwrap.dedent(
    """
    import torch
    from qsparse.kernels import gemv as G
    from qsparse.nn.topk import topk_mask

    torch.manual_seed(0)
    K, k = 300, 120
    for dtype in (torch.bfloat16, torch.float32):
        for kind in ("rmsnorm", "relu2_glu", "silu_glu"):
            w = (torch.rand(K) + 0.5).to(dtype) if kind == "rmsnorm" else None
            prod = G.Producer(kind, w, 1e-6)
            hint = G.new_hint(4)
            for step in range(2):  # the second call starts from the carried thresholds
                x = torch.randn(3, prod.width(K)) * (1 + 0.1 * step)
                x[:, :40] = x[:, 5:6]  # ties at the threshold
                x = x.to(dtype)
                v = prod.reference(x)
                got = G.masked_topk(x, k, hint, producer=prod)
                assert ((got != 0).sum(1) == k).all()
                if dtype == torch.float32 and kind != "relu2_glu":  # sum order, exp: last ulps
                    torch.testing.assert_close(got, v * (got != 0), rtol=1e-6, atol=1e-6)
                else:  # each step rounded as the torch modules round it: the same values
                    assert torch.equal(got, v * topk_mask(v, k)), (dtype, kind)
                wd = torch.randn(72, K, dtype=dtype)
                y = G.sparse_gemv(x[:1], G.prepare_dense(wd), k, n_out=72, hint=hint, producer=prod)
                r = G.sparse_gemv_reference(v[:1], G.prepare_dense(wd, None, align=1), k)
                torch.testing.assert_close(y.float(), r.float(), rtol=2e-2, atol=2e-2)
    # ternary, batch 2-16, split over the words and on int8 tensor cores: the same sums
    for bsz, kin, n in ((2, 200, 96), (5, 520, 130)):
        packed = G.pack_ternary(torch.randint(-1, 2, (n, kin), dtype=torch.int8))
        x = torch.randn(bsz, kin)
        for k in (None, 90):
            dp4a = G.ternary_gemv(x, packed, 0.7, k, 8, cfg=G.TERNARY_BATCH_CONFIG)
            ref = G.ternary_gemv_reference(x, packed, 0.7, k, 8)
            for split in (1, 3):
                for dot in (True, False):  # tensor cores / dp4a, words split over programs
                    cfg = G.GemvConfig(block_k=2, block_n=32, split=split, use_dot=dot)
                    y = G.ternary_gemv(x, packed, 0.7, k, 8, cfg=cfg)
                    if split == 1:
                        assert torch.equal(y, dp4a)
                    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # the default launch at batch > 1 splits the words of a narrow output over programs
    packed = G.pack_ternary(torch.randint(-1, 2, (32, 4096), dtype=torch.int8))
    assert G.ternary_config_for(3, False, 32, 4096).split == 2
    x = torch.randn(3, 4096)
    for k in (None, 1500):
        y = G.ternary_gemv(x, packed, 0.7, k, 8)
        ref = G.ternary_gemv_reference(x, packed, 0.7, k, 8)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # the ternary activation kernel computes the site input itself: the layer's producer,
    # then BitNet's SubLN (torch.nn.RMSNorm's arithmetic): the same codes, the same output
    for dtype in (torch.float32, torch.bfloat16):
        for kind in ("none", "rmsnorm", "silu_glu"):
            K, N = 200, 96
            packed = G.pack_ternary(torch.randint(-1, 2, (N, K), dtype=torch.int8))
            w = (torch.rand(K) + 0.5).to(dtype) if kind == "rmsnorm" else None
            prod = G.Producer(kind, w, 1e-6)
            norm = torch.nn.RMSNorm(K, eps=1e-6).to(dtype)
            with torch.no_grad():
                norm.weight.copy_(torch.rand(K) * 2)
            sub = G.SubLN(norm.weight.detach(), 1e-6)
            for bsz in (1, 3):
                x = (torch.randn(bsz, prod.width(K)) * 3).to(dtype)
                v = norm(prod.reference(x)).detach()
                for k in (None, 90):
                    ref = G.ternary_gemv(v, packed, 0.7, k, 8)
                    got = G.ternary_gemv(x, packed, 0.7, k, 8, producer=prod, subln=sub)
                    if dtype == torch.bfloat16:  # v rounded to bf16 both ways: same codes
                        assert torch.equal(got, ref), (dtype, kind, bsz, k)
                    else:  # fp32 sum order: a code at a rounding boundary may move by one
                        step = 0.7 * v.abs().amax(-1, keepdim=True) / 127
                        assert ((got - ref).abs() <= 2.01 * step).all(), (kind, bsz, k)
    print("PRODUCER OK")
    """
)


@needs_triton
def test_fused_producers_and_ternary_mma_match_references_in_the_triton_interpreter():
    """Selection kernels that compute their input (RMSNorm, ReLU^2/SiLU GLU) keep the top-k
    of the reference's values; the tensor-core ternary GEMV equals the dp4a one (~20 s)."""
    from conftest import run_interpreted

    assert "PRODUCER OK" in run_interpreted(PRODUCER_SCRIPT, timeout=300)
