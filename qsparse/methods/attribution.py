"""Attribution-based neuron selection for small models (Song et al., 2406.06562): the scores.

Instead of ``|a_i|`` (magnitude selection), score each MLP neuron by its attribution to the
loss ``L``, the cross-entropy of the dense model's own greedy next token::

    GxO_i = a_i · ∂L/∂a_i                               gradient × output
    s_i   = -GxO_i + ½ |a_i| · ||g_layer||₂              the paper's corrected score

``g_layer`` is the gradient at the layer's output (one norm per token): the correction bounds
the error that the other layers' dependence puts on ``GxO`` (the released code's corrected
path raises a NameError; the formula is the paper's). Per token and layer, neurons with
``s_i`` at or above the ``S``-quantile are kept (``S`` = target sparsity), the rest zeroed.

Implemented: the scores, the per-token selection, the magnitude baseline at the same
sparsity, and :func:`mlp_selection_loss`, which scores the MLP neurons (the down_proj input
``act(gate) ⊙ up``) of every layer with one backward per batch, zeroes the unselected ones in
a second forward and returns the loss on the true next tokens (an oracle / analysis method:
inference never has the gradient). Not implemented: attention-head selection (the paper counts
sparsity as ⅓ head ratio + ⅔ MLP ratio; here only MLP neurons are selected).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


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


def mlp_selection_loss(
    model: nn.Module, batches: Iterable[torch.Tensor], sparsity: float, score: str = "attribution"
) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``batches`` (LongTensor[B, T])
    with, per token and layer, only the MLP neurons selected by ``score`` kept.

    ``score``: ``"attribution"`` (corrected score; ``L`` = cross-entropy of the dense model's
    greedy next tokens, one backward per batch) or ``"magnitude"`` (``|a|``). Both select
    exactly ``N - floor(S·N)`` neurons per token.
    """
    from ..nn.sites import decoder_layers
    from .calibration import model_forward

    if score not in ("attribution", "magnitude"):
        raise ValueError(f"score={score!r} must be 'attribution' or 'magnitude'")
    mlps = [mlp for _, _, mlp in decoder_layers(model)]
    acts: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    masks: dict[int, torch.Tensor] = {}

    def capture(i: int):
        def pre(module, args):
            acts[i] = args[0]
            if acts[i].requires_grad:
                acts[i].retain_grad()

        return pre

    def output(i: int):
        def post(module, args, out):
            outs[i] = out
            if out.requires_grad:
                out.retain_grad()

        return post

    def masked(i: int):
        return lambda module, args: (args[0] * masks[i],)

    def run(ids: torch.Tensor, hooks: list) -> torch.Tensor:
        handles = [module.register_forward_pre_hook(h) for module, h in hooks[0]]
        handles += [module.register_forward_hook(h) for module, h in hooks[1]]
        try:
            return model_forward(model, ids)
        finally:
            for h in handles:
                h.remove()

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ids in batches:
        with torch.enable_grad():
            logits = run(
                ids,
                [
                    [(m.down_proj, capture(i)) for i, m in enumerate(mlps)],
                    [(m, output(i)) for i, m in enumerate(mlps)],
                ],
            )
            if score == "attribution":
                greedy = logits.detach().argmax(-1)
                F.cross_entropy(logits.flatten(0, 1).float(), greedy.flatten()).backward()
        with torch.no_grad():
            for i, a in acts.items():
                if score == "attribution":
                    g_norm = outs[i].grad.norm(dim=-1)
                    keep = attribution_mask(a.detach(), a.grad, g_norm, sparsity)
                else:
                    keep = magnitude_mask(a.detach(), sparsity)
                masks[i] = keep.to(a.dtype)
            logits = run(ids, [[(m.down_proj, masked(i)) for i, m in enumerate(mlps)], []]).float()
            nll = F.cross_entropy(
                logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
            )
        total += float(nll)
        count += ids[:, 1:].numel()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return total / max(count, 1)
