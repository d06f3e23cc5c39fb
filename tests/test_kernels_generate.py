"""qsparse.generate on CPU: the one decode path (the model's forward over a static KV cache,
fused projections, Triton GEMVs under the interpreter) reproduces greedy decoding by plain full
forwards in every mode, and the CLI runs end to end on a tiny preset."""

from __future__ import annotations

import pytest
import torch

from qsparse.cli.generate import main as cli_main
from qsparse.generate import (
    MODES,
    DecodeEngine,
    calibrate_thresholds,
    compile_backend,
    convert,
    generate,
    kept_fraction,
)
from qsparse.kernels import HAS_TRITON
from qsparse.models import LlamaConfig, LlamaForCausalLM


def tiny(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig.from_preset("tiny", **overrides)
    return LlamaForCausalLM(cfg).eval()


def plain_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation by full forwards, no cache (the plain PyTorch reference)."""
    return model.generate(ids, max_new_tokens=n, use_cache=False)


def qkv_modes(engine: DecodeEngine) -> set[str]:
    return {layer.self_attn.qkv.mode for layer in engine.decoder.model.layers}


@pytest.mark.parametrize("mode", MODES)
def test_engine_and_model_generate_match_plain_forward(mode):
    model = convert(tiny(), mode, sparsity=0.5)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1)
    )
    expected = plain_greedy(model, ids, 6)
    engine = DecodeEngine(model)
    assert engine.decoder is model  # no kernels on CPU: the model's own modules, no copies
    res = engine.generate(ids, 6)
    assert torch.equal(res.tokens, expected)
    assert torch.equal(model.generate(ids, max_new_tokens=6), expected)  # the same path
    assert res.tokens_per_s > 0


def test_bitnet_mode_is_bitnet_b158_with_subln():
    model = convert(tiny(), "bitnet")
    site = model.model.layers[0].self_attn.qsparse_input
    assert site.norm is not None and site.act_bits == 8 and site.keep() is None
    assert model.model.layers[0].mlp.down_proj.weight_quant == "ternary"


def test_engine_gqa_and_rerun_same_shape():
    model = convert(tiny(num_key_value_heads=1), "qsparse", sparsity=0.7)
    ids = torch.randint(0, 256, (1, 3))
    eng = DecodeEngine(model)
    first = eng.generate(ids, 5).tokens
    assert torch.equal(first, plain_greedy(model, ids, 5))
    assert torch.equal(eng.generate(ids, 5).tokens, first)  # cache reused, state reset


def test_fused_view_without_kernels_matches_the_model():
    # the view the kernels run in (fused q|k|v and gate|up sites), here on reference projections
    from qsparse.decode_view import decoder_view

    for mode in MODES:
        model = convert(tiny(), mode, sparsity=0.5)
        view = decoder_view(model, use_kernels=False)
        assert view is model
        view = decoder_view(model, use_kernels=True)  # CPU: modes chosen, kernels fall back
        ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(view(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_ternary_decode_kernels_serve_only_their_own_activation_eps():
    """The ternary GEMVs floor the activation absmax at the kernel constant
    :data:`~qsparse.kernels.gemv.ACT_EPS`: a site with another ``QuantConfig.eps`` decodes on
    the model's own modules (the kernels would quantize with 1e-5 and differ from the model
    where a token's max |x| is below eps), one with that eps on the kernels."""
    from qsparse import sparsify
    from qsparse.decode_view import decoder_view
    from qsparse.kernels.gemv import ACT_EPS
    from qsparse.nn.config import QuantConfig, SparsityConfig

    for eps, expect in ((ACT_EPS, "ternary"), (0.01, "reference")):
        model = tiny()
        quant = QuantConfig(**{**QuantConfig.preset("bitnet").to_dict(), "eps": eps})
        sparsify(model, sparsity=SparsityConfig(ratio=0.5), quant=quant)
        view = decoder_view(model, use_kernels=True)  # CPU: modes chosen, kernels fall back
        modes = set()
        for layer in view.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            modes |= {p.mode for p in (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down_proj)}
        assert modes == {expect}, (eps, modes)
        ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(view(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


ENGINE_INTERPRETER_SCRIPT = """
import torch
from qsparse.generate import MODES, DecodeEngine, convert
from qsparse.models import LlamaConfig, LlamaForCausalLM

expect = {"dense": "dense", "qsparse": "sparse", "bitnet": "ternary", "bitnet_qsparse": "ternary",
          "qsparse_threshold": "threshold"}
for mode in MODES:
    torch.manual_seed(0)
    model = convert(LlamaForCausalLM(LlamaConfig.from_preset("tiny")).eval(), mode, 0.5)
    with torch.no_grad():  # SubLN weights away from their initial ones
        for m in model.modules():
            if isinstance(getattr(m, "norm", None), torch.nn.RMSNorm):
                m.norm.weight.uniform_(0.5, 1.5)
    for batch in (1, 2) if mode != "dense" else (1,):
        ids = torch.randint(0, 256, (batch, 3), generator=torch.Generator().manual_seed(batch))
        engine = DecodeEngine(model)
        modes = {layer.self_attn.qkv.mode for layer in engine.decoder.model.layers}
        assert modes == {expect[mode]}, (mode, modes)
        layer = engine.decoder.model.layers[0]
        if mode in ("qsparse", "bitnet", "bitnet_qsparse"):  # residual adds formed by the sites
            h = torch.zeros(batch, 1, model.config.hidden_size)
            for site in (layer.self_attn.qkv, layer.mlp.gate_up):
                assert site.sums_residual(h) == (batch == 1 or mode != "qsparse"), (mode, batch)
        if mode.startswith("bitnet"):  # the ternary kernel computes layer norm and SubLN
            assert isinstance(layer.input_layernorm, torch.nn.Identity), mode
            assert layer.self_attn.qkv.subln is not None and layer.mlp.down_proj.subln is not None
        got = engine.generate(ids, 3).tokens
        ref = model.generate(ids, max_new_tokens=3, use_cache=False)
        assert torch.equal(got, ref), (mode, batch, got, ref)
        if batch == 1 and mode == "bitnet_qsparse":  # kernels as custom ops, compiled step
            compiled = DecodeEngine(model, compile="aot_eager").generate(ids, 3).tokens
            assert torch.equal(compiled, ref), (mode, "compiled", compiled, ref)
print("ENGINE INTERPRETER OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_engine_with_kernels_under_the_interpreter_matches_plain_forward():
    # every mode through its Triton kernels on CPU (~1 min): sparse GEMV at batch 1, top-k +
    # GEMM at batch 2, ternary GEMV at 1 and 2 (with and without top-k), compiled with aot_eager
    from conftest import run_interpreted

    assert "ENGINE INTERPRETER OK" in run_interpreted(ENGINE_INTERPRETER_SCRIPT)


GLU_ENGINE_SCRIPT = """
import torch
from qsparse import decode_view
from qsparse.generate import DecodeEngine, convert
from qsparse.models import LlamaConfig, LlamaForCausalLM

assert decode_view.GLU_IN_SELECTION == ("ternary",)  # the default; the engine test runs it
# here each mode the other way: the GLU in the top-k / list kernel, and in a kernel of its own
# in front of the ternary sites
for mode, act, glu in (("qsparse", "relu2", True), ("qsparse", "silu", True),
                       ("bitnet_qsparse", "relu2", False), ("bitnet", "silu", False),
                       ("qsparse_threshold", "relu2", True)):
    decode_view.GLU_IN_SELECTION = decode_view.GLU_SITE_MODES if glu else ()
    torch.manual_seed(0)
    cfg = LlamaConfig.from_preset("tiny", hidden_act=act, num_hidden_layers=1)
    model = convert(LlamaForCausalLM(cfg).eval(), mode, 0.5)
    for batch in (1, 2):
        ids = torch.randint(0, 256, (batch, 3), generator=torch.Generator().manual_seed(batch))
        engine = DecodeEngine(model)
        down = engine.decoder.model.layers[0].mlp.down_proj
        kind = act + "_glu" if glu else "none"
        assert down.producer.kind == kind, (mode, act, down.producer)
        got = engine.generate(ids, 3).tokens
        ref = model.generate(ids, max_new_tokens=3, use_cache=False)
        assert torch.equal(got, ref), (mode, act, batch, got, ref)
print("GLU ENGINE OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_glu_in_the_down_selection_decodes_as_the_plain_forward():
    # decode_view.GLU_IN_SELECTION, the choice the default does not make in each mode: the
    # down site's selection / list kernel computing the GLU from the gate|up output (top-k,
    # threshold), or a GLU of its own in front of the ternary activation kernel; greedy tokens
    # unchanged at batch 1 (list kernel) and 2 (masked top-k / batched ternary kernel)
    from conftest import run_interpreted

    assert "GLU ENGINE OK" in run_interpreted(GLU_ENGINE_SCRIPT)


THRESHOLD_ENGINE_SCRIPT = """
import torch
import qsparse
from qsparse.generate import DecodeEngine
from qsparse.models import LlamaConfig, LlamaForCausalLM
from qsparse.nn import SparsityConfig

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig.from_preset("tiny"))
qsparse.sparsify(model, sparsity=SparsityConfig(ratio=0.5, pattern="threshold"))
model.train()  # one tracked batch sets every site's threshold at its ratio's quantile
with torch.no_grad():
    model(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)))
assert qsparse.track_thresholds(model) == 4 * model.config.num_hidden_layers
model.eval()
for dtype, batch in ((torch.float32, 1), (torch.float32, 2), (torch.bfloat16, 1)):
    model.to(dtype)  # bf16: the list kernel writes packed words
    ids = torch.randint(0, 256, (batch, 3), generator=torch.Generator().manual_seed(batch))
    engine = DecodeEngine(model)
    layer = engine.decoder.model.layers[0]
    modes = {layer.self_attn.qkv.mode, layer.self_attn.o_proj.mode, layer.mlp.gate_up.mode,
             layer.mlp.down_proj.mode}
    assert modes == {"threshold"}, modes
    # the list kernels of q|k|v and gate|up compute the layer's RMSNorm (the layer skips its own)
    assert layer.self_attn.qkv.producer.kind == "rmsnorm", layer.self_attn.qkv.producer
    assert layer.mlp.gate_up.producer.kind == "rmsnorm", layer.mlp.gate_up.producer
    assert isinstance(layer.input_layernorm, torch.nn.Identity)
    got = engine.generate(ids, 4).tokens
    ref = model.generate(ids, max_new_tokens=4, use_cache=False)
    assert torch.equal(got, ref), (dtype, batch, got, ref)
print("THRESHOLD ENGINE OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_threshold_sites_decode_through_the_threshold_gemv_under_the_interpreter():
    """A model with fixed per-site thresholds (TEAL, ``sparsity=threshold`` training) decodes
    through the threshold list GEMV (batch 1, fp32 and bf16 with packed list words; the list
    kernel computing the layer's RMSNorm) and the masked GEMM (batch 2), greedy tokens equal
    to plain forwards."""
    from conftest import run_interpreted

    assert "THRESHOLD ENGINE OK" in run_interpreted(THRESHOLD_ENGINE_SCRIPT)


def test_threshold_calibration_keeps_one_minus_ratio_at_the_decoded_positions():
    """``convert(..., "qsparse_threshold", S, ids, skip)`` sets each site's threshold to its
    S-quantile of |x| over positions ``skip`` on: there, every site keeps ``n - ceil(S n)`` of
    its ``n`` inputs (no ties in fp32); the prompt positions before ``skip`` do not count."""
    import math

    from qsparse.generate import _site_inputs

    model = tiny()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    convert(model, "qsparse_threshold", 0.6, ids, skip=5)
    kept = _site_inputs(model, ids, 5, lambda sp, x: (int((x.abs() > sp.threshold).sum()), x))
    assert len(kept) == 4 * model.config.num_hidden_layers
    for name, (count, x) in kept.items():
        n = x.numel()
        assert x.shape[:2] == (2, 15), name
        assert count == n - math.ceil(0.6 * n), (name, count, n)
    frac = kept_fraction(model, ids, 5)
    assert abs(frac - 0.4) < 0.01, frac
    assert calibrate_thresholds(model, ids, 5) == len(kept)  # the same thresholds again
    assert kept_fraction(model, ids, 5) == frac
    assert kept_fraction(convert(tiny(), "qsparse", 0.6), ids) is None  # no threshold sites
    with pytest.raises(ValueError, match="skip"):
        kept_fraction(model, ids, 20)


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
    assert out.count("threshold sites kept") == 1  # the qsparse_threshold row only
    assert cli_main(["--preset", "tiny", "--mode", "sparse"]) == 2
    assert "qsparse-generate: --mode 'sparse'" in capsys.readouterr().err


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
    assert cli_main([*argv[:-1], "bogus"]) == 2
    assert "qsparse-generate: --compile" in capsys.readouterr().err
