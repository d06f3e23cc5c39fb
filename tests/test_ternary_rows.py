"""CPU tier for qsparse.kernels.ternary_rows (the batch-1 sparse-input ternary GEMV on
input-major packed weights): the packing, the reference against a plain product, argument
errors, and (with Triton) the kernels against the reference under Triton's CPU interpreter,
the decode engine using them, and the benchmark's keys."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from qsparse.kernels import gemv as G
from qsparse.kernels import ternary_rows as TR
from qsparse.nn.quant import absmax_quantize
from qsparse.nn.topk import topk_mask

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)


def test_pack_rows_round_trips_and_puts_output_j_at_bits_2j():
    codes = torch.randint(
        -1, 2, (37, 21), dtype=torch.int8, generator=torch.Generator().manual_seed(0)
    )
    packed = TR.pack_ternary_rows(codes)
    assert packed.shape == (21, 16) and packed.dtype == torch.int32  # 37 outputs -> 256
    assert torch.equal(TR.unpack_ternary_rows(packed, 37), codes)
    assert (TR.unpack_ternary_rows(packed)[37:] == 0).all()  # padding: zero weights
    assert TR.pack_ternary_rows(codes, align=16).shape == (21, 3)
    one = torch.zeros(40, 5, dtype=torch.int8)
    one[17, 3] = 1  # output 16 * 1 + 1 of input 3: code 2 in bits 2..3 of word [3, 1]
    zeros = sum(1 << (2 * j) for j in range(16))  # every field code 1 (weight 0)
    words = TR.pack_ternary_rows(one)
    assert words[3, 1].item() == zeros + (1 << 2)
    assert words[3, 0].item() == words[0, 1].item() == zeros
    minus = TR.pack_ternary_rows(-torch.ones(16, 1, dtype=torch.int8))  # all codes 0
    assert minus[0, 0].item() == 0
    plus = TR.pack_ternary_rows(torch.ones(16, 1, dtype=torch.int8))  # all 2: sign bit set
    assert plus[0, 0].item() == 2 * zeros - 2**32


def test_pack_rows_rejects_bad_codes_and_align():
    with pytest.raises(ValueError, match="ternary codes"):
        TR.pack_ternary_rows(torch.full((4, 16), 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="out_features, in_features"):
        TR.pack_ternary_rows(torch.zeros(16, dtype=torch.int8))
    with pytest.raises(ValueError, match="align"):
        TR.pack_ternary_rows(torch.zeros(4, 16, dtype=torch.int8), align=24)


def test_reference_is_the_quantized_top_k_product():
    torch.manual_seed(0)
    codes = torch.randint(-1, 2, (50, 70), dtype=torch.int8)
    x = torch.randn(2, 70)
    alpha = torch.linspace(0.5, 1.5, 256)
    for k, bits in ((None, 8), (30, 8), (1, 4)):
        xs = absmax_quantize(x, bits, ste=False)
        if k is not None:
            xs = xs * topk_mask(x, k)
        want = (xs @ codes.float().t()) * alpha[:50]
        got = TR.ternary_rows_gemv_reference(x, TR.pack_ternary_rows(codes), alpha, k, bits)
        torch.testing.assert_close(got[:, :50], want, rtol=1e-5, atol=1e-5)
        assert (got[:, 50:] == 0).all()


def test_ternary_rows_gemv_rejects_bad_arguments():
    packed = TR.pack_ternary_rows(torch.zeros(32, 48, dtype=torch.int8))
    x = torch.randn(1, 48)
    with pytest.raises(ValueError, match="batch 1"):
        TR.ternary_rows_gemv(torch.randn(2, 48), packed, 1.0, 10)
    with pytest.raises(ValueError, match="features"):
        TR.ternary_rows_gemv(torch.randn(1, 40), packed, 1.0, 10)
    with pytest.raises(ValueError, match="int32"):
        TR.ternary_rows_gemv(x, packed.long(), 1.0, 10)
    with pytest.raises(ValueError, match="k must be"):
        TR.ternary_rows_gemv(x, packed, 1.0, 49)
    with pytest.raises(ValueError, match="act_bits"):
        TR.ternary_rows_gemv(x, packed, 1.0, 10, act_bits=9)
    with pytest.raises(ValueError, match="block_n"):
        TR.ternary_rows_gemv(x, packed, 1.0, 10, cfg=G.GemvConfig(block_n=24))
    with pytest.raises(ValueError, match="alpha"):
        TR.ternary_rows_gemv(x, packed, torch.ones(32), 10)  # needs the padded 256
    with pytest.raises(ValueError, match="up to"):
        TR.ternary_rows_gemv(
            torch.randn(1, TR.MAX_IN + 1),
            torch.zeros(TR.MAX_IN + 1, 16, dtype=torch.int32),
            1.0,
            10,
        )


def test_split_follows_the_program_target():
    cfg = TR.ternary_rows_config_for(4096, 4403)  # 7B down: 32 blocks of 128 outputs
    assert cfg.split == 16 and cfg.block_n == TR.ROWS_CONFIG.block_n
    assert TR.ternary_rows_config_for(22016, 1638).split == 3  # gate|up: 172 blocks
    assert TR.ternary_rows_config_for(4096, 100).split == 1  # two tiles: no split


INTERPRETER_SCRIPT = """
import torch
import qsparse.decode_view as DV
from qsparse.kernels import gemv as G
from qsparse.kernels import ternary_rows as TR

