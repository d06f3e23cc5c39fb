"""Attribution-based neuron selection for small models (Song et al., 2406.06562): the scores.

Instead of ``|a_i|`` (magnitude selection), score each MLP neuron by its attribution to the
loss ``L``, the cross-entropy of the dense model's own greedy next token::

    GxO_i = a_i · ∂L/∂a_i                               gradient × output
    s_i   = -GxO_i + ½ |a_i| · ||g_layer||₂              the paper's corrected score

``g_layer`` is the gradient at the layer's output (one norm per token): the correction bounds
the error that the other layers' dependence puts on ``GxO`` (the released code's corrected
path raises a NameError; the formula is the paper's). Per token and layer, neurons with
``s_i`` at or above the ``S``-quantile are kept (``S`` = target sparsity), the rest zeroed.

What is implemented here: the scores, the per-token selection, and the magnitude baseline at
the same sparsity, on tensors a caller gathers with one backward per batch (an oracle /
analysis method: inference never has the gradient). The model-level driver over MLP neurons
and attention heads (sparsity ⅓ head ratio + ⅔ MLP ratio) is not implemented yet.
"""

from __future__ import annotations

import torch


def corrected_attribution(
    a: torch.Tensor, grad: torch.Tensor, layer_grad_norm: torch.Tensor
) -> torch.Tensor:
    """``s = -a·g + ½ |a| · ||g_layer||₂``.

    Args:
        a: activations [..., N] (N neurons, or heads' outputs reduced to [..., H]).
        grad: ``∂L/∂a``, shaped like ``a``.
        layer_grad_norm: ``||∂L/∂(layer output)||₂`` per token, shape ``a.shape[:-1]``.
    """
    return -a * grad + 0.5 * a.abs() * layer_grad_norm.unsqueeze(-1)


def select_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping, per row, the entries at or above the row's ``sparsity``-quantile:
    the ``k = N - floor(sparsity · N)`` highest scores (ties: lower index), ``k >= 1``."""
    n = scores.shape[-1]
    k = max(1, n - int(sparsity * n + 1e-9))
    from ..nn import topk_mask

    # topk_mask ranks by |x|; shift so every score is positive and the order is kept
    shifted = scores - scores.min(dim=-1, keepdim=True).values + 1.0
    return topk_mask(shifted, k)


def attribution_mask(
    a: torch.Tensor, grad: torch.Tensor, layer_grad_norm: torch.Tensor, sparsity: float
) -> torch.Tensor:
    """Neurons kept by the corrected attribution at ``sparsity`` (shape of ``a``)."""
    return select_top(corrected_attribution(a, grad, layer_grad_norm), sparsity)


def magnitude_mask(a: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The baseline at the same sparsity: keep the largest ``|a_i|`` per token."""
    return select_top(a.abs(), sparsity)
