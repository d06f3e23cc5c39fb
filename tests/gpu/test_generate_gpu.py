"""GPU tier: the decode engine with ``compile=True`` (inductor) inside the CUDA graph, Triton
GEMV kernels on, decodes the same greedy tokens as the eager step (CUDA graph as well). fp32:
in bf16 the fused element-wise math rounds differently from eager's per-op rounding, which can
flip near-tied greedy tokens of a random model (both stay equally close to fp32).

Run with ``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import pytest
import torch

from qsparse.generate import DecodeEngine, convert
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
    "mode, path", [("dense", "dense"), ("qsparse", "sparse"), ("bitnet_qsparse", "ternary")]
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


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("mode", ["dense", "qsparse", "bitnet", "bitnet_qsparse"])
@pytest.mark.parametrize("batch", [1, 3])
def test_engine_matches_plain_forward(mode, batch):
    """Every mode, kernels on, CUDA graph, batch 1 (carried-threshold sparse GEMV) and 3
    (carried top-k + GEMM): the greedy tokens of plain full forwards (fp32)."""
    model = small_cuda(mode, torch.float32)
    ids = torch.randint(
        0, model.config.vocab_size, (batch, 6), generator=torch.Generator().manual_seed(2)
    )
    expected = model.generate(ids.cuda(), max_new_tokens=10, use_cache=False)
    got = DecodeEngine(model, use_kernels=True, cuda_graph=True).generate(ids, 10).tokens
    assert torch.equal(got, expected)