torch.manual_seed(0)


def check(x, codes, alpha, k, bits, cfg, hint=None, producer=G.NO_PRODUCER, align=256, tol=1e-5):
    rows = TR.pack_ternary_rows(codes, align)
    n = codes.shape[0]
    v = producer.reference(x)
    want = G.ternary_gemv_reference(v, G.pack_ternary(codes), alpha, k, bits)
    a = alpha if not isinstance(alpha, torch.Tensor) else torch.cat(
        [alpha, alpha.new_zeros(16 * rows.shape[1] - n)])
    got = TR.ternary_rows_gemv(x, rows, a, k, bits, cfg, hint=hint, producer=producer, n_out=n)
    assert got.shape == want.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


for kin, n, k in ((80, 72, 30), (37, 130, 10)):
    codes = torch.randint(-1, 2, (n, kin), dtype=torch.int8)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = torch.randn(1, kin)
        x[:, :20] = x[:, 3:4]  # ties at the threshold: lower index kept
        x = x.to(dtype)
        alpha = torch.linspace(0.5, 1.5, n) if dtype == torch.float32 else 0.7
        check(x, codes, alpha, k, 8, G.GemvConfig(block_k=4, block_n=32), tol=tol)
        check(x, codes, 0.7, k, 4, G.GemvConfig(block_k=8, block_n=32, num_stages=1), tol=tol)
        check(x, codes, 0.7, None, 8, G.GemvConfig(block_k=8, block_n=16, split=3), tol=tol)
        # split list summed by the last program; masked words (align 16: 3 or 5 words, 2 per
        # program)
        check(x, codes, 0.7, k, 8, G.GemvConfig(block_k=4, block_n=32, split=3), align=16, tol=tol)
    check(torch.randn(1, kin), codes, 0.7, k, 8, None)  # cfg=None: shape-chosen

# the packed halves decoded every FLUSH tiles: sums far past 2^15 (all q = +-127, equal codes)
TR.FLUSH = 2
for sign in (1, -1):
    codes = torch.full((32, 600), sign, dtype=torch.int8)
    codes[5], codes[7] = -sign, 0
    x = torch.ones(1, 600)
    x[0, ::7] = -1.0
    check(x, codes, 1.0, 590, 8, G.GemvConfig(block_k=8, block_n=16, split=2), align=16)
TR.FLUSH = 128

