"""TEAL, CATS and Q-Sparse as methods (qsparse/methods/): hand computations of their key steps,
the plumbing into sparsify's sites, metrics and export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_hf_model, build_tiny_tokenizer

import qsparse
from qsparse.methods import (
    CATS,
    TEAL,
    AttributionSelection,
    MagnitudeHistogram,
    QSparse,
    greedy_allocation,
)
from qsparse.methods.allocation import layer_sites
from qsparse.methods.calibration import calibration_batches
from qsparse.nn import ActivationSparsifier

TEXT = [
    "In the beginning God created the heaven and the earth.",
    "Sparse activations make large language models cheaper to run on small machines.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Ternary weights take the values minus one, zero and plus one.",
] * 12


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def batches(tokenizer) -> list[torch.Tensor]:
    return calibration_batches(tokenizer, TEXT, tokens=512, seq_len=64)


def test_threshold_from_a_known_histogram() -> None:
    hist = MagnitudeHistogram(edges=torch.tensor([0.0, 1.0, 2.0, 4.0]))
    hist.add(torch.tensor([[0.5, -1.0], [3.9, 10.0]]))  # 10 lands in the last bin
    assert hist.counts.tolist() == [1.0, 1.0, 2.0]
    hist.counts = torch.tensor([2.0, 4.0, 2.0], dtype=torch.float64)
    # s = 0.5: 4 of 8 counts; bin 1 holds counts 3..6 -> t = 1 + (4 - 2) / 4 * (2 - 1)
    assert hist.icdf(0.5) == pytest.approx(1.5)
    # s = 0.875: 7 of 8; bin 2 -> t = 2 + (7 - 6) / 2 * (4 - 2)
    assert hist.icdf(0.875) == pytest.approx(3.0)
    assert hist.icdf(0.0) == 0.0 and hist.icdf(0.25) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        hist.icdf(1.5)


def test_threshold_site_zeroes_the_calibrated_fraction() -> None:
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 0.3).sample((200, 512))
    hist = MagnitudeHistogram()
    for chunk in x.split(50):
        hist.add(chunk)
    t = hist.icdf(0.4)
    assert t == pytest.approx(-0.3 * math.log(0.6), rel=0.02)  # |Laplace(b)| icdf
    sp = ActivationSparsifier(512, pattern="threshold")
    sp.threshold.fill_(t)
    out = sp(x)
    assert float((out == 0).float().mean()) == pytest.approx(0.4, abs=0.005)
    assert torch.equal(out, x * (x.abs() > t))
    assert sp.keep() is None and "threshold=" in repr(sp)


def test_greedy_allocation_two_site_toy_by_hand() -> None:
    # error = s_a + 4 s_b^2, equal weights, step 0.1; by hand:
    # 1: a -> 0.1 (err .10) vs b -> 0.1 (.04): b     2: a (.1 + .04 = .14) vs b (.16): a
    # 3: a (.2 + .04 = .24) vs b (.1 + .16 = .26): a  weighted (0.2 + 0.1) / 2 = 0.15
    # 4: target 0.17 leaves 0.04: a (.24 + .04 = .28) vs b (.2 + 4 * .14^2 = .2784): b
    def error(s):
        return s["a"] + 4 * s["b"] ** 2

    s, history = greedy_allocation(error, {"a": 1.0, "b": 1.0}, target=0.17, step=0.1)
    assert [site for site, _ in history] == ["b", "a", "a", "b"]
    assert s == pytest.approx({"a": 0.2, "b": 0.14})
    assert [e for _, e in history] == pytest.approx([0.04, 0.14, 0.24, 0.2784])
    # steps are step / w: a weight-3 site moves a third as far per step
    s, history = greedy_allocation(lambda s: s["b"], {"a": 3.0, "b": 1.0}, 0.1, step=0.1)
    assert [site for site, _ in history] == ["a", "a", "a", "a"]
    assert s["a"] == pytest.approx(4 / 30) and s["b"] == 0.0


def test_teal_greedy_on_a_two_layer_model(tokenizer, batches) -> None:
    model = build_tiny_hf_model("llama")
    dense = model(batches[0]).logits
    result = TEAL(0.5, step=0.5, greedy_tokens=64).apply(model, tokenizer, batches)
    layers = layer_sites(model)
    assert len(layers) == 2
    # weight shares in units of d^2 (d=64, 2 of 4 heads for k/v, F=128): by hand
    assert layers[0][2] == {"qkv": 2.0, "o": 1.0, "gate_up": 4.0, "down": 2.0}
    for _, sites, weights, prefix in layers:
        names = {
            k: f"{prefix.removeprefix('model.')}." + n
            for k, n in zip(
                sites,
                ("self_attn.qkv", "self_attn.o_proj", "mlp.gate_up", "mlp.down_proj"),
                strict=True,
            )
        }
        s = {k: result.site_sparsity[names[k]] for k in sites}
        weighted = sum(s[k] * weights[k] for k in s) / sum(weights.values())
        assert weighted == pytest.approx(0.5)
        assert len(set(s.values())) > 1  # the greedy did not stay uniform
    # thresholds set in forward order on upstream-sparsified inputs: on the calibration text
    # every site zeroes its allocated fraction (to the histogram's resolution)
    measured = qsparse.measure(model, *batches)
    for name, target in result.site_sparsity.items():
        assert measured[name] == pytest.approx(target, abs=0.01), name
    assert result.achieved(measured) == pytest.approx(0.5, abs=0.01)  # weighted by w
    assert not torch.allclose(model(batches[0]).logits, dense)
    assert qsparse.get_settings(model)["method"]["name"] == "teal"


def _thresholds_one_pass_per_site(model, sites, batches, sparsity) -> dict[str, float]:
    """Reference for sequential_thresholds: a whole-model pass per site, cut at the site."""
    from qsparse.methods.calibration import StopForward, run_with_hooks, set_threshold, site_input

    for sp in sites.values():
        sp.threshold.zero_()
    out = {}
    for name, sp in sites.items():
        hist = MagnitudeHistogram()

        def hook(module, args, _hist=hist):
            _hist.add(site_input(module, args[0]))
            raise StopForward

        run_with_hooks(model, batches, [(sp, hook)])
        out[name] = set_threshold(sp, hist, sparsity[name])
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_layerwise_sequential_thresholds_equal_a_pass_per_site(family, batches) -> None:
    from qsparse.methods.calibration import sequential_thresholds

    model = build_tiny_hf_model(family)
    qsparse.sparsify(model, sparsity=qsparse.SparsityConfig(ratio=0.5, pattern="threshold"))
    sites = qsparse.sparsifiers(model)
    targets = {name: 0.3 + 0.1 * (i % 4) for i, name in enumerate(sites)}
    expected = _thresholds_one_pass_per_site(model, sites, batches, targets)
    got = sequential_thresholds(model, sites, batches, targets)
    assert list(got) == list(expected)
    for name in sites:
        assert got[name] == pytest.approx(expected[name], rel=1e-6), name
    assert all(v > 0 for v in got.values())


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_teal_uniform_on_hf_families(family, tokenizer, batches) -> None:
    model = build_tiny_hf_model(family)
    result = TEAL(0.4, greedy=False).apply(model, tokenizer, batches)
    assert set(result.site_sparsity.values()) == {0.4}
    measured = qsparse.measure(model, *batches)
    sites = [v for k, v in measured.items() if k != "overall"]
    assert len(sites) == 8 and all(v == pytest.approx(0.4, abs=0.01) for v in sites)
    # the reference's dense calibration: the first site meets it, later ones drift
    TEAL(0.4, greedy=False, sequential=False).apply(model, tokenizer, batches)
    dense_cal = qsparse.measure(model, *batches)
    assert dense_cal["layers.0.self_attn.qkv"] == pytest.approx(0.4, abs=0.01)
    assert sum(abs(v - 0.4) for k, v in dense_cal.items() if k != "overall") > sum(
        abs(v - 0.4) for v in sites
    )


def test_cats_matches_hand_computation(tokenizer, batches) -> None:
    model = build_tiny_hf_model("llama")
    gates = []
    hook = model.model.layers[0].mlp.gate_proj.register_forward_hook(
        lambda m, a, out: gates.append(F.silu(out).detach().abs().flatten())
    )
    for b in batches:
        model(b)
    hook.remove()
    result = CATS(0.5).apply(model, tokenizer, batches)
    mlp = model.model.layers[0].mlp
    t = result.thresholds["layers.0.mlp.act_fn"]
    # the threshold is the calibration median of |SiLU(gate)| (to the histogram's bin width)
    assert t == pytest.approx(float(torch.cat(gates).median()), rel=0.01)
    x = torch.randn(3, 5, 64)
    w_g, w_u, w_d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    a = F.silu(x @ w_g.T)
    expected = ((a * (a.abs() > t)) * (x @ w_u.T)) @ w_d.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
    measured = qsparse.measure(model, *batches)
    assert measured["layers.0.mlp.act_fn"] == pytest.approx(0.5, abs=0.02)
    assert measured["layers.0.mlp.down_proj"] == pytest.approx(
        measured["layers.0.mlp.act_fn"], abs=1e-3
    )
    assert measured["layers.0.self_attn.qkv"] == 0.0
    # activated: each layer skips W_up's rows of the zeroed gates and W_down's columns of the
    # zero inputs (the other sites measured dense)
    total = qsparse.stats.total_parameters(model)
    skipped = sum(
        measured[f"layers.{i}.mlp.act_fn"] * w_u.numel()
        + measured[f"layers.{i}.mlp.down_proj"] * w_d.numel()
        for i in range(2)
    )
    assert qsparse.activated_parameters(model) == round(total - skipped)


@pytest.mark.parametrize(
    "method", [TEAL(0.5, greedy=False), CATS(0.5), QSparse(0.5), AttributionSelection(0.5)]
)
def test_methods_survive_export_and_load(
    method, tokenizer, batches, tiny_hf_checkpoint, tmp_path: Path
) -> None:
    model = qsparse.load(tiny_hf_checkpoint("llama"))
    method.apply(model, tokenizer, batches)
    out = qsparse.export(model, tmp_path / method.name, tokenizer=tokenizer)
    back = qsparse.load(out)
    assert torch.equal(back(batches[0]).logits, model(batches[0]).logits)
    assert qsparse.get_settings(back)["method"]["name"] == method.name


def test_methods_check_their_arguments() -> None:
    with pytest.raises(ValueError, match="sparsity"):
        TEAL(1.2)
    with pytest.raises(ValueError, match="error_fraction"):
        TEAL(0.5, error_fraction=0.0)
    with pytest.raises(ValueError, match="tokenizer"):
        TEAL(0.5, calibration=None).apply(build_tiny_hf_model("llama"))
