"""qsparse.generate on CPU: the decode engine (static KV cache, fused projections, reference
projections) reproduces the model's own greedy generation in every mode, the packed-ternary
fallback equals the dequantized weights, and the CLI runs end to end on a tiny preset."""

from __future__ import annotations

import pytest
import torch

from qsparse.cli.generate import main as cli_main
from qsparse.generate import MODES, DecodeEngine, _Projection, convert
from qsparse.models.llama import LlamaConfig, LlamaForCausalLM


def tiny(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig.from_preset("tiny", **overrides)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("mode", MODES)
def test_engine_matches_model_generate(mode):
    model = convert(tiny(), mode, sparsity=0.5)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1)
    )
    expected = model.generate(ids, max_new_tokens=6)
    res = DecodeEngine(model).generate(ids, 6)
    assert torch.equal(res.tokens, expected)
    assert res.tokens_per_s > 0


def test_engine_gqa_and_rerun_same_shape():
    model = convert(tiny(num_key_value_heads=1), "qsparse", sparsity=0.7)
    ids = torch.randint(0, 256, (1, 3))
    eng = DecodeEngine(model)
    first = eng.generate(ids, 5).tokens
    assert torch.equal(first, model.generate(ids, max_new_tokens=5))
    assert torch.equal(eng.generate(ids, 5).tokens, first)  # cache reused, state reset


def test_packed_ternary_projection_fallback_equals_dequantized():
    model = convert(tiny(), "bitnet_qsparse", sparsity=0.5)
    attn = model.model.layers[0].self_attn
    lins = [attn.q_proj, attn.k_proj, attn.v_proj]
    ref = _Projection(attn.qsparse_input, lins, use_kernels=False)
    packed = _Projection(attn.qsparse_input, lins, use_kernels=True)
    assert packed.mode == "ternary" and ref.mode == "reference"
    x = torch.randn(3, 64)
    torch.testing.assert_close(packed(x), ref(x), rtol=1e-5, atol=1e-5)


def test_engine_rejects_bad_arguments():
    eng = DecodeEngine(tiny())
    with pytest.raises(ValueError, match="input_ids"):
        eng.generate(torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.generate(torch.zeros(1, 2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="mode"):
        convert(tiny(), "sparse")
    with pytest.raises(ValueError, match="Llama-style"):
        DecodeEngine(torch.nn.Linear(2, 2))


def test_cli_runs_all_modes(capsys):
    assert (
        cli_main(
            [
                "--preset",
                "tiny",
                "--device",
                "cpu",
                "--dtype",
                "fp32",
                "--new-tokens",
                "3",
                "--prompt-len",
                "2",
                "--batch",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for mode in MODES:
        assert f"| {mode} |" in out
    with pytest.raises(SystemExit):
        cli_main(["--preset", "tiny", "--mode", "sparse"])
