"""``GemvConfig(split_select=True)``: the batch-1 selection spread over many programs
(:func:`qsparse.kernels._gemv_triton._chunk_select_kernel`) and the GEMV that lists each slice
of K itself (``_chunk_gemv_kernel``), against the reference top-k rule in Triton's CPU
interpreter: the exact kept set (an identity weight makes ``y`` the masked input itself),
ties at the threshold straddling chunks and K-slices, the carried threshold hit, missed far
above / below, zero (no hint yet) and absent, bf16 / fp16 / fp32; and the argument errors."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch

from qsparse.kernels import gemv as G

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)

SPLIT_SELECT_SCRIPT = textwrap.dedent(
    """
    import torch
    from qsparse.kernels import gemv as G
    from qsparse.nn.topk import topk_mask

    torch.manual_seed(0)

    def planted(kin, k, dtype):
        # random row with ties at the threshold spread over the row (some kept, some not)
        x = torch.randn(1, kin)
        v = x.abs().topk(k, dim=1).values[0, -1]
        at = torch.randperm(kin)[: max(2, kin // 25)]
        x[0, at] = v * torch.sign(torch.randn(at.numel()))
        return x.to(dtype)

    def kth_bits(x, k, dtype):
        return int(x.float().abs().topk(k, dim=1).values[0, -1].view(torch.int32)) >> (
            31 - G.KEY_BITS[dtype]
        )

    checked = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for kin in (300, 1000):
            eye = G.prepare_dense(torch.eye(kin, dtype=dtype))  # y = the masked input itself
            w = torch.randn(72, kin, dtype=dtype)
            wt = G.prepare_dense(w, None, align=1)  # 72 columns: ragged program blocks
            for k in (1, int(0.4 * kin), kin // 2, kin - 1):
                x = planted(kin, k, dtype)
                ref_x = x * topk_mask(x, k)
                ref_y = G.sparse_gemv_reference(x, wt, k).float()
                t = kth_bits(x, k, dtype)
                # no hint, no hint yet, a hit, near the band's edges, misses above and below
                starts = [None, 0, t, t - 14, t + 14, t + 15, t - 15, t + 300, t - 2**20]
                if k != int(0.4 * kin):
                    starts = [0, t + 300]
                for j, (chunk, split) in enumerate(((32, 3), (64, 1), (256, 2))):
                    cfg = G.GemvConfig(
                        block_k=64, block_n=1024, split=split, split_select=True,
                        select_chunk=chunk,
                    )
                    # every start on one launch shape (rotating), at S = 0.6 a hit on the others
                    rot = (kin // 300 + len(str(dtype))) % 3
                    if j != rot and k != int(0.4 * kin):
                        continue
                    for s in starts if j == rot else [t]:
                        hint = None if s is None else torch.tensor([s], dtype=torch.int32)
                        y = G.sparse_gemv(x, eye, k, cfg, n_out=kin, hint=hint)
                        assert torch.equal(y, ref_x), (dtype, kin, k, chunk, split, s)
                        if hint is not None:
                            old = None if s is None else torch.tensor([s], dtype=torch.int32)
                            G.sparse_gemv(x, wt, k, hint=old)  # the one-program path
                            assert int(hint[0]) == t == int(old[0]), (dtype, kin, k, s)
                        checked += 1
                cfg = G.GemvConfig(block_k=32, block_n=32, split=3, split_select=True,
                                   select_chunk=64)
                one = G.sparse_gemv(x, wt, k).float()  # the one-program selection + list GEMV
                for s in (None, t + 300) if k == int(0.4 * kin) else (t,):
                    hint = None if s is None else torch.tensor([s], dtype=torch.int32)
                    y = G.sparse_gemv(x, wt, k, cfg, hint=hint).float()
                    torch.testing.assert_close(y, ref_y, rtol=2e-2, atol=2e-2)
                    torch.testing.assert_close(y, one, rtol=1e-5, atol=1e-4)
                    checked += 1
            # column panels (prepare_dense(w, 32)): the same weight addressing as the list GEMV
            k = int(0.4 * kin)
            x = planted(kin, k, dtype)
            cfg = G.GemvConfig(block_k=16, block_n=16, split=2, split_select=True, select_chunk=64)
            y = G.sparse_gemv(x, G.prepare_dense(w, 32), k, cfg, n_out=72).float()
            ref = G.sparse_gemv_reference(x, wt, k).float()
            torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    # slices listed in several pieces (SPLIT_SELECT_PIECE lowered from 4096)
    G.SPLIT_SELECT_PIECE = 128
    for kin, chunk, split in ((1000, 64, 1), (1000, 256, 3)):
        x = planted(kin, 400, torch.bfloat16)
        eye = G.prepare_dense(torch.eye(kin, dtype=torch.bfloat16))
        t = kth_bits(x, 400, torch.bfloat16)
        cfg = G.GemvConfig(
            block_k=64, block_n=1024, split=split, split_select=True, select_chunk=chunk
        )
        for s in (None, t, t + 300):
            hint = None if s is None else torch.tensor([s], dtype=torch.int32)
            y = G.sparse_gemv(x, eye, 400, cfg, n_out=kin, hint=hint)
            assert torch.equal(y, x * topk_mask(x, 400)), (kin, chunk, split, s)
    G.SPLIT_SELECT_PIECE = 4096
    # the hint carried from call to call, hits and a jump
    hint = G.new_hint(1)
    base = torch.randn(1, 1000)
    eye = G.prepare_dense(torch.eye(1000, dtype=torch.bfloat16))
    cfg = G.GemvConfig(block_k=64, block_n=1024, split=2, split_select=True, select_chunk=128)
    for scale in (1.0, 1.01, 0.99, 4.0, 1.0):
        x = (base * scale).to(torch.bfloat16)
        y = G.sparse_gemv(x, eye, 400, cfg, n_out=1000, hint=hint)
        assert torch.equal(y, x * topk_mask(x, 400))
        assert int(hint[0]) == kth_bits(x, 400, torch.bfloat16)
    print("SPLIT SELECT OK", checked)
    """
)


@needs_triton
def test_split_select_keeps_the_reference_set_in_the_triton_interpreter():
    """The multi-program selection keeps exactly ``topk_mask``'s inputs (ties to the lower
    index, straddling chunks and K-slices) through hint hits, misses, zero and none, in every
    dtype, leaves the same new hint as the one-program path, and its output matches the
    reference and the one-program path on a random weight (row-major and panels)."""
    from conftest import run_interpreted

    out = run_interpreted(SPLIT_SELECT_SCRIPT, timeout=600)
    assert "SPLIT SELECT OK" in out


@pytest.mark.parametrize(
    "cfg, batch, match",
    [
        (G.GemvConfig(split_select=1), 1, "split_select must be a bool"),
        (G.GemvConfig(split_select=True, select_chunk=48), 1, "select_chunk"),
        (G.GemvConfig(split_select=True, select_chunk=8192), 1, "select_chunk"),
        (G.GemvConfig(split_select=True), 2, "split_select is for batch 1"),
        (G.GemvConfig(split_select=True, carry=True), 1, "split_select selects itself"),
    ],
)
def test_split_select_errors_name_the_field(cfg, batch, match):
    wt = G.prepare_dense(torch.randn(64, 128))
    with pytest.raises(ValueError, match=match):
        G.sparse_gemv(torch.randn(batch, 128), wt, 40, cfg)


BENCH_DRY_RUN = textwrap.dedent(
    """
    import benchmarks.gemv_variants as GV

    GV.DEVICE = "cpu"
    GV.SPLIT_SHAPES = [("small", 300, 72)]
    GV.time_graph = lambda calls: (calls[0](), 1.0)[1]
    GV.emit = lambda *a, **k: None
    GV.split_select_rows()  # checks every variant against the reference before timing
    print("BENCH OK")
    """
)


@needs_triton
def test_split_select_benchmark_part_runs_in_the_triton_interpreter():
    """``benchmarks/gemv_variants.py split`` on a small shape on CPU, timing stubbed: every
    variant it times is built and checked against the reference."""
    from conftest import run_interpreted

    out = run_interpreted(BENCH_DRY_RUN, timeout=300)
    assert "BENCH OK" in out and "split_select c256 2x split" in out
