"""Top-k sparsifiers and quantizers against float64 hand references."""

import pytest
import torch

from qsparse.nn import (
    ActivationSparsifier,
    QSparseLinear,
    QuantConfig,
    SparsityConfig,
    absmax_quantize,
    absmean_ternarize,
    block_topk,
    keep_count,
    token_topk,
    topk_mask,
)


def hand_topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Loop reference: sort each row by (|x| desc, index asc), keep the first k."""
    mask = torch.zeros_like(x, dtype=torch.bool)
    rows = x.reshape(-1, x.shape[-1])
    flat = mask.view(-1, x.shape[-1])
    for r in range(rows.shape[0]):
        order = sorted(range(rows.shape[1]), key=lambda i: (-abs(float(rows[r, i])), i))
        flat[r, order[:k]] = True
    return mask


@pytest.mark.parametrize("d,ratio,k", [(10, 0.7, 3), (10, 0.3, 7), (100, 0.6, 40), (7, 0.0, 7)])
def test_keep_count_matches_authors_formula(d, ratio, k):
    assert keep_count(d, ratio) == k


def test_keep_count_rejects_zero_kept():
    with pytest.raises(ValueError, match="k=0"):
        keep_count(4, 0.9)


def test_topk_mask_matches_hand_reference_with_ties():
    torch.manual_seed(0)
    x = torch.randint(-3, 4, (6, 16)).float()  # many ties and zeros
    for k in (1, 5, 8, 15):
        m = topk_mask(x, k)
        assert (m.sum(-1) == k).all(), "exactly k per row even on ties"
        assert torch.equal(m, hand_topk_mask(x, k))


def test_topk_mask_random_bf16_exact_k():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 64, dtype=torch.bfloat16)
    m = topk_mask(x, 20)
    assert m.shape == x.shape and (m.sum(-1) == 20).all()
    assert torch.equal(m, hand_topk_mask(x.float(), 20))


def test_topk_rejects_k_larger_than_d():
    with pytest.raises(ValueError, match="k=9"):
        topk_mask(torch.randn(2, 8), 9)


def test_token_topk_ste_gradient_is_dense_gradient_of_masked_product():
    torch.manual_seed(2)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 7, dtype=torch.float64)
    y = token_topk(x, 4) @ w.T
    y.backward(g)
    # hand computation: Y = (X*M) W^T; STE => dL/dX = dL/d(X*M) = g W ; dL/dW = g^T (X*M)
    mask = hand_topk_mask(x.detach(), 4).double()
    assert torch.allclose(y, (x.detach() * mask) @ w.detach().T)
    assert torch.allclose(x.grad, g @ w.detach())
    assert torch.allclose(w.grad, g.T @ (x.detach() * mask))


def test_token_topk_without_ste_masks_the_gradient():
    torch.manual_seed(3)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 12, dtype=torch.float64)
    g = torch.randn(5, 7, dtype=torch.float64)
    (token_topk(x, 4, ste=False) @ w.T).backward(g)
    mask = hand_topk_mask(x.detach(), 4).double()
    assert torch.allclose(x.grad, (g @ w) * mask)


def test_block_topk_keeps_k_per_block():
    torch.manual_seed(4)
    x = torch.randn(3, 64)
    y = block_topk(x, 16, 32)
    nz = (y != 0).reshape(3, 2, 32).sum(-1)
    assert (nz == 16).all()
    ref = torch.cat([hand_topk_mask(x[:, :32], 16), hand_topk_mask(x[:, 32:], 16)], -1)
    assert torch.equal(y != 0, ref)


def test_block_size_must_divide_dim():
    with pytest.raises(ValueError, match="block_size=24"):
        ActivationSparsifier(64, 0.5, pattern="block_topk", block_size=24)


def test_absmax_quantize_matches_paper_formula():
    torch.manual_seed(5)
    x = torch.randn(4, 32, dtype=torch.float64)
    gamma = x.abs().amax(-1, keepdim=True)
    ref = torch.clamp(torch.round(127 / gamma * x), -128, 127) * gamma / 127
    assert torch.allclose(absmax_quantize(x, 8), ref)
    # b bits: at most 2^b distinct levels per row
    q4 = absmax_quantize(x, 4)
    assert all(len(torch.unique(r)) <= 16 for r in q4)


def test_quantized_topk_masks_by_unquantized_magnitude_and_passes_grad():
    torch.manual_seed(6)
    x = torch.randn(3, 20, requires_grad=True)
    sp = ActivationSparsifier(20, 0.5, act_bits=8)
    y = sp(x)
    mask = hand_topk_mask(x.detach(), 10)
    assert torch.equal(y != 0, mask)
    assert torch.allclose(y, absmax_quantize(x.detach(), 8) * mask)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # STE through quantization and top-k


def test_ternary_weights_take_three_values():
    torch.manual_seed(7)
    w = torch.randn(16, 32)
    q = absmean_ternarize(w)
    alpha = w.abs().mean()
    vals = torch.unique(q.abs())
    assert len(torch.unique(q)) == 3
    assert torch.allclose(vals, torch.tensor([0.0, float(alpha)]))
    ref = torch.clamp(torch.round(w / alpha), -1, 1) * alpha
    assert torch.allclose(q, ref)


def test_qsparse_linear_bitlinear_forward_and_latent_grad():
    torch.manual_seed(8)
    lin = torch.nn.Linear(16, 8, bias=True)
    act = ActivationSparsifier(16, 0.25, act_bits=8)
    q = QSparseLinear.from_linear(lin, act=act, weight_quant="ternary")
    assert q.weight is lin.weight and q.bias is lin.bias
    x = torch.randn(2, 5, 16)
    y = q(x)
    xa = absmax_quantize(x, 8) * hand_topk_mask(x, 12)
    wq = absmean_ternarize(lin.weight.detach())
    assert torch.allclose(y, xa @ wq.T + lin.bias.detach(), atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    # straight-through: every latent weight gets the gradient of the ternary weight it
    # produced, the zero codes included (not masked to the non-zero codes)
    full = g.reshape(-1, 8).T @ xa.reshape(-1, 16)
    assert torch.allclose(lin.weight.grad, full, atol=1e-5)
    assert (wq == 0).any() and (lin.weight.grad[wq == 0] != 0).all()


def test_ternary_straight_through_reaches_every_latent_weight():
    """d(loss)/dW equals d(loss)/dQ_w(W) exactly, also where Q_w(W) is 0 or clipped."""
    torch.manual_seed(10)
    w = torch.randn(12, 20, dtype=torch.float64, requires_grad=True)
    q = absmean_ternarize(w)
    g = torch.randn_like(q)
    q.backward(g)
    codes = (q.detach() / w.detach().abs().mean()).round()
    assert (codes == 0).any() and (w.detach().abs() > 1.5 * w.detach().abs().mean()).any()
    assert torch.equal(w.grad, g)


def test_rescale_restores_token_norm():
    torch.manual_seed(9)
    x = torch.randn(4, 32)
    y = token_topk(x, 8, rescale=True)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"ratio": 1.0}, "sparsity.ratio"),
        ({"ratio": -0.1}, "sparsity.ratio"),
        ({"pattern": "nm"}, "sparsity.pattern"),
        ({"down": 1.5}, "sparsity.down"),
        ({"block_size": 0}, "sparsity.block_size"),
    ],
)
def test_sparsity_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        SparsityConfig(**kwargs)


def test_quant_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"quant\.weights"):
        QuantConfig(weights="binary")
    with pytest.raises(ValueError, match=r"quant\.act_bits"):
        QuantConfig(act_bits=1)
