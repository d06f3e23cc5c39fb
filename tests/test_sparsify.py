"""qsparse.sparsify on tiny transformers models: masks, parameter reuse, errors, statistics."""

import pytest
import torch
from conftest import HF_FAMILIES, build_tiny_hf_model

import qsparse
from qsparse.nn import (
    ActivationSparsifier,
    QSparseLinear,
    QuantConfig,
    SparsityConfig,
    absmax_quantize,
    absmean_ternarize,
)

#: overrides of the conftest tiny model (hidden 64, 2 layers, 4 heads / 2 KV heads); no pad
#: token (its embedding row would be zero: a token whose inputs have no nonzeros to keep)
SHAPE = dict(vocab_size=97, intermediate_size=96, max_position_embeddings=64, pad_token_id=None)


def tiny(family: str = "llama", **overrides) -> torch.nn.Module:
    return build_tiny_hf_model(family, **{**SHAPE, **overrides})


def capture_inputs(model):
    """Record the input of every projection during one forward."""
    seen, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1].endswith("proj"):

            def hook(m, args, name=name):
                x = args[0]
                seen[name] = m.act(x) if getattr(m, "act", None) is not None else x

            handles.append(mod.register_forward_pre_hook(hook))
    return seen, handles


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_zero_sparsity_keeps_logits(family):
    model = tiny(family)
    ids = torch.randint(0, 97, (2, 10))
    ref = model(ids).logits
    qsparse.sparsify(model, 0.0)
    assert torch.allclose(model(ids).logits, ref, atol=1e-5)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_every_projection_input_has_exactly_k_nonzeros_and_qkv_share_a_mask(family):
    model = tiny(family)
    qsparse.sparsify(model, SparsityConfig(ratio=0.6))
    seen, handles = capture_inputs(model)
    model(torch.randint(0, 97, (2, 9)))
    for h in handles:
        h.remove()
    for i in range(2):
        p = f"model.layers.{i}"
        q, k, v = (seen[f"{p}.self_attn.{n}_proj"] for n in "qkv")
        assert torch.equal(q, k) and torch.equal(q, v), "q/k/v share one sparsified input"
        g, u = seen[f"{p}.mlp.gate_proj"], seen[f"{p}.mlp.up_proj"]
        assert torch.equal(g, u)
        for name, dim in [
            ("self_attn.q_proj", 64),
            ("self_attn.o_proj", 64),
            ("mlp.gate_proj", 64),
            ("mlp.down_proj", 96),
        ]:
            x = seen[f"{p}.{name}"]
            nnz = (x != 0).sum(-1)
            assert (nnz == int(0.4 * dim + 1e-6)).all(), name


def test_parameters_are_reused_and_names_kept():
    model = tiny()
    before = dict(model.named_parameters())
    keys = set(model.state_dict())
    report = qsparse.sparsify(model, 0.5)
    after = dict(model.named_parameters())
    assert set(model.state_dict()) == keys
    assert all(after[n] is p for n, p in before.items())
    assert model.lm_head.weight is before["lm_head.weight"]
    assert "lm_head" in report.skipped and len(report.converted) == 14
    assert all(isinstance(model.get_submodule(n), QSparseLinear) for n in report.converted)


