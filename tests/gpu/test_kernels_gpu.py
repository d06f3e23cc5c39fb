"""GPU tier: every Triton kernel against its PyTorch reference on fresh random inputs.

Run with ``pytest -m gpu tests/gpu``. Masks must match exactly (ties to the lower index), every
row keeps exactly k, values agree to rel. error <= 1e-2 in bf16 (they are bit-exact in practice).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import qsparse.kernels as K
from qsparse.kernels import gemv as G
from qsparse.nn.quant import absmax_quantize, absmean_ternarize
from qsparse.nn.topk import block_topk_mask, topk_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def fresh(shape, dtype, ties: bool = False) -> torch.Tensor:
    """Random normal data; with ``ties`` a coarse grid so many |x| are equal."""
    x = torch.randn(shape, device="cuda", dtype=torch.float32)
    if ties:
        x = (x * 4).round() / 4
    return x.to(dtype)


def reference(x, mask, act_bits):
    vals = absmax_quantize(x, act_bits, ste=False) if act_bits else x
    return vals * mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8192, 2048), (37, 5460), (3, 5, 1000), (4, 11008)])
@pytest.mark.parametrize("act_bits", [None, 8])
@pytest.mark.parametrize("ties", [False, True])
def test_token_topk_matches_reference(dtype, shape, act_bits, ties):
    x = fresh(shape, dtype, ties)
    d = shape[-1]
    for k in (1, int(0.4 * d), d - 1):
        out = K.fused_token_topk(x, k, True, act_bits)
        assert out is not None and out.dtype == dtype and out.shape == x.shape
        mask = topk_mask(x, k)
        ref = reference(x, mask, act_bits)
        assert torch.equal(out != 0, ref != 0), "selection differs from the reference"
        assert rel_err(out, ref) <= 1e-2
        if act_bits is None:
            assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 32, 64])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_block_topk_matches_reference(dtype, block_size, act_bits):
    x = fresh((1000, 2048), dtype, ties=True)
    for k in (1, block_size // 2, block_size - 1):
        out = K.fused_block_topk(x, k, block_size, True, act_bits)
        mask = block_topk_mask(x, k, block_size)
        ref = reference(x, mask, act_bits)
        assert torch.equal(out != 0, ref != 0)
        assert rel_err(out, ref) <= 1e-2


def test_exactly_k_per_row_from_the_no_ste_mask():
    x = fresh((513, 2048), torch.bfloat16, ties=True)
    k = 819
    out, mask = torch.ops.qsparse.token_topk(x, k, 0, 1e-5, True)
    assert (mask.sum(-1) == k).all()
    assert torch.equal(mask, topk_mask(x, k))
    _, bmask = torch.ops.qsparse.block_topk(x, 16, 32, 0, 1e-5, True)
    assert (bmask.view(513, -1, 32).sum(-1) == 16).all()


@pytest.mark.parametrize("ste", [True, False])
def test_backward(ste):
    x = fresh((64, 1024), torch.bfloat16).requires_grad_()
    g = fresh((64, 1024), torch.bfloat16)
    K.fused_token_topk(x, 300, ste, 8).backward(g)
    expected = g if ste else g * topk_mask(x, 300)
    assert torch.equal(x.grad, expected)


def test_compiles_without_graph_break():
    def f(x):
        return (
            K.fused_token_topk(x * 2, 100, True, 8).sum()
            + K.fused_block_topk(x, 16, 32, False, None).sum()
        )

    x = fresh((128, 512), torch.bfloat16).requires_grad_()
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x)
    out.backward()
    torch.testing.assert_close(out, f(x.detach()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ternary_weight(dtype):
    w = fresh((5632, 2048), dtype).requires_grad_()
    q = K.fused_ternary_weight(w)
    ref = absmean_ternarize(w.detach(), ste=False)
    # the codes agree except where w/a sits on a rounding boundary (a summed in another order)
    assert (torch.sign(q) != torch.sign(ref)).float().mean().item() < 1e-5
    assert (
        set(q.unique().abs().tolist()) <= {0.0, ref.abs().max().item()} or dtype != torch.bfloat16
    )
    assert rel_err(q, ref) <= 1e-2
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("batch", [1, 2, 5, 8])
@pytest.mark.parametrize("k_frac", [None, 0.4, 0.1])
@pytest.mark.parametrize("split,pdl", [(1, True), (3, False), (2, True), (1, False)])
def test_sparse_gemv(batch, k_frac, split, pdl):
    w = fresh((11008, 4096), torch.bfloat16) * 0.02
    wt = G.prepare_dense(w)
    x = fresh((batch, 4096), torch.bfloat16, ties=True)
    k = None if k_frac is None else int(k_frac * 4096)
    cfg = G.GemvConfig(split=split, pdl=pdl)
    for _ in range(3):  # fresh inputs each time: the atomics path must not depend on order
        y = G.sparse_gemv(x, wt, k, cfg)
        assert rel_err(y, G.sparse_gemv_reference(x, wt, k)) <= 1e-2
        x = fresh((batch, 4096), torch.bfloat16, ties=True)


@pytest.mark.parametrize("n", [5460, 3000])
@pytest.mark.parametrize("layout,align", [(None, 64), (None, 1), (64, 64)])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("stages", [1, 3])
def test_sparse_gemv_ragged_columns_and_layouts(n, layout, align, batch, stages):
    """Column counts that are not a multiple of 64: padded row-major, unpadded row-major
    (masked columns) and panels, with and without the software-pipelined loop."""
    w = fresh((n, 2048), torch.bfloat16) * 0.02
    wt = G.prepare_dense(w, layout, align)
    x = fresh((batch, 2048), torch.bfloat16, ties=True)
    cfg = G.GemvConfig(num_stages=stages)
    y = G.sparse_gemv(x, wt, 819, cfg, n_out=n)
    ref = G.sparse_gemv_reference(x, G.prepare_dense(w, None, align=1), 819)
    assert y.shape == (batch, n)
    assert rel_err(y, ref) <= 1e-2


@pytest.mark.parametrize("kin,n", [(2048, 6144), (2048, 2048), (2048, 10920), (5460, 2048)])
def test_sparse_gemv_default_config_on_decode_shapes(kin, n):
    """cfg=None (sparse_config_for): 32/64-column programs and the 4-way split list on the
    1.3B projection shapes, padded row-major weights."""
    w = fresh((n, kin), torch.bfloat16) * 0.02
    x = fresh((1, kin), torch.bfloat16, ties=True)
    k = int(0.4 * kin)
    y = G.sparse_gemv(x, G.prepare_dense(w), k, n_out=n)
    ref = G.sparse_gemv_reference(x, G.prepare_dense(w, None, align=1), k)
    assert rel_err(y, ref) <= 1e-2


def test_select_rows_matches_mask():
    x = fresh((8, 5460), torch.bfloat16, ties=True)
    k = 2184
    thr, cut, gamma = G.select_rows(x, k)
    key = x.float().abs().view(torch.int32)
    idx = torch.arange(5460, device="cuda")
    keep = (key > thr[:, None]) | ((key == thr[:, None]) & (idx <= cut[:, None]))
    assert torch.equal(keep, topk_mask(x, k))
    torch.testing.assert_close(gamma, x.float().abs().amax(-1))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("digit_bits", [4, 5, 8])
def test_compact_rows_lists_exactly_the_kept_inputs(batch, dtype, digit_bits):
    x = fresh((batch, 5460), dtype, ties=True)
    k = 2184
    idx, val, cnt = G.compact_rows(x, k, digit_bits=digit_bits)
    mask = topk_mask(x, k)
    union = mask.any(0)
    n = int(cnt.item())
    assert n == int(union.sum())
    assert torch.equal(idx[:n].long(), union.nonzero().flatten())
    assert torch.equal(val[:, :n], (x.float() * mask)[:, idx[:n].long()])


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("k_frac", [None, 0.4])
@pytest.mark.parametrize("act_bits", [8, 4, None])
@pytest.mark.parametrize("kin", [2048, 2040])
@pytest.mark.parametrize("pdl", [True, False])
def test_ternary_gemv(batch, k_frac, act_bits, kin, pdl):
    n = 5460
    codes, alpha = G.ternarize(fresh((n, kin), torch.bfloat16))
    packed = G.pack_ternary(codes)
    assert torch.equal(G.unpack_ternary(packed, kin), codes)
    x = fresh((batch, kin), torch.bfloat16)
    k = None if k_frac is None else int(k_frac * kin)
    alpha_cols = torch.full((n,), alpha, device="cuda") * torch.linspace(0.5, 1.5, n, device="cuda")
    for a in (alpha, alpha_cols):
        y = G.ternary_gemv(
            x, packed, a, k, act_bits, G.GemvConfig(block_k=128, block_n=32, pdl=pdl)
        )
        ref = G.ternary_gemv_reference(x, packed, a, k, act_bits)
        assert y.shape == (batch, n)
        assert rel_err(y, ref) <= 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kin", [4096, 11008])
def test_carried_threshold_keeps_the_exact_selection(dtype, batch, kin):
    """``hint=``: the threshold carried over calls (hits when the rows move little, misses
    when they jump, ties at the threshold, hits in the band widened by a jump) selects
    exactly what the reference selects."""
    k = int(0.4 * kin)
    wt = G.prepare_dense(fresh((1000, kin), dtype))
    packed = G.pack_ternary(G.ternarize(fresh((1000, kin), torch.bfloat16))[0])
    hint = G.new_hint(16, "cuda")
    base = fresh((batch, kin), dtype)
    steps = ((1.0, False), (1.01, False), (1.02, True), (7.0, False), (1.0, False), (1.3, False))
    for scale, ties in steps:
        x = (base.float() * scale).to(dtype)
        if ties:
            x = fresh((batch, kin), dtype, ties=True)
        idx, val, cnt = G.compact_rows(x, k, hint=hint)
        m = topk_mask(x, k).bool()
        union, n = m.any(0), int(cnt)
        assert n == int(union.sum())
        assert torch.equal(idx[:n].long(), union.nonzero().flatten())
        if batch == 1:
            y = G.sparse_gemv(x, wt, k, n_out=1000, hint=hint)
            assert rel_err(y, G.sparse_gemv_reference(x, wt, k)[:, :1000]) <= 1e-2
        y = G.ternary_gemv(x, packed, 0.5, k, 8, hint=hint)
        assert rel_err(y, G.ternary_gemv_reference(x, packed, 0.5, k, 8)) <= 1e-2
    if dtype != torch.float32:  # the jumps widened the band (fp32 keys leave no room for it)
        assert int(G.hint_fields(hint, dtype)[1][:batch].min()) == 3


@pytest.mark.parametrize("batch", [2, 8, 16])
@pytest.mark.parametrize("k_frac", [None, 0.4])
def test_ternary_gemv_default_batch_config(batch, k_frac):
    kin, n = 4096, 12288
    packed = G.pack_ternary(G.ternarize(fresh((n, kin), torch.bfloat16))[0])
    x = fresh((batch, kin), torch.bfloat16)
    k = None if k_frac is None else int(k_frac * kin)
    y = G.ternary_gemv(x, packed, 0.5, k, 8)  # cfg=None: ternary_split_config
    assert rel_err(y, G.ternary_gemv_reference(x, packed, 0.5, k, 8)) <= 1e-2


def test_decode_gemvs_replay_in_a_cuda_graph():
    """Programmatic dependent launches (selection -> GEMV) captured into a CUDA graph give the
    reference result for inputs written after capture."""
    w = fresh((3000, 2048), torch.bfloat16) * 0.02
    wt = G.prepare_dense(w)
    codes, alpha = G.ternarize(w)
    packed = G.pack_ternary(codes)
    x = fresh((1, 2048), torch.bfloat16)
    k = 819
    calls = [
        lambda: G.sparse_gemv(x, wt, k, G.GemvConfig(pdl=True)),
        lambda: G.sparse_gemv(x, wt, k, G.GemvConfig(split=2, pdl=True)),
        lambda: G.ternary_gemv(x, packed, alpha, None, 8, G.GemvConfig(pdl=True)),
        lambda: G.ternary_gemv(x, packed, alpha, k, 8, G.GemvConfig(pdl=True)),
    ]
    for fn in calls:
        fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn() for fn in calls]
    for _ in range(3):
        x.copy_(fresh((1, 2048), torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        refs = [
            G.sparse_gemv_reference(x, wt, k),
            G.sparse_gemv_reference(x, wt, k),
            G.ternary_gemv_reference(x, packed, alpha, None, 8),
            G.ternary_gemv_reference(x, packed, alpha, k, 8),
        ]
        for out, ref in zip(outs, refs, strict=True):
            assert rel_err(out, ref[:, : out.shape[1]]) <= 1e-2


def test_decode_gemvs_compile_without_graph_break():
    w = fresh((3000, 2048), torch.bfloat16) * 0.02
    wt = G.prepare_dense(w)
    codes, alpha = G.ternarize(w)
    packed = G.pack_ternary(codes)
    k = 819

    def step(x):
        y = G.sparse_gemv(x, wt, k, n_out=3000)
        return y + G.ternary_gemv(x, packed, alpha, k, 8)

    x = fresh((1, 2048), torch.bfloat16)
    got = torch.compile(step, fullgraph=True)(x)
    ref = G.sparse_gemv_reference(x, wt, k)[:, :3000] + G.ternary_gemv_reference(
        x, packed, alpha, k, 8
    )
    assert rel_err(got, ref) <= 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kin, n", [(4096, 4096), (11008, 4096)])
@pytest.mark.parametrize("split", [None, 3])
def test_carried_gemv_matches_reference_through_hits_and_misses(dtype, kin, n, split):
    """Batch 1 with ``hint=``: the GEMV that starts above the carried band before the selection
    is known (hint absent, hit, threshold jumping above or below the band, ties) equals the
    reference and leaves the exact new threshold in the hint."""
    k = int(0.4 * kin)
    wt = G.prepare_dense(fresh((n, kin), dtype) * 0.02)
    cfg = (
        G.sparse_config_for(kin, wt.shape[1], k, carry=True)
        if split is None
        else G.GemvConfig(block_n=32, split=split, carry=True)
    )
    hint = G.new_hint(16, "cuda")
    low = 31 - G.KEY_BITS[dtype]
    base = fresh((1, kin), dtype)
    # hit, hit, a miss undone (threshold 15% up), ties, a miss dropped (5x), far below
    steps = ((1.0, False), (1.01, False), (1.15, False), (1.0, True), (5.0, False), (0.2, False))
    for scale, ties in steps:
        x = fresh((1, kin), dtype, ties=True) if ties else (base.float() * scale).to(dtype)
        y = G.sparse_gemv(x, wt, k, cfg, n_out=n, hint=hint)
        assert rel_err(y, G.sparse_gemv_reference(x, wt, k)[:, :n]) <= 1e-2
        kth = x.float().abs().topk(k, dim=1).values[0, -1].view(torch.int32)
        assert int(hint[0]) == int(kth) >> low


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [2, 16])
def test_masked_topk_is_exact_with_and_without_carried_thresholds(dtype, batch):
    hint = G.new_hint(16, "cuda")
    base = fresh((batch, 11008), dtype)
    for scale, ties in ((1.0, False), (1.02, False), (1.0, True), (6.0, False)):
        x = fresh((batch, 11008), dtype, ties=True) if ties else (base.float() * scale).to(dtype)
        ref = x * topk_mask(x, 4403)
        for h in (None, hint):
            assert torch.equal(G.masked_topk(x, 4403, h), ref)


def test_carried_gemv_replays_in_a_cuda_graph():
    """The carried GEMV (programmatic dependent of its selection, semaphores, the hint updated
    by the grid's last program) captured once and replayed on new inputs."""
    w = fresh((4096, 11008), torch.bfloat16) * 0.02
    wt = G.prepare_dense(w)
    x = fresh((1, 11008), torch.bfloat16)
    hint = G.new_hint(16, "cuda")
    k = 4403
    cfg = G.sparse_config_for(11008, wt.shape[1], k, carry=True)
    G.sparse_gemv(x, wt, k, cfg, hint=hint)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = G.sparse_gemv(x, wt, k, cfg, hint=hint)
    base = fresh((1, 11008), torch.bfloat16)
    for scale in (1.0, 1.01, 0.99, 3.0, 1.0):
        x.copy_((base.float() * scale).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, G.sparse_gemv_reference(x, wt, k)) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "kind, width", [("rmsnorm", 4096), ("relu2_glu", 11008), ("silu_glu", 11008)]
)
@pytest.mark.parametrize("batch", [1, 2, 8])
def test_fused_producer_selection_matches_reference(dtype, kind, width, batch):
    """The selection kernels computing their input (RMSNorm, act(g) * u) keep exactly k of the
    values the torch modules compute: the same values and kept set, up to the last-ulp
    differences of a reduction order / exp (RMSNorm, SiLU: a few entries at most)."""
    w = (torch.rand(width, device="cuda") + 0.5).to(dtype) if kind == "rmsnorm" else None
    prod = G.Producer(kind, w, 1e-6)
    k = int(0.4 * width)
    hint = G.new_hint(16, "cuda")
    wd = fresh((1024, width), dtype) * 0.02
    wt = G.prepare_dense(wd)
    for scale in (1.0, 1.02, 3.0):  # carried thresholds: inside and off the band
        x = fresh((batch, prod.width(width)), dtype) * scale
        v = prod.reference(x)
        ref = v * topk_mask(v, k)
        got = G.masked_topk(x, k, hint, producer=prod)
        assert ((got != 0).sum(1) == k).all()
        differ = int(((got != 0) != (ref != 0)).sum())  # kept sets
        if kind == "relu2_glu":
            assert differ == 0 and torch.equal(got, ref)
        else:
            assert differ <= 4 * batch, differ
            if dtype == torch.bfloat16:
                assert int((got != ref).sum()) <= 4 * batch
            torch.testing.assert_close(got, v * (got != 0), rtol=1e-5, atol=1e-6)
        if batch == 1:
            y = G.sparse_gemv(x, wt, k, n_out=1024, hint=hint, producer=prod)
            assert rel_err(y, G.sparse_gemv_reference(v, wt, k)) <= 1e-2


