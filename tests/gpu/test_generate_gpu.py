"""GPU tier: the decode engine with ``compile=True`` (inductor) inside the CUDA graph, Triton
GEMV kernels on, decodes the same greedy tokens as the eager step (CUDA graph as well). fp32:
in bf16 the fused element-wise math rounds differently from eager's per-op rounding, which can
flip near-tied greedy tokens of a random model (both stay equally close to fp32).

Run with ``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import pytest
import torch

from qsparse.generate import MODES, DecodeEngine, convert
from qsparse.kernels import HAS_TRITON
from qsparse.models import LlamaConfig, LlamaForCausalLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def small_cuda(mode: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """The "debug" preset (hidden 256, 4 layers) on CUDA, converted to ``mode``."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig.from_preset("debug"))
    return convert(model.to(dtype).eval(), mode, sparsity=0.5)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize(
    "mode, path",
    [
        ("dense", "dense"),
        ("qsparse", "sparse"),
        ("bitnet_qsparse", "ternary"),
        ("qsparse_threshold", "threshold"),
    ],
)
def test_compiled_cuda_graph_step_matches_eager(mode, path):
    model = small_cuda(mode, torch.float32)
    ids = torch.randint(
        0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1)
    )
    eager = DecodeEngine(model, use_kernels=True, cuda_graph=True)
    modes = {layer.self_attn.qkv.mode for layer in eager.decoder.model.layers}
    assert modes == {path}  # cuBLAS or a Triton GEMV
    expected = eager.generate(ids, 12).tokens
    torch._dynamo.utils.counters.clear()
    compiled = DecodeEngine(model, use_kernels=True, cuda_graph=True, compile=True)
    got = compiled.generate(ids, 12).tokens  # fullgraph=True: a graph break raises
    assert compiled._graph is not None and compiled._compiled is not None
    assert torch.equal(got, expected)
    assert torch.equal(compiled.generate(ids, 12).tokens, expected)  # graph replayed again
    assert not torch._dynamo.utils.counters["graph_break"]


