"""ProSparse (schedule, L1 gradient, FATReLU, ReLU swap) and the attribution scores of
Song et al.: hand computations of their key steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
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
from qsparse.methods.attribution import mlp_selection_loss
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


def test_mlp_selection_loss_attribution_vs_magnitude() -> None:
    model = build_tiny_hf_model("llama")
    ids = [torch.randint(4, 300, (2, 24)) for _ in range(2)]
    with torch.no_grad():
        logits = [model(b).logits for b in ids]
    dense = sum(
        float(
            torch.nn.functional.cross_entropy(
                lg[:, :-1].flatten(0, 1), b[:, 1:].flatten(), reduction="sum"
            )
        )
        for lg, b in zip(logits, ids, strict=True)
    ) / sum(b[:, 1:].numel() for b in ids)
    # S = 0 keeps every neuron: the dense loss, whatever the score
    assert mlp_selection_loss(model, ids, 0.0) == pytest.approx(dense, rel=1e-5)
    assert mlp_selection_loss(model, ids, 0.0, "magnitude") == pytest.approx(dense, rel=1e-5)
    attr = mlp_selection_loss(model, ids, 0.5)
    mag = mlp_selection_loss(model, ids, 0.5, "magnitude")
    assert math.isfinite(attr) and math.isfinite(mag) and attr != mag
    assert all(p.grad is None for p in model.parameters())
