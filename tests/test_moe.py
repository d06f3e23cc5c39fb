"""MoEfication, D2DMoE and SSD (qsparse.moe): dense equivalence, balanced clusters, the
router target, the dynamic-k rule, the Hoyer gradient and cost counting on hand numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import HF_FAMILIES, build_tiny_hf_model

import qsparse
from qsparse.models.llama import LlamaConfig, LlamaForCausalLM
from qsparse.moe import (
    D2DMoE,
    MoEConfig,
    MoEFeedForward,
    SSDMoE,
    balanced_kmeans,
    cost_from_fractions,
    demoefy,
    dynamic_k_mask,
    hoyer_gradient,
    hoyer_square,
    moe_layers,
    moefy,
    router_targets,
    topk_expert_mask,
)
from qsparse.moe.hoyer import HoyerReLU, warmup_weight
from qsparse.moe.kmeans import balanced_assign, labels_from_partition, partition_from_labels


def _ours(**kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


def test_balanced_assign_caps_every_cluster() -> None:
    # every point prefers cluster 0; capacity 2 forces the two farthest elsewhere
    d = torch.tensor([[0.0, 5.0], [1.0, 4.0], [2.0, 2.5], [3.0, 3.1]]).numpy()
    assert balanced_assign(d, 2).tolist() == [0, 0, 1, 1]


def test_balanced_kmeans_recovers_separated_clusters_and_warm_starts() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 8) * 10
    truth = torch.arange(4).repeat_interleave(6)
    x = centres[truth] + 0.1 * torch.randn(24, 8, generator=g)
    res = balanced_kmeans(x, 4, seed=1)
    assert torch.bincount(res.labels, minlength=4).tolist() == [6, 6, 6, 6]
    for c in range(4):  # each true cluster lands in one k-means cluster
        assert res.labels[truth == c].unique().numel() == 1
    warm = balanced_kmeans(x, 4, init_labels=truth)
    assert torch.equal(warm.labels, truth) and warm.iterations <= 2
    part = partition_from_labels(res.labels, 4)
    assert part.shape == (4, 6) and torch.equal(labels_from_partition(part), res.labels)
    with pytest.raises(ValueError, match="do not divide"):
        balanced_kmeans(x, 5)


@pytest.mark.parametrize("family", [*HF_FAMILIES, "qsparse"])
def test_moefy_with_every_expert_is_the_dense_ffn(family: str) -> None:
    model = _ours() if family == "qsparse" else build_tiny_hf_model(family)
    ids = torch.randint(4, 200, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
    mlp0 = model.model.layers[0].mlp
    weights = {id(p) for p in mlp0.parameters()}
    results = moefy(model, MoEConfig(expert_size=16))
    moe = model.model.layers[0].mlp
    assert isinstance(moe, MoEFeedForward) and {id(p) for p in moe.parameters()} == weights
    for res in results.values():  # balanced clusters
        assert torch.bincount(res.labels).tolist() == [16] * moe.num_experts
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, dense, atol=1e-5)
        x = torch.randn(5, moe.gate_proj.in_features)
        assert torch.allclose(moe.expert_forward(x), moe.dense()(x), atol=1e-5)
    assert "model.layers.0.mlp.gate_proj.weight" in model.state_dict()
    back = demoefy(model)
    assert model.model.layers[0].mlp is mlp0 and back["model.layers.0.mlp"].shape[1] == 16
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_expert_size_must_divide_the_ffn() -> None:
    with pytest.raises(ValueError, match="expert_size=20 does not divide"):
        moefy(_ours(), MoEConfig(expert_size=20))


def test_dynamic_k_rule_and_topk_on_hand_numbers() -> None:
    r = torch.tensor([[4.0, 1.0, 3.0, 2.9], [0.5, 0.5, 0.1, 0.0]])
    # tau=0.25: keep r >= 0.75 max -> {4, 3.0} and {0.5, 0.5}
    assert dynamic_k_mask(r, 0.25).tolist() == [[1, 0, 1, 0], [1, 1, 0, 0]]
    assert dynamic_k_mask(r, 0.0).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]  # ties kept
    assert dynamic_k_mask(r, 1.0).sum() == 8
    assert topk_expert_mask(r, 2).tolist() == [[1, 0, 1, 0], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="tau"):
        dynamic_k_mask(r, 1.5)


def test_router_target_is_each_experts_output_norm() -> None:
    model = _ours(hidden_size=4, intermediate_size=4, num_attention_heads=2,
                  num_key_value_heads=2)  # fmt: skip
    moefy(model, MoEConfig(expert_size=2), partitions={
        n: torch.tensor([[0, 3], [1, 2]]) for n in moe_layers(model) or
        [f"model.layers.{i}.mlp" for i in range(2)]})  # fmt: skip
    moe = model.model.layers[0].mlp
    with torch.no_grad():
        moe.down_proj.weight.copy_(torch.tensor([[1.0, 0, 0, 2], [0, 1, 1, 0], [0, 0, 0, 0],
                                                 [3, 0, 0, 0]]))  # fmt: skip
    h = torch.tensor([[1.0, 2.0, -1.0, 1.0]])
    # expert 0 = neurons {0, 3}: out = col0 * 1 + col3 * 1 = (1+2, 0, 0, 3) -> norm sqrt(18)
    # expert 1 = neurons {1, 2}: out = col1 * 2 + col2 * -1 = (0, 2-1, 0, 0) -> norm 1
    assert router_targets(moe, h)[0].tolist() == pytest.approx([18**0.5, 1.0])


def test_topk_training_reaches_only_selected_experts() -> None:
    model = _ours()
    moefy(model, MoEConfig(expert_size=16), router=lambda mlp, e: qsparse.moe.CentroidRouter())
    moe = model.model.layers[0].mlp
    moe.set_mode("topk", k=2)
    x = torch.randn(1, 32)
    moe(x).sum().backward()
    chosen = moe.expert_mask(x)[0].bool()
    grads = moe.up_proj.weight.grad[moe.experts].abs().sum(dim=(1, 2))
    assert (grads[~chosen] == 0).all() and (grads[chosen] > 0).all()


def test_hoyer_value_gradient_and_injection() -> None:
    a = torch.tensor([[3.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert hoyer_square(a).tolist() == pytest.approx([16 / 10, 4 / 2])
    x = a.clone().requires_grad_(True)
    hoyer_square(x).sum().backward()
    assert torch.allclose(hoyer_gradient(a), x.grad, atol=1e-6)
    act = HoyerReLU().train()
    act.hoyer_coefficient = 0.5
    z = torch.tensor([[3.0, -2.0, 1.0]], requires_grad=True)
    act(z).sum().backward()
    # d/dz [sum relu(z) + 0.5 * H(relu(z))] = (1 + 0.5 * dH/da) * 1[z > 0]
    expect = (1 + 0.5 * hoyer_gradient(torch.tensor([[3.0, 0.0, 1.0]]))) * torch.tensor([1, 0, 1])
    assert torch.allclose(z.grad, expect, atol=1e-6)
    assert warmup_weight(25, 100, 1e-3, 0.5) == pytest.approx(5e-4)
    assert warmup_weight(80, 100, 1e-3, 0.5) == pytest.approx(1e-3)


def test_cost_counts_skipped_experts_and_routers() -> None:
    model = _ours()
    moefy(model, MoEConfig(expert_size=16), router=lambda mlp, e: qsparse.moe.RegressionRouter(
        32, e, width=8))  # fmt: skip
    names = list(moe_layers(model))
    cost = cost_from_fractions(model, {names[0]: 0.5, names[1]: 0.25})
    ffn = 3 * 32 * 96
    routers = 2 * (32 * 8 + 8 + 8 * 6 + 6)
    assert cost.router_parameters == routers
    assert cost.total_parameters - cost.activated_parameters == round(0.5 * ffn + 0.75 * ffn)
    assert cost.dense_flops_per_token - cost.flops_per_token == pytest.approx(
        2 * (0.5 * ffn + 0.75 * ffn) - 2 * (32 * 8 + 8 * 6) * 2
    )


def test_d2dmoe_and_ssd_match_qsparse_and_survive_export(tiny_hf_checkpoint, tmp_path: Path):
    path = tiny_hf_checkpoint("llama")
    batches = [torch.randint(4, 300, (2, 32), generator=torch.Generator().manual_seed(i))
               for i in range(4)]  # fmt: skip
    ids = torch.randint(4, 300, (1, 24))
    for method in (
        D2DMoE(sparsity=0.3, expert_size=16, router_steps=40, match_tokens=128),
        SSDMoE(sparsity=0.3, expert_size=16),
    ):
        model = qsparse.load(path)
        target = qsparse.moe.d2dmoe.qsparse_activated(model, 0.3)
        method.apply(model, None, batches)
        report = qsparse.stats.sparsity_report(model, batches)
        assert report.activated_parameters <= target + 1
        back = qsparse.load(qsparse.export(model, tmp_path / method.name))
        assert isinstance(back.model.layers[0].mlp, MoEFeedForward)
        assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Triton is not installed (the optional 'kernels' extra: pip install -e '.[kernels]')",
)
def test_expert_gemv_kernel_matches_references_in_the_interpreter() -> None:
    """benchmarks/expert_gemv.py --cpu-check: the expert GEMV kernel under the Triton
    interpreter matches its references (needs the 'kernels' extra)."""
    from conftest import run_interpreted

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "expert_gemv.py"
    out = run_interpreted(
        f"import runpy, sys; sys.argv = ['expert_gemv.py', '--cpu-check']; "
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    assert "cpu check ok" in out


def test_tau_sweep_rows_span_all_experts_to_one(tmp_path: Path) -> None:
    from qsparse.moe.sweep import sweep, write_outputs

    model = build_tiny_hf_model("llama")
    batches = [torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(i))
               for i in range(3)]  # fmt: skip
    D2DMoE(tau=1.0, expert_size=16, router_steps=20).apply(model, None, batches)
    rows = sweep(model, "dynk", [0.0, 1.0], batches)
    dense, tau0, tau1 = rows
    assert dense.expert_fraction == 1.0 and tau1.expert_fraction == 1.0
    assert tau1.loss == pytest.approx(dense.loss, abs=1e-5)  # all experts = the dense FFN
    assert tau0.expert_fraction < 0.5 and tau0.flops_fraction < dense.flops_fraction
    assert tau0.activated_parameters < dense.activated_parameters
    paths = write_outputs(rows, tmp_path / "s", "test")
    assert "tau=0" in paths["md"].read_text() and paths["png"].stat().st_size > 0