def assert_greedy_under_plain_forward(
    model: LlamaForCausalLM, tokens: torch.Tensor, prompt_len: int, rel_tol: float = 0.1
) -> None:
    """Every generated token of ``tokens`` (batch, prompt_len + new) is the argmax of a plain
    full forward over the tokens before it, up to ``rel_tol`` x the std of those logits.

    Exact token equality with ``model.generate`` is too strict for random weights: a near-tie
    (BitNet, batch 3: top-2 margin 1.4e-4 against a logit std of 0.32, measured on the H200)
    flips when the fused kernel rounds the int8 activation scale one ulp differently, and the
    sequences part from there. Even ``model.generate``'s own BitNet tokens sit up to 0.023 std
    below the argmax of one full forward over the same tokens on the H200 (int8 activation
    buckets flip between launch shapes), hence 0.1 std. A wrong kernel (wrong rows, wrong
    scale) picks tokens whose logits sit about one std below the maximum."""
    with torch.no_grad():
        logits = model(tokens.cuda()).logits.float()[:, prompt_len - 1 : -1]
    chosen = logits.gather(-1, tokens.cuda()[:, prompt_len:, None]).squeeze(-1)
    gap = logits.amax(-1) - chosen  # (batch, new): 0 where the token is the argmax
    tol = rel_tol * logits.std(-1)
    assert bool((gap <= tol).all()), f"gap/std up to {float((gap / logits.std(-1)).max()):.3g}"


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 3])
def test_engine_matches_plain_forward(mode, batch):
    """Every mode, kernels on, CUDA graph, batch 1 (carried-threshold sparse GEMV) and 3
    (carried top-k + GEMM): each greedy token is the argmax of a plain full forward (fp32)
    over the engine's own tokens before it (see :func:`assert_greedy_under_plain_forward`),
    and the first token equals ``model.generate``'s."""
    model = small_cuda(mode, torch.float32)
    ids = torch.randint(
        0, model.config.vocab_size, (batch, 6), generator=torch.Generator().manual_seed(2)
    )
    expected = model.generate(ids.cuda(), max_new_tokens=10, use_cache=False)
    got = DecodeEngine(model, use_kernels=True, cuda_graph=True).generate(ids, 10).tokens
    assert got.shape == expected.shape
    assert torch.equal(got[:, : ids.shape[1] + 1].cuda(), expected[:, : ids.shape[1] + 1])
    assert_greedy_under_plain_forward(model, got, ids.shape[1])


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize(
    ("batch", "dtype"), [(1, torch.float32), (3, torch.float32), (1, torch.bfloat16)]
)
def test_threshold_sites_decode_like_plain_forward(batch, dtype):
    """Fixed per-site thresholds (``pattern="threshold"``, set by one tracked batch): the sites
    run the threshold GEMV (batch 1; bf16: packed list words, the list kernel computing the
    layer's RMSNorm) or the masked GEMM (batch 3) in the CUDA graph, and each greedy token is
    the argmax of a plain full forward."""
    import qsparse
    from qsparse.nn import SparsityConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig.from_preset("debug")).to(dtype)
    qsparse.sparsify(model, sparsity=SparsityConfig(ratio=0.5, pattern="threshold"))
    model.train()
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (2, 64), device="cuda"))
    assert qsparse.track_thresholds(model) == 4 * model.config.num_hidden_layers
    model.eval()
    ids = torch.randint(
        0, model.config.vocab_size, (batch, 6), generator=torch.Generator().manual_seed(2)
    )
    engine = DecodeEngine(model, use_kernels=True, cuda_graph=True)
    assert {layer.mlp.down_proj.mode for layer in engine.decoder.model.layers} == {"threshold"}
    expected = model.generate(ids.cuda(), max_new_tokens=10, use_cache=False)
    got = engine.generate(ids, 10).tokens
    assert torch.equal(got[:, : ids.shape[1] + 1].cuda(), expected[:, : ids.shape[1] + 1])
    assert_greedy_under_plain_forward(model, got, ids.shape[1])


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("mode", ["qsparse", "bitnet", "bitnet_qsparse"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opt_in_launch_settings_decode_like_the_defaults(mode, batch, dtype, monkeypatch):
    """The two opt-in step settings, on the device (the CPU tier runs them in the interpreter,
    where no launch is a programmatic dependent):

    - ``gemv.PDL_CHAIN``: each site's first kernel a programmatic dependent of the GEMV before
      it. It changes only when kernels start, so the tokens equal those of the step without it
      bit for bit, in fp32 and bf16.
    - ``decode_view.GLU_IN_SELECTION`` (the ternary sites by default; here none, then every
      site): the down site's first kernel forms ``act(g) * u``; in fp32 each greedy token is
      the argmax of a plain full forward, as the step's tokens without it are
      (:func:`test_engine_matches_plain_forward`, same prompts). In bf16 the greedy tokens of
      a random model can part at a near-tie, so there only the first token is checked."""
    from qsparse import decode_view
    from qsparse.kernels import gemv

    model = small_cuda(mode, dtype)
    ids = torch.randint(
        0, model.config.vocab_size, (batch, 6), generator=torch.Generator().manual_seed(2)
    )
    monkeypatch.setattr(decode_view, "GLU_IN_SELECTION", ())
    default = DecodeEngine(model, use_kernels=True, cuda_graph=True).generate(ids, 10).tokens
    monkeypatch.setattr(gemv, "PDL_CHAIN", True)
    chained = DecodeEngine(model, use_kernels=True, cuda_graph=True).generate(ids, 10).tokens
    assert torch.equal(chained, default)
    monkeypatch.setattr(gemv, "PDL_CHAIN", False)
    monkeypatch.setattr(decode_view, "GLU_IN_SELECTION", decode_view.GLU_SITE_MODES)
    engine = DecodeEngine(model, use_kernels=True, cuda_graph=True)
    down = engine.decoder.model.layers[0].mlp.down_proj
    assert down.producer.kind.endswith("_glu"), down.producer
    got = engine.generate(ids, 10).tokens
    assert torch.equal(got[:, : ids.shape[1] + 1], default[:, : ids.shape[1] + 1])
    if dtype == torch.float32:
        assert_greedy_under_plain_forward(model, default, ids.shape[1])
        assert_greedy_under_plain_forward(model, got, ids.shape[1])
