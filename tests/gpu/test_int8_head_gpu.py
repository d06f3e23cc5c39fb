"""GPU tier: the weight-only int8 lm-head GEMV (:mod:`qsparse.kernels.int8_gemv`) against its
PyTorch reference on fresh random inputs on CUDA (head shapes and odd ones, batch 1-16, bf16
and fp32), and the engine with ``head_bits=8`` (CUDA graph, compiled step) against the
fake-quantized model.

Run with ``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qsparse.generate import DecodeEngine, convert
from qsparse.kernels import HAS_TRITON
from qsparse.kernels.int8_gemv import (
    dequantize_int8_rows,
    int8_gemv,
    int8_gemv_reference,
    quantize_int8_rows,
)
from qsparse.models import LlamaConfig, LlamaForCausalLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not HAS_TRITON, reason="needs Triton"),
]


@pytest.mark.parametrize("v, d", [(32000, 2048), (49152, 576), (1000, 333), (77, 4096)])
@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_gemv_matches_reference(v, d, batch, dtype):
    gen = torch.Generator(device="cuda").manual_seed(v + d + batch)
    w = torch.randn(v, d, device="cuda", generator=gen) * 0.02
    q, scale = quantize_int8_rows(w)
    x = torch.randn(batch, d, device="cuda", generator=gen).to(dtype)
    ref = int8_gemv_reference(x, q, scale, torch.float32)
    got = int8_gemv(x, q, scale, out_dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(int8_gemv(x, q, scale), ref.to(dtype))


@pytest.mark.parametrize("compile", [False, True])
def test_engine_int8_head_matches_fake_quant(compile):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig.from_preset("debug"))
    model = convert(model.float().eval(), "bitnet_qsparse", 0.5)
    fake = copy.deepcopy(model)
    w = model.lm_head.weight
    fake.lm_head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda")
    with torch.no_grad():
        fake.lm_head.weight.copy_(dequantize_int8_rows(*quantize_int8_rows(w)))
    ids = torch.randint(0, model.config.vocab_size, (1, 6), device="cuda")
    got = DecodeEngine(model, compile=compile, head_bits=8).generate(ids, 8).tokens
    ref = DecodeEngine(fake, compile=compile).generate(ids, 8).tokens
    assert torch.equal(got, ref)