@pytest.mark.parametrize("batch", [2, 5, 16])
@pytest.mark.parametrize("kin, n", [(4096, 4096), (11008, 4096), (4096, 12288)])
@pytest.mark.parametrize("k_frac", [None, 0.4])
def test_ternary_split_and_tensor_core_gemv_match_dp4a_and_reference(batch, kin, n, k_frac):
    packed = G.pack_ternary(G.ternarize(fresh((n, kin), torch.bfloat16))[0])
    x = fresh((batch, kin), torch.bfloat16)
    k = None if k_frac is None else int(k_frac * kin)
    dp4a = G.ternary_gemv(x, packed, 0.5, k, 8, cfg=G.TERNARY_BATCH_CONFIG)  # split 1
    mma = G.ternary_gemv(x, packed, 0.5, k, 8, cfg=G.TERNARY_MMA_CONFIG)
    assert torch.equal(mma, dp4a)  # the same integer sums, scaled alike
    ref = G.ternary_gemv_reference(x, packed, 0.5, k, 8)
    for split in (2, 4):  # dp4a and tensor cores, words split over programs
        for cfg in (G.TERNARY_BATCH_CONFIG, G.TERNARY_MMA_CONFIG):
            y = G.ternary_gemv(x, packed, 0.5, k, 8, cfg=replace(cfg, split=split))
            assert rel_err(y, ref) <= 1e-2
    y = G.ternary_gemv(x, packed, 0.5, k, 8, cfg=G.ternary_split_config(n, kin))
    assert rel_err(y, ref) <= 1e-2


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kin, n", [(4096, 12288), (4096, 4096), (11008, 4096)])
@pytest.mark.parametrize("kind", ["none", "rmsnorm"])
@pytest.mark.parametrize("k_frac", [None, 0.4])
def test_ternary_gemv_computes_producer_and_subln(batch, kin, n, kind, k_frac):
    """BitNet decode sites: the activation kernel computes the layer's RMSNorm and the SubLN
    from the raw input; against the same GEMV on the input normalized by torch."""
    packed = G.pack_ternary(G.ternarize(fresh((n, kin), torch.bfloat16))[0])
    w = fresh((kin,), torch.bfloat16).abs() + 0.5 if kind == "rmsnorm" else None
    prod = G.Producer(kind, w, 1e-6)
    sub = G.SubLN(fresh((kin,), torch.bfloat16).abs() + 0.5, 1e-6)
    x = fresh((batch, kin), torch.bfloat16) * 3
    k = None if k_frac is None else int(k_frac * kin)
    v = sub.reference(prod.reference(x))
    ref = G.ternary_gemv(v, packed, 0.5, k, 8)
    got = G.ternary_gemv(x, packed, 0.5, k, 8, producer=prod, subln=sub)
    assert rel_err(got, ref) <= 1e-2
    assert rel_err(got, G.ternary_gemv_reference(v, packed, 0.5, k, 8)) <= 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(11008, 4096), (4096, 22016), (5460, 2048), (2048, 10920)])