def test_idempotent_and_reconfigurable():
    model = tiny()
    ids = torch.randint(0, 97, (1, 8))
    qsparse.sparsify(model, 0.5, quant=QuantConfig(act_bits=8, subln=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # make SubLN weights non-trivial: a re-apply must keep them
    out1 = model(ids).logits
    qsparse.sparsify(model, 0.5, quant=QuantConfig(act_bits=8, subln=True))
    assert torch.equal(model(ids).logits, out1)
    n_hooks = len(model.model.layers[0].self_attn._forward_pre_hooks)
    qsparse.sparsify(model, 0.25, quant=QuantConfig(act_bits=8, subln=True))
    assert len(model.model.layers[0].self_attn._forward_pre_hooks) == n_hooks
    assert model.model.layers[0].self_attn.qsparse_input.ratio == 0.25


def test_module_filters_match_at_boundaries():
    model = tiny(num_hidden_layers=12)
    report = qsparse.sparsify(model, 0.5, modules_to_not_convert=["lm_head", "layers.1"])
    assert "model.layers.1.mlp.down_proj" in report.skipped
    assert not isinstance(model.model.layers[1].mlp.down_proj, QSparseLinear)
    assert isinstance(model.model.layers[11].mlp.down_proj, QSparseLinear)
    assert "model.layers.11.mlp.down_proj" in report.converted


def test_lm_head_converted_when_asked():
    model = tiny()
    report = qsparse.sparsify(model, 0.5, modules_to_not_convert=[])
    assert isinstance(model.lm_head, QSparseLinear) and "lm_head" in report.sites


def test_relu2_activation_swap_updates_config():
    model = tiny()
    qsparse.sparsify(model, 0.0, activation="relu2")
    assert model.config.hidden_act == "relu2"
    assert isinstance(model.model.layers[0].mlp.act_fn, qsparse.ReLUSquared)
    assert model.config.qsparse["activation"] == "relu2"


def test_qkv_share_one_sparsifier_call_and_its_subln_weights():
    """One mask for the three q/k/v inputs (README, 'What the layers compute'): one sparsifier
    runs once per attention forward, so q, k and v see the same input even when the site's
    SubLN weight is trained; three sparsifiers (one per projection) fail both checks, whatever
    their names."""
    model = tiny()
    qsparse.sparsify(model, SparsityConfig(ratio=0.5), quant=QuantConfig(subln=True))
    ids = torch.randint(0, 97, (2, 9))
    calls: list[ActivationSparsifier] = []
    handles = []
    torch.manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, ActivationSparsifier):
            handles.append(mod.register_forward_hook(lambda m, args, out: calls.append(m)))
            with torch.no_grad():  # as after training: every site's norm weight differs
                mod.norm.weight.uniform_(0.2, 2.0)
    model(ids)
    for h in handles:
        h.remove()
    assert len(calls) == len(set(map(id, calls))) == 4 * 2, "qkv, o, gate_up, down per layer"
    seen, handles = capture_inputs(model)
    model(ids)
    for h in handles:
        h.remove()
    for i in range(2):
        q, k, v = (seen[f"model.layers.{i}.self_attn.{n}_proj"] for n in "qkv")
        assert torch.equal(q, k) and torch.equal(q, v)


@pytest.mark.parametrize("act_bits", [None, 8])
def test_bitnet_ternary_weights_in_forward(act_bits: int | None) -> None:
    """The forward of a ternary model equals the dense model with every projection weight
    replaced by absmean_ternarize(W) (per tensor) and, with ``act_bits``, every projection
    input by its per-token absmax quantization, both computed here; the lm head stays dense."""
    ids = torch.randint(0, 97, (2, 10))
    model, ref = tiny(), tiny()
    dense = model(ids).logits
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith("_proj"):
                mod.weight.copy_(absmean_ternarize(mod.weight, ste=False))
    ternary_only = ref(ids).logits
    if act_bits is not None:
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith("_proj"):
                mod.register_forward_pre_hook(
                    lambda m, args: (absmax_quantize(args[0], act_bits, ste=False),)
                )
    qsparse.sparsify(model, 0.0, quant=QuantConfig(weights="ternary", act_bits=act_bits))
    out = model(ids).logits
    assert torch.allclose(out, ref(ids).logits, atol=1e-5)
    assert not torch.allclose(out, dense, atol=1e-2)
    if act_bits is not None:  # the activation quantization is visible in the logits
        assert not torch.allclose(out, ternary_only, atol=1e-4)
    w = model.model.layers[0].mlp.up_proj.quantized_weight()
    assert len(torch.unique(w)) == 3


def test_unsupported_model_class():
    with pytest.raises(ValueError, match="does not support .*Sequential"):
        qsparse.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), 0.5)


def test_bad_settings_leave_model_untouched():
    model = tiny()
    with pytest.raises(ValueError, match="block_size=48"):
        qsparse.sparsify(model, SparsityConfig(ratio=0.5, pattern="block_topk", block_size=48))
    assert not isinstance(model.model.layers[0].self_attn.q_proj, QSparseLinear)
    with pytest.raises(ValueError, match=r"sparsity\.ratio"):
        qsparse.sparsify(model, 1.2)


