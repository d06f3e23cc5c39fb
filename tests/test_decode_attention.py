"""The fused decode attention (``qsparse.kernels.decode_attention``): the Triton kernel under
the interpreter against the model's own path (RoPE, cache write, masked SDPA), the reference
it falls back to, its argument checks, and its use by the decode engine."""

from __future__ import annotations

import pytest
import torch

from qsparse.kernels import HAS_TRITON
from qsparse.kernels.decode_attention import decode_attention, decode_attention_reference
from qsparse.models.kv_cache import KVCache
from qsparse.models.rope import RotaryEmbedding

CASES_SCRIPT = """
import torch
from qsparse.kernels import decode_attention as DA
from qsparse.models.rope import RotaryEmbedding

# (B, H, H_kv, D, L, pos, dtype): MHA, GQA (3 and 4 query heads a kv head, 9/3 as SmolLM2),
# position 0, the last position, caches split over 2, 4 and 8 programs; the RoPE tables hold
# L positions, or more (the first case), and the kernel reads row pos
cases = [
    (1, 4, 4, 16, 20, 7, torch.float32),
    (2, 6, 2, 8, 40, 0, torch.float32),
    (3, 8, 2, 32, 600, 577, torch.float32),
    (1, 4, 1, 16, 300, 299, torch.bfloat16),
    (2, 9, 3, 64, 40, 39, torch.bfloat16),
    (1, 2, 2, 16, 1100, 1000, torch.bfloat16),
]
gen = torch.Generator().manual_seed(0)
for b, h, h_kv, d, length, p, dtype in cases:
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)
    q, k, v = rnd(b, h * d), rnd(b, h_kv * d), rnd(b, h_kv * d)
    k_cache, v_cache = rnd(b, h_kv, length, d), rnd(b, h_kv, length, d)
    pos = torch.tensor([p])
    rows = length + 5 if length == 20 else length
    cos, sin = RotaryEmbedding(d, 10000.0)(torch.arange(rows)[None], dtype)
    assert DA.decode_attention_applies(q, k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = DA.decode_attention_reference(q, k, v, cos[0], sin[0], k_ref, v_ref, pos)
    out = DA.decode_attention(q, k, v, cos[0], sin[0], k_cache, v_cache, pos)
    # the cache holds the model's rotated keys bit for bit (products rounded as torch rounds)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), (b, h, d, length)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(out, ref, **tol)
    assert DA._splits(length) == {20: 1, 40: 1, 300: 2, 600: 4, 1100: 8}[length]
    # the first block loaded before the position or after it: the same sums, bit for bit
    shipped = DA.PRELOAD_FIRST_BLOCK
    DA.PRELOAD_FIRST_BLOCK = not shipped
    k_late, v_late = k_ref.clone(), v_ref.clone()
    late = DA.decode_attention(q, k, v, cos[0], sin[0], k_late, v_late, pos)
    DA.PRELOAD_FIRST_BLOCK = shipped
    assert torch.equal(late, out) and torch.equal(k_late, k_cache), (b, h, d, length)
print("DECODE ATTENTION OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_kernel_under_the_interpreter_matches_the_model_path():
    from conftest import run_interpreted

    assert "DECODE ATTENTION OK" in run_interpreted(CASES_SCRIPT)


ENGINE_SCRIPT = """
import torch
import qsparse.decode_view as view
from qsparse.generate import DecodeEngine, convert
from qsparse.models import LlamaConfig, LlamaForCausalLM

calls = []
kernel = view.DA.decode_attention

def counted(*args):
    calls.append(args[5].shape)
    return kernel(*args)

view.DA.decode_attention = counted
for mode in ("dense", "qsparse"):
    torch.manual_seed(0)
    config = LlamaConfig.from_preset("tiny")
    config.num_key_value_heads = config.num_attention_heads // 2  # GQA
    model = convert(LlamaForCausalLM(config).eval(), mode, 0.5)
    ids = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(1))
    calls.clear()
    got = DecodeEngine(model).generate(ids, 4).tokens
    ref = model.generate(ids, max_new_tokens=4, use_cache=False)
    assert torch.equal(got, ref), (mode, got, ref)
    # three decode steps after the prompt, one call per layer each (the prompt runs SDPA)
    assert len(calls) == 3 * config.num_hidden_layers, (mode, len(calls))