def test_ternary_rows_gemv_matches_reference(dtype, shape):
    """The input-major sparse ternary GEMV (batch 1, S=0.6) against the K-packed reference on
    the same codes, fresh inputs with ties: exact int32 sums, so only the float scaling and
    the output rounding differ (fp32: 1e-4 leaves room for a TF32 reference); launch shapes
    from the benchmark's sweep, a carried threshold, and the fused RMSNorm."""
    from qsparse.kernels import ternary_rows as TR

    kin, n = shape
    k = int(0.4 * kin)
    codes = torch.randint(-1, 2, (n, kin), dtype=torch.int8, device="cuda")
    rows, packed = TR.pack_ternary_rows(codes), G.pack_ternary(codes)
    alpha = torch.rand(16 * rows.shape[1], device="cuda") + 0.5
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    cfgs = [None] + [
        TR.ternary_rows_config_for(
            16 * rows.shape[1],
            k,
            G.GemvConfig(block_k=bk, block_n=bn, num_warps=w, num_stages=s),
            p,
        )
        for bk, bn, w, s, p in [
            (64, 128, 4, 3, 528),
            (128, 256, 8, 3, 528),
            (128, 128, 8, 1, 528),
            (32, 128, 4, 3, 1056),
        ]
    ]
    hint = G.new_hint(1, "cuda")
    for cfg in cfgs:
        for _ in range(2):
            x = fresh((1, kin), dtype, ties=True)
            ref = G.ternary_gemv_reference(x, packed, alpha[:n], k, 8)
            for h in (None, hint):
                got = TR.ternary_rows_gemv(x, rows, alpha, k, cfg=cfg, hint=h, n_out=n)
                assert got.dtype == dtype and rel_err(got, ref) <= tol, (cfg, rel_err(got, ref))
    norm = G.Producer("rmsnorm", (torch.rand(kin, device="cuda") + 0.5).to(dtype), 1e-6)
    x = fresh((1, kin), dtype)
    ref = G.ternary_gemv_reference(norm.reference(x), packed, alpha[:n], k, 8)
    got = TR.ternary_rows_gemv(x, rows, alpha, k, hint=hint, producer=norm, n_out=n)
    assert rel_err(got, ref) <= tol


