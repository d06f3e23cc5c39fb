"""qsparse.generate on CPU: the decode engine (static KV cache, fused projections, reference
projections) reproduces the model's own greedy generation in every mode, the packed-ternary
fallback equals the dequantized weights, and the CLI runs end to end on a tiny preset."""

from __future__ import annotations

import pytest
import torch

from qsparse.cli.generate import main as cli_main
from qsparse.generate import (
    MODES,
    DecodeEngine,
    _Projection,
    compile_backend,
    convert,
    generate,
)
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
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    sites = [
        (attn.qsparse_input, [attn.q_proj, attn.k_proj, attn.v_proj], 128),
        (mlp.qsparse_input, [mlp.gate_proj, mlp.up_proj], 352),  # packed padded to 384 outputs
    ]
    for site, lins, n in sites:
        ref = _Projection(site, lins, use_kernels=False)
        packed = _Projection(site, lins, use_kernels=True)
        assert packed.mode == "ternary" and ref.mode == "reference"
        assert packed.packed.shape[1] % 64 == 0
        x = torch.randn(3, 64)
        assert packed(x).shape == (3, n)
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


# -- torch.compile of the decode step ----------------------------------------------------------


def _hf_llama():
    from conftest import build_tiny_hf_model

    return build_tiny_hf_model("llama")  # HF RMSNorm / SiLU, GQA (4 heads, 2 KV heads)


def test_engine_reads_hf_llama():
    # transformers 5 reports rope_parameters also as config.rope_scaling (rope_type "default")
    model = convert(_hf_llama(), "qsparse", sparsity=0.5)
    ids = torch.randint(0, 384, (2, 4), generator=torch.Generator().manual_seed(3))
    expected = ids
    for _ in range(5):  # greedy by full forwards (HF generate would stop at EOS)
        nxt = model(expected).logits[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, nxt], dim=1)
    assert torch.equal(DecodeEngine(model).generate(ids, 5).tokens, expected)


@pytest.mark.parametrize(
    "build, mode",
    [(tiny, "dense"), (tiny, "qsparse"), (tiny, "bitnet_qsparse"), (_hf_llama, "qsparse")],
    ids=["dense", "qsparse", "bitnet_qsparse", "hf_qsparse"],
)
def test_compiled_step_matches_eager_without_graph_breaks(build, mode):
    model = convert(build(), mode, sparsity=0.5)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1)
    )
    expected = DecodeEngine(model).generate(ids, 6).tokens
    counters = torch._dynamo.utils.counters
    counters.clear()
    eng = DecodeEngine(model, compile="aot_eager")  # fullgraph=True: a graph break raises
    assert torch.equal(eng.generate(ids, 6).tokens, expected)
    assert torch.equal(eng.generate(ids, 6).tokens, expected)  # same shape: no recompile
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_compiled_step_new_shapes_do_not_exhaust_the_recompile_limit():
    # each engine and (batch, length) buffer shape compiles once, with a recompile budget of
    # its own (fullgraph=True fails past recompile_limit)
    ids = torch.randint(0, 256, (1, 2), generator=torch.Generator().manual_seed(2))
    with torch._dynamo.config.patch(recompile_limit=1):
        for mode in ("dense", "qsparse"):
            model = convert(tiny(), mode, sparsity=0.5)
            eng = DecodeEngine(model, compile="eager")
            for n in (2, 3, 4):
                expected = DecodeEngine(model).generate(ids, n).tokens
                assert torch.equal(eng.generate(ids, n).tokens, expected)


def test_compile_argument_is_validated():
    assert compile_backend(None) is None and compile_backend(False) is None
    assert compile_backend(True) == "inductor" and compile_backend("aot_eager") == "aot_eager"
    for bad in ("no_such_backend", 1, "", ["eager"]):
        with pytest.raises(ValueError, match=r"compile=.*inductor.*aot_eager"):
            DecodeEngine(tiny(), compile=bad)
    with pytest.raises(ValueError, match="compile="):
        generate(tiny(), torch.zeros(1, 2, dtype=torch.long), 2, compile="nope")


def test_cli_compile_flag(capsys):
    from qsparse.cli.generate import _parser

    assert _parser().parse_args([]).compile is None
    assert _parser().parse_args(["--compile"]).compile == "inductor"
    assert _parser().parse_args(["--compile", "eager", "--mode", "dense"]).compile == "eager"
    argv = ["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--mode", "dense"]
    argv += ["--new-tokens", "3", "--prompt-len", "2", "--compile", "eager"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "compile=eager" in out and "| dense |" in out
    assert cli_main(argv[:-2]) == 0
    assert "compile=off" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--compile"):
        cli_main([*argv[:-1], "bogus"])