# fused producers (the selection kernel computes the site input) and the carried threshold
for dtype in (torch.bfloat16, torch.float32):
    for kind in ("rmsnorm", "relu2_glu", "silu_glu"):
        w = (torch.rand(300) + 0.5).to(dtype) if kind == "rmsnorm" else None
        prod = G.Producer(kind, w, 1e-6)
        codes = torch.randint(-1, 2, (32, 300), dtype=torch.int8)
        hint = G.new_hint(1)
        for step in range(2):
            x = (torch.randn(1, prod.width(300)) * (1 + 0.1 * step)).to(dtype)
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
            cfg = G.GemvConfig(block_k=32, block_n=32)
            check(x, codes, 0.5, 120, 8, cfg, hint, prod, align=32, tol=tol)
    codes = torch.randint(-1, 2, (32, 300), dtype=torch.int8)
    for shift in (None, 0, -14, 14, -(2**20)):  # carried: none, in the band, off it
        x = torch.randn(1, 300).to(dtype)
        hint = G.new_hint(1)
        if shift is not None:
            low = 31 - G.KEY_BITS[dtype]
            kth = x.float().abs().topk(120).values[:, -1].view(torch.int32)
            hint[:1] = (kth >> low) + shift
        check(x, codes, 0.5, 120, 8, G.GemvConfig(block_k=32, block_n=32), hint, align=32, tol=1e-2)

# the list alone (idx ascending, int8 codes, scale), and the GEMV given it
from qsparse.nn.topk import topk_mask
x = torch.randn(1, 80, dtype=torch.bfloat16)
idx, qv, scale = TR.ternary_rows_list(x, 30, hint=G.new_hint(1))
keep = topk_mask(x, 30)[0].nonzero().flatten()
assert torch.equal(idx[:30].long(), keep)
gamma = x.float().abs().max()
assert torch.equal(qv[:30], (x.float()[0, keep] * (127 / gamma)).round().int())
assert torch.allclose(scale, gamma / 127)
rows = TR.pack_ternary_rows(torch.randint(-1, 2, (72, 80), dtype=torch.int8))
cfg = G.GemvConfig(block_k=8, block_n=32)
given = TR.ternary_rows_gemv(x, rows, 0.5, 30, cfg=cfg, rows=(idx, qv, scale))
assert torch.equal(given, TR.ternary_rows_gemv(x, rows, 0.5, 30, cfg=cfg))

# a custom op: dynamo traces the call whole
rows = TR.pack_ternary_rows(torch.randint(-1, 2, (72, 80), dtype=torch.int8))
cfg = G.GemvConfig(block_k=8, block_n=32)
step = lambda x: TR.ternary_rows_gemv(x, rows, 0.5, 30, cfg=cfg, n_out=72) * 2
xs = torch.randn(1, 80, dtype=torch.bfloat16)
torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="eager")(xs), step(xs))

print("TERNARY ROWS OK")
"""


@needs_triton
def test_kernels_match_the_reference_in_the_triton_interpreter():
    """Against the K-packed reference: fp32 to float summation order, bf16 to its rounding;
    ties, act_bits 4, per-output alpha, k = K, split lists, masked words, one stage, many
    flushes of the packed sums, fused producers, carried thresholds; the custom op under
    dynamo."""
    from conftest import run_interpreted

    assert "TERNARY ROWS OK" in run_interpreted(INTERPRETER_SCRIPT, timeout=900)


ENGINE_SCRIPT = """
import torch
import qsparse.decode_view as DV
from qsparse.kernels import ternary_rows as TR

# the decode engine with the input-major layout on: BitNet + Q-Sparse at batch 1 on it (batch
# 2 on the K-packed kernel), greedy tokens equal to plain forwards, compiled too
DV.TERNARY_ROWS = True
from qsparse.generate import DecodeEngine, convert
from qsparse.models import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
model = convert(LlamaForCausalLM(LlamaConfig.from_preset("tiny")).eval(), "bitnet_qsparse", 0.5)
for batch in (1, 2):
    ids = torch.randint(0, 256, (batch, 3), generator=torch.Generator().manual_seed(batch))
    engine = DecodeEngine(model)
    sites = [p for layer in engine.decoder.model.layers
             for p in (layer.self_attn.qkv, layer.self_attn.o_proj, layer.mlp.gate_up,
                       layer.mlp.down_proj)]
    assert all(s.mode == "ternary" and s.rows for s in sites)
    calls = []
    orig = TR.ternary_rows_gemv
    TR.ternary_rows_gemv = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
    got = engine.generate(ids, 3).tokens
    TR.ternary_rows_gemv = orig
    assert (len(calls) > 0) == (batch == 1), (batch, len(calls))
    ref = model.generate(ids, max_new_tokens=3, use_cache=False)
    assert torch.equal(got, ref), (batch, got, ref)
    if batch == 1:
        compiled = DecodeEngine(model, compile="aot_eager").generate(ids, 3).tokens
        assert torch.equal(compiled, ref), ("compiled", compiled, ref)