@pytest.mark.parametrize(("kin", "n"), [(4096, 12288), (11008, 4096), (2048, 6144), (576, 1536)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_threshold_gemv_matches_reference(kin, n, dtype):
    """The TEAL decode path (list kernel + GEMV reading the count on the device) on the real
    presets' shapes, thresholds keeping ~0%, ~40%, ~60% and 100% of the inputs, inside a CUDA
    graph replayed on a new input (the count changes without a host sync); bf16 runs the packed
    list and the GEMV as the list's programmatic dependent; fused RMSNorm and GLU producers."""
    from qsparse.kernels.threshold_gemv import threshold_gemv, threshold_gemv_reference

    w = fresh((n, kin), dtype) * 0.02
    wt = G.prepare_dense(w)
    for t_val in (100.0, 0.84, 0.52, -1.0):
        t = torch.tensor([t_val], device="cuda")
        x = fresh((1, kin), dtype)
        got = threshold_gemv(x, wt, t, n_out=n)
        ref = threshold_gemv_reference(x, w, t)
        if ref.norm() == 0:
            assert got.float().abs().max() == 0
        else:
            assert rel_err(got, ref) < 1e-2, (t_val, rel_err(got, ref))
    x_static = fresh((1, kin), dtype)
    t = torch.tensor([0.52], device="cuda")
    threshold_gemv(x_static, wt, t, n_out=n)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = threshold_gemv(x_static, wt, t, n_out=n)
    for _ in range(3):
        x_static.copy_(fresh((1, kin), dtype))
        graph.replay()
        assert rel_err(y_static, threshold_gemv_reference(x_static, w, t)) < 1e-2
    # the list kernel computing the site input from the RMSNorm in front of it (decode's q|k|v
    # and gate|up sites), and from a GLU's gate|up output (down)
    norm = G.Producer("rmsnorm", (torch.rand(kin, device="cuda") + 0.5).to(dtype), 1e-6)
    for prod in (norm, G.Producer("silu_glu")):
        x = fresh((1, prod.width(kin)), dtype)
        got = threshold_gemv(x, wt, t, n_out=n, producer=prod)
        assert rel_err(got, threshold_gemv_reference(prod.reference(x), w, t)) < 1e-2, prod.kind


@pytest.mark.skipif(not K.HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize(
    "b, h, h_kv, d, length, p",
    [
        (1, 32, 32, 128, 80, 79),  # 7B preset, the benchmark's cache: one program per head
        (1, 32, 32, 64, 144, 20),  # 1.3B preset
        (4, 9, 3, 64, 2048, 1500),  # SmolLM2's GQA, a long cache split over 8 programs
        (2, 32, 8, 128, 4096, 4095),  # GQA 4:1 at the last position, 16 splits
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_matches_the_model_path(b, h, h_kv, d, length, p, dtype):
    from qsparse.kernels import decode_attention as DA
    from qsparse.models.rope import RotaryEmbedding

    q, k, v = fresh((b, h * d), dtype), fresh((b, h_kv * d), dtype), fresh((b, h_kv * d), dtype)
    k_cache, v_cache = fresh((b, h_kv, length, d), dtype), fresh((b, h_kv, length, d), dtype)
    pos = torch.tensor([p], device="cuda")
    cos, sin = RotaryEmbedding(d, 10000.0)(torch.arange(length, device="cuda")[None], dtype)
    assert DA.decode_attention_applies(q, k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = DA.decode_attention_reference(q, k, v, cos[0], sin[0], k_ref, v_ref, pos)
    out = DA.decode_attention(q, k, v, cos[0], sin[0], k_cache, v_cache, pos)
    assert torch.equal(v_cache, v_ref)
    if dtype == torch.bfloat16:  # each RoPE product rounded to bf16 as torch rounds it
        assert torch.equal(k_cache, k_ref)
    else:  # fp32: the compiler may contract x c - y s into an FMA (torch rounds the product)
        torch.testing.assert_close(k_cache, k_ref, rtol=1e-6, atol=1e-6)
    assert rel_err(out, ref) <= (1e-2 if dtype == torch.bfloat16 else 1e-5)
