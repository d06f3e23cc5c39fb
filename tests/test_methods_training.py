"""ProSparse (schedule, L1 gradient, FATReLU, ReLU swap) and the attribution scores of
Song et al.: hand computations of their key steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_hf_model

import qsparse
from qsparse.methods import (
    FATReLU,
    ProSparse,
    attribution_mask,
    corrected_attribution,
    magnitude_mask,
    sine_schedule,
)
from qsparse.methods.attribution import (
    AttributionSelection,
    head_attribution,
    head_attribution_mean,
    head_magnitude,
    select_top,
    unit_ratios,
)
from qsparse.methods.prosparse import SCHEDULE_7B


def test_sine_schedule_at_given_steps() -> None:
    t, lam = SCHEDULE_7B  # 0, 5e-3, 5e-2, 5e-2, 0.2, 0.2 at 5k, 6k, 10k, 12k, 16k, 16.5k
    eta_quarter = 0.5 * (math.sin(-math.pi / 4) + 1)  # 0.146447
    assert sine_schedule(0, t, lam) == 0.0
    assert sine_schedule(3000, t, lam) == 0.0  # first stage: 0 -> 0
    assert sine_schedule(5500, t, lam) == pytest.approx(2.5e-3)  # half-way: eta = 1/2
    assert sine_schedule(6000, t, lam) == pytest.approx(5e-3)
    assert sine_schedule(7000, t, lam) == pytest.approx(5e-3 + eta_quarter * 4.5e-2)
    assert sine_schedule(8000, t, lam) == pytest.approx(0.0275)
    assert sine_schedule(11000, t, lam) == pytest.approx(5e-2)  # flat stage
    assert sine_schedule(14000, t, lam) == pytest.approx(0.125)
    assert sine_schedule(99999, t, lam) == 0.2
    with pytest.raises(ValueError, match="increasing"):
        sine_schedule(1, [10, 5], [0.1, 0.2])


def test_fatrelu_and_its_injected_l1_gradient() -> None:
    x = torch.tensor([[-1.0, 0.005, 0.02, 2.0]], requires_grad=True)
    act = FATReLU(0.01)
    act.eval()
    assert act(x)[0].tolist() == pytest.approx([0.0, 0.0, 0.02, 2.0])
    act.train()
    act.l1_coefficient = 0.4
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (act(x) * w).sum().backward()
    # d/dx [sum(a * w) + 0.4 * mean|a|] = (w + 0.4 * sign(a) / 4) * 1[x >= 0.01]
    assert x.grad[0].tolist() == pytest.approx([0.0, 0.0, 3.1, 4.1])
    assert float(act.last_l1) == pytest.approx((0.02 + 2.0) / 4)


def test_prosparse_swaps_relu_and_survives_export(tiny_hf_checkpoint, tmp_path: Path) -> None:
    model = qsparse.load(tiny_hf_checkpoint("llama"))
    ProSparse(final=True).apply(model)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.act_fn, FATReLU) and mlp.act_fn.threshold == 0.01
    ids = torch.randint(4, 300, (1, 32))
    measured = qsparse.measure(model, ids)
    assert measured["layers.0.mlp.down_proj"] > 0.45  # ReLU zeroes about half the gates
    back = qsparse.load(qsparse.export(model, tmp_path / "p"))
    assert torch.equal(back(ids).logits, model(ids).logits)


def test_corrected_attribution_on_three_neurons() -> None:
    a = torch.tensor([[1.0, -2.0, 0.5]])
    g = torch.tensor([[0.5, 0.25, -1.0]])
    norm = torch.tensor([2.0])
    # GxO = [0.5, -0.5, -0.5]; s = -GxO + 0.5 |a| * 2 = [0.5, 2.5, 1.0]
    assert corrected_attribution(a, g, norm).tolist() == [[0.5, 2.5, 1.0]]
    # sparsity 1/3 keeps 2 of 3: attribution keeps neurons 1, 2; magnitude keeps 0, 1
    assert attribution_mask(a, g, norm, 1 / 3).tolist() == [[False, True, True]]
    assert magnitude_mask(a, 1 / 3).tolist() == [[True, True, False]]
    assert attribution_mask(a, g, norm, 0.9).sum() == 1  # at least one kept


def test_head_attribution_on_two_heads() -> None:
    # two heads of 2 dims: o_0 = (3, 4), o_1 = (0, 1); gradient g_0 = (1, 0), g_1 = (0, -3)
    o = torch.tensor([[3.0, 4.0, 0.0, 1.0]])
    g = torch.tensor([[1.0, 0.0, 0.0, -3.0]])
    norm = torch.tensor([2.0])
    # GxO = <o_h, g_h> = (3, -3); ||o_h|| = (5, 1); s = -GxO + 0.5 * ||o_h|| * 2 = (2, 4)
    assert head_attribution(o, g, norm, heads=2).tolist() == [[2.0, 4.0]]
    assert head_magnitude(o, heads=2).tolist() == [[5.0, 1.0]]
    # at S = 0.5 one head of two is zeroed: attribution keeps head 1, magnitude head 0
    assert select_top(head_attribution(o, g, norm, 2), 0.5).tolist() == [[False, True]]
    assert select_top(head_magnitude(o, 2), 0.5).tolist() == [[True, False]]


def test_head_attribution_mean_is_the_released_reduction() -> None:
    # o_0 = (3, 4), o_1 = (0, 1); g_0 = (6, 0), g_1 = (4, 4): per-head means of o*g (9, 2),
    # of g (3, 4), whose norm over the heads is 5; s = -(9, 2) + 0.5 * (5, 1) * 5 = (3.5, 0.5)
    o = torch.tensor([[3.0, 4.0, 0.0, 1.0]])
    g = torch.tensor([[6.0, 0.0, 4.0, 4.0]])
    assert head_attribution_mean(o, g, heads=2).tolist() == [[3.5, 0.5]]
    # the default (sum over the head, norm over all H·d_h entries, sqrt 68) differs:
    # -(18, 4) + 0.5 * (5, 1) * sqrt(68)
    s = head_attribution(o, g, g.norm(dim=-1), heads=2)[0]
    assert s.tolist() == pytest.approx([-18 + 2.5 * math.sqrt(68), -4 + 0.5 * math.sqrt(68)])


def test_selection_keeps_the_order_of_tiny_scores() -> None:
    # attribution scores of a real model are ~1e-7: the selection must not lose them
    torch.manual_seed(0)
    scores = torch.randn(4, 96)
    for scale in (1.0, 1e-7, 1e-12):
        assert torch.equal(select_top(scores * scale, 0.5), select_top(scores, 0.5)), scale
    # the kept half is the top half
    top = scores.topk(48, dim=-1).indices
    assert torch.equal(
        select_top(scores * 1e-9, 0.5).nonzero()[:, 1].view(4, 48), top.sort().values
    )


def test_unit_ratios_weigh_heads_one_third() -> None:
    # 9 heads at S = 0.4: floor(3.6) = 3 heads zeroed, the MLP makes up the rest
    r_h, r_mlp = unit_ratios(0.4, 9)
    assert r_h == pytest.approx(3 / 9) and r_mlp == pytest.approx((0.4 - 1 / 9) * 1.5)
    assert r_h / 3 + 2 * r_mlp / 3 == pytest.approx(0.4)
    assert unit_ratios(0.4, None) == (0.0, 0.4)
    assert unit_ratios(0.9, 2) == (0.5, 1.0)  # (0.9 - 1/6) * 1.5 = 1.1, clamped


def _reference_masks(
    model, ids: torch.Tensor, sparsity: float, loss: str = "window", head_reduce: str = "sum"
) -> dict[str, torch.Tensor]:
    """Masks of the attribution selection computed directly: autograd.grad w.r.t. the o_proj /
    down_proj inputs of the greedy cross-entropy, of the whole window (``loss="window"``) or,
    position by position, of that position's own term (``"position"``: one backward per
    token); ``g_layer`` = the input's gradient over the layer's units (the paper's norm)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for kind, proj in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):

            def pre(m, args, key=f"{i}.{kind}"):
                seen[key] = args[0]

            handles.append(proj.register_forward_pre_hook(pre))
    logits = model(ids).logits
    for h in handles:
        h.remove()
    greedy = logits.detach().argmax(-1)
    keys = list(seen)
    if loss == "window":
        ce = F.cross_entropy(logits.flatten(0, 1), greedy.flatten())
        grads = dict(zip(keys, torch.autograd.grad(ce, [seen[k] for k in keys]), strict=True))
    else:
        grads = {k: torch.zeros_like(seen[k]) for k in keys}
        for t in range(ids.shape[1]):
            ce_t = F.cross_entropy(logits[:, t], greedy[:, t], reduction="sum") / greedy.numel()
            g_t = torch.autograd.grad(ce_t, [seen[k] for k in keys], retain_graph=True)
            for k, g in zip(keys, g_t, strict=True):
                grads[k][:, t] = g[:, t]
    masks = {}
    heads = model.config.num_attention_heads
    r_h, r_mlp = unit_ratios(sparsity, heads)
    for i in range(len(model.model.layers)):
        a, g = seen[f"{i}.o"].detach(), grads[f"{i}.o"]
        if head_reduce == "sum":
            s = head_attribution(a, g, g.norm(dim=-1), heads)
        else:
            s = head_attribution_mean(a, g, heads)
        masks[f"{i}.o"] = select_top(s, r_h).repeat_interleave(a.shape[-1] // heads, -1)
        a, g = seen[f"{i}.down"].detach(), grads[f"{i}.down"]
        masks[f"{i}.down"] = attribution_mask(a, g, g.norm(dim=-1), r_mlp)
    return masks


def test_attribution_selection_on_a_tiny_model() -> None:
    model = build_tiny_hf_model("llama")
    ids = torch.randint(4, 300, (2, 24))
    with torch.no_grad():
        dense = model(ids).logits
    expected = _reference_masks(model, ids, 0.4)
    # S = 0 keeps every unit: the dense logits, whatever the score
    for score in ("attribution", "magnitude"):
        m = build_tiny_hf_model("llama")
        AttributionSelection(0.0, score=score).apply(m)
        with torch.no_grad():
            assert torch.allclose(m(input_ids=ids).logits, dense, atol=1e-5)
    m = build_tiny_hf_model("llama")
    result = AttributionSelection(0.4).apply(m)
    kept: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(m.model.layers):
        for kind, proj in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            proj.act.register_forward_pre_hook(
                lambda mod, args, key=f"{i}.{kind}": kept.__setitem__(key, args[0] != 0)
            )
    with torch.no_grad():
        sparse = m(input_ids=ids).logits
    # the hooks' gradients (through a + z) select exactly what a plain backward selects
    for key, mask in expected.items():
        assert torch.equal(kept[key], mask), key
    assert all(p.grad is None for p in m.parameters())
    # per token: 1 of 4 heads (floor(1.6)); MLP int(0.475 * 128) = 60 of 128 neurons
    assert kept["0.o"].float().mean() == pytest.approx(0.75)
    assert kept["1.down"].float().mean() == pytest.approx(68 / 128)
    measured = qsparse.measure(m, ids)
    assert result.achieved(measured) == pytest.approx((0.25 + 2 * 60 / 128) / 3, abs=1e-6)
    magnitude = build_tiny_hf_model("llama")
    AttributionSelection(0.4, score="magnitude").apply(magnitude)
    with torch.no_grad():
        assert not torch.allclose(magnitude(input_ids=ids).logits, sparse)


@pytest.mark.parametrize(("loss", "head_reduce"), [("position", "sum"), ("window", "mean")])
def test_released_code_readings_select_what_a_direct_computation_does(loss, head_reduce) -> None:
    """``loss="position"`` (each token scored by its own position's loss, as the released
    code scores one generated token at a time) and ``head_reduce="mean"`` (its per-head
    reduction) select what a direct computation selects, and not what the defaults do."""
    ids = torch.randint(4, 300, (2, 24))
    expected = _reference_masks(build_tiny_hf_model("llama"), ids, 0.4, loss, head_reduce)
    default = _reference_masks(build_tiny_hf_model("llama"), ids, 0.4)
    m = build_tiny_hf_model("llama")
    AttributionSelection(0.4, loss=loss, head_reduce=head_reduce).apply(m)
    kept = _kept_units(m, ids)
    for key, mask in expected.items():
        assert torch.equal(kept[key], mask), key
    changed = [k for k in expected if not torch.equal(expected[k], default[k])]
    assert changed and (head_reduce == "sum" or all(k.endswith(".o") for k in changed))
    with pytest.raises(ValueError, match="loss="):
        AttributionSelection(0.4, loss="sequence")
    with pytest.raises(ValueError, match="head_reduce="):
        AttributionSelection(0.4, head_reduce="max")


def _kept_units(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bool masks of the units that reach o_proj / down_proj in one forward."""
    kept: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for kind, proj in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            handles.append(
                proj.act.register_forward_pre_hook(
                    lambda mod, args, key=f"{i}.{kind}": kept.__setitem__(key, args[0] != 0)
                )
            )
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return kept


def _rescaled(c: float):
    """The tiny model with every layer's units rescaled by 1/c and the weights reading them by
    c (v_proj / o_proj, up_proj / down_proj): the same function, units c times smaller."""
    model = build_tiny_hf_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight /= c
            layer.self_attn.o_proj.weight *= c
            layer.mlp.up_proj.weight /= c
            layer.mlp.down_proj.weight *= c
    return model


def test_attribution_is_invariant_to_rescaling_the_units() -> None:
    """``GxO`` and ``|a|·||∂L/∂a||`` do not change when a layer's units shrink by c and the
    weights that read them grow by c; the score with ``g_layer`` at the projection output
    does (the earlier reading that broke SmolLM2: its correction shrinks with the units)."""
    ids = torch.randint(4, 300, (2, 24))
    base, scaled = build_tiny_hf_model("llama"), _rescaled(16.0)
    with torch.no_grad():
        assert torch.allclose(base(input_ids=ids).logits, scaled(input_ids=ids).logits, atol=1e-4)
    masks = {}
    for name, model in (("base", base), ("scaled", scaled)):
        for grad_norm in ("units", "output"):
            AttributionSelection(0.5, grad_norm=grad_norm).apply(model)
            masks[name, grad_norm] = _kept_units(model, ids)
    for key, mask in masks["base", "units"].items():
        assert torch.equal(mask, masks["scaled", "units"][key]), key
    # with the output norm the correction shrinks by c against -GxO: other units are kept
    assert any(
        not torch.equal(mask, masks["scaled", "output"][key])
        for key, mask in masks["base", "output"].items()
    )