print("ENGINE ROWS OK")
"""


@pytest.mark.slow  # an opt-in path (measured slower on the H200); the kernel test stays default
@needs_triton
def test_decode_engine_on_the_input_major_layout_matches_plain_forward():
    """``TERNARY_ROWS`` on: BitNet + Q-Sparse decodes batch 1 through the kernel (batch 2
    through the K-packed one), greedy tokens equal to plain forwards, compiled too (~30 s)."""
    from conftest import run_interpreted

    assert "ENGINE ROWS OK" in run_interpreted(ENGINE_SCRIPT, timeout=600)


BENCH_SCRIPT = """
from benchmarks import _figures
from benchmarks import ternary_sparse_gemv as B
import io, contextlib

B.DEVICE = "cpu"
B.shapes = lambda preset: {"o": (64, 64), "down": (96, 64)}
times = iter(range(100, 10000))
B.time_graph = lambda calls, **kw: float(next(times))
out = io.StringIO()
with contextlib.redirect_stdout(out):
    B.main(["--presets", "7B", "--buffers", "1"])
figs = _figures.parse(out.getvalue())
for shape in ("o", "down"):
    key = f"ternary_sparse_gemv.7B_{shape}"
    t = {w: figs[f"{key}.{w}_us"]["value"] for w in ("cublas", "ternary", "ternary_topk", "rows")}
    assert abs(figs[f"{key}.rows_vs_ternary_topk"]["value"] - t["ternary_topk"] / t["rows"]) < 1e-4
    assert len([f for f in figs if f.startswith(f"{key}.variant.")]) == len(B.VARIANTS)
    swept = [f for f in figs if f.startswith(f"{key}.variant.")] + [f"{key}.rows_us"]
    best = min(figs[f]["value"] for f in swept)
    assert figs[f"{key}.rows_best_us"]["value"] == best
print("BENCH OK")
"""


@needs_triton
def test_benchmark_checks_the_kernel_and_emits_its_figures():
    """benchmarks/ternary_sparse_gemv.py on CPU (interpreter; shapes shrunk, timing stubbed):
    its correctness check passes and every figure key is printed with consistent ratios."""
    from conftest import run_interpreted

    assert "BENCH OK" in run_interpreted(BENCH_SCRIPT, timeout=600)


def test_benchmark_decode_rows_reports_every_run(monkeypatch, capsys):
    """The end-to-end part of the benchmark (``--decode``) on CPU, tiny preset (no kernels
    there: the plumbing and the keys; the GPU run compares the two layouts)."""
    from benchmarks import _figures
    from benchmarks import ternary_sparse_gemv as B

    monkeypatch.setattr(B, "DEVICE", "cpu")
    B.decode("tiny", 3, None)
    figs = _figures.parse(capsys.readouterr().out)
    key = "ternary_sparse_gemv.decode_tiny"
    rates = {r: figs[f"{key}.{r}.tokens_per_s"]["value"] for r in ("bitnet", "bitnet_qsparse")}
    assert all(v > 0 for v in rates.values())
    assert figs[f"{key}.k_packed_vs_bitnet"]["value"] == pytest.approx(
        rates["bitnet_qsparse"] / rates["bitnet"], rel=1e-4
    )
    assert figs[f"{key}.rows_token_agreement"]["value"] == 100.0
    import qsparse.decode_view as DV

    assert DV.TERNARY_ROWS is False  # left off again