def test_measured_sparsity_and_activated_parameters():
    model = tiny()
    report = qsparse.sparsify(model, SparsityConfig(ratio=0.5, down=0.75))
    stats = qsparse.measure(model, torch.randint(0, 97, (2, 16)))
    assert stats["layers.0.self_attn.qkv"] == pytest.approx(0.5)
    assert stats["layers.1.mlp.down_proj"] == pytest.approx(0.75, abs=1e-6)
    # hand count: linear weights times input density, everything else dense
    layer = 64 * (64 + 32 + 32) * 0.5 + 64 * 64 * 0.5 + 2 * 64 * 96 * 0.5 + 96 * 64 * 0.25
    rest = report.total_parameters - 2 * (64 * 128 + 64 * 64 + 2 * 64 * 96 + 96 * 64)
    assert report.activated_parameters == int(2 * layer + rest)
    assert qsparse.activated_parameters(model) == report.activated_parameters
    assert stats["overall"] == pytest.approx(
        1 - report.activated_parameters / report.total_parameters
    )


def test_set_sparsity_ratio_fraction_for_warmup():
    model = tiny()
    qsparse.sparsify(model, SparsityConfig(ratio=0.5, down=0.8))
    qsparse.set_sparsity_ratio(model, fraction=0.5)
    sps = qsparse.sparsifiers(model)
    assert sps["layers.0.mlp.down_proj"].ratio == pytest.approx(0.4)
    assert sps["layers.0.self_attn.qkv"].ratio == pytest.approx(0.25)
    qsparse.set_sparsity_ratio(model, fraction=0.0)
    ids = torch.randint(0, 97, (1, 6))
    dense = tiny()
    assert torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-5)
    with pytest.raises(ValueError):
        qsparse.set_sparsity_ratio(model, 1.0)


def test_failed_reconfiguration_leaves_ratios_untouched():
    model = tiny()
    qsparse.sparsify(model, 0.5)
    # only the down_proj override is invalid (k=0): every other site validates first
    with pytest.raises(ValueError, match="k=0"):
        qsparse.sparsify(model, SparsityConfig(ratio=0.25, down=0.995))
    assert all(sp.ratio == 0.5 for sp in qsparse.sparsifiers(model).values())


def test_sparsity_counters_are_integers_that_survive_a_dtype_cast():
    model = tiny()
    qsparse.sparsify(model, 0.5)
    model.to(torch.bfloat16)
    sp = qsparse.sparsifiers(model)["layers.0.mlp.down_proj"]
    assert sp.zeros_seen.dtype == sp.values_seen.dtype == torch.int64
    qsparse.track_sparsity(model)
    ids = torch.randint(0, 97, (3, 13))
    for _ in range(20):  # 74880 values: bf16 (8 significant bits) would round the count
        model(ids)
    assert int(sp.values_seen) == 20 * 3 * 13 * 96
    assert int(sp.zeros_seen) == 20 * 3 * 13 * 48
    # past 2**24 (where fp32 stops counting odd numbers) a count still moves by exactly one
    sp.values_seen.fill_(2**24 + 1)
    model(torch.randint(0, 97, (1, 1)))
    assert int(sp.values_seen) == 2**24 + 1 + 96


def _warmup_graphs(backend: str, steps: int) -> int:
    """Graphs torch.compile makes while a warm-up changes the ratio at every step (in
    dynamic_sparsity, as LMModule calls its model); the outputs follow the ratio."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from qsparse.nn.sites import dynamic_sparsity

    torch._dynamo.reset()
    model = tiny()
    qsparse.sparsify(model, SparsityConfig(ratio=0.5, down=0.8))
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        for step in range(steps):
            qsparse.set_sparsity_ratio(model, fraction=step / (steps - 1))
            with dynamic_sparsity():
                out = compiled(input_ids=ids).logits
            torch.testing.assert_close(out, model(input_ids=ids).logits)
    torch._dynamo.reset()
    return counter.frame_count


def test_ratio_changes_do_not_recompile():
    """k = 0 (dense) -> first k -> symbolic k: at most 3 graphs for any number of ratios
    (without dynamic_sparsity, one per step)."""
    assert _warmup_graphs("eager", 8) <= 3


@pytest.mark.slow
def test_ratio_changes_do_not_recompile_with_inductor():
    assert _warmup_graphs("inductor", 6) <= 3