print("ENGINE ATTENTION OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_engine_decodes_through_the_kernel_under_the_interpreter():
    from conftest import run_interpreted

    assert "ENGINE ATTENTION OK" in run_interpreted(ENGINE_SCRIPT)


def _inputs(b=2, h=4, h_kv=2, d=8, length=12, p=5):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, h * d, generator=gen)
    k, v = torch.randn(b, h_kv * d, generator=gen), torch.randn(b, h_kv * d, generator=gen)
    caches = torch.randn(2, b, h_kv, length, d, generator=gen)
    pos = torch.tensor([p])
    cos, sin = RotaryEmbedding(d, 10000.0)(torch.arange(length)[None], torch.float32)
    return q, k, v, cos[0], sin[0], caches[0].clone(), caches[1].clone(), pos


def test_reference_is_the_attention_layer_over_a_static_cache():
    from qsparse.models import LlamaConfig
    from qsparse.models.llama import LlamaAttention

    config = LlamaConfig.from_preset("tiny")
    config.num_key_value_heads = config.num_attention_heads // 2
    attn = LlamaAttention(config, layer_idx=0)
    h, h_kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q, k, v, cos, sin, k_cache, v_cache, pos = _inputs(2, h, h_kv, d, 12, 5)
    cache = KVCache(config, 2, 12, torch.device("cpu"), torch.float32, static=True)
    cache.pos.fill_(5)
    cache.keys[0].copy_(k_cache)
    cache.values[0].copy_(v_cache)
    positions = cache.positions(1)
    mask = (torch.arange(12)[None, :] <= positions[:, None])[None, None]
    rope = (cos[pos][None], sin[pos][None])  # [1, 1, D]: the tables' row of the position
    want = attn.attend(q[:, None], k[:, None], v[:, None], rope, mask, cache)
    got = decode_attention_reference(q, k, v, cos, sin, k_cache, v_cache, pos)
    torch.testing.assert_close(got, want[:, 0], rtol=0, atol=0)
    assert torch.equal(k_cache, cache.keys[0]) and torch.equal(v_cache, cache.values[0])


def test_without_kernels_it_runs_the_reference():
    args = _inputs()
    ref_args = [a.clone() for a in args]
    got = decode_attention(*args)  # plain CPU tensors: no kernel applies
    want = decode_attention_reference(*ref_args)
    assert torch.equal(got, want) and torch.equal(args[5], ref_args[5])


@pytest.mark.parametrize(
    "index, bad, match",
    [
        (0, torch.zeros(2, 5), "q"),
        (1, torch.zeros(2, 7), "k"),
        (3, torch.zeros(1, 8), "cos/sin"),  # one row: not a table of the cache's 12
        (4, torch.zeros(12, 4), "cos/sin"),
        (7, torch.tensor([5], dtype=torch.int32), "pos"),
        (5, torch.zeros(2, 2, 8, 12).transpose(2, 3), "contiguous"),
    ],
)
def test_bad_arguments_are_refused(index, bad, match):
    args = list(_inputs())
    args[index] = bad
    with pytest.raises(ValueError, match=match):
        decode_attention(*args)


def test_slots_needs_a_static_cache_after_positions():
    from qsparse.models import LlamaConfig

    config = LlamaConfig.from_preset("tiny")
    cache = KVCache(config, 1, 8, torch.device("cpu"), torch.float32, static=True)
    with pytest.raises(ValueError, match=r"positions\(T\)"):
        cache.slots(1)
    assert torch.equal(cache.positions(1), cache.slots(1))
    dynamic = KVCache(config, 1, 8, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="static"):
        dynamic.slots(1)


def test_static_cache_holds_the_rope_tables_of_every_position():
    from qsparse.models import LlamaConfig

    config = LlamaConfig.from_preset("tiny")
    cache = KVCache(config, 2, 9, torch.device("cpu"), torch.bfloat16, static=True)
    rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
    positions = torch.tensor([3, 4, 8])
    want = rotary(positions[None], torch.bfloat16)
    got = cache.rope_at(positions, torch.bfloat16)
    assert got[0].shape == (1, 3, config.head_dim)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert cache.rope_at(positions, torch.float32) is None  # another dtype: computed instead
    dynamic = KVCache(config, 1, 8, torch.device("cpu"), torch.float32)
    assert dynamic.rope is None and dynamic.rope_at(positions, torch.float32) is None
