"""Attribution-based selection of MLP neurons and attention heads (Song et al., 2406.06562).

Instead of ``|a_i|`` (magnitude selection), score each unit by its attribution to the loss
``L``, the cross-entropy of the dense model's own greedy next tokens::

    GxO_i = a_i · ∂L/∂a_i                               gradient × output
    s_i   = -GxO_i + ½ |a_i| · ||g_layer||₂              the paper's corrected score

``g_layer = ∂L/∂a`` over all the units of the layer (one norm per token), as the released
code computes it (its "gradient" metric taken at the same hook, L2 over the layer's neurons;
its corrected path raises a NameError, the formula is the paper's). Since
``|GxO_i| <= |a_i| · ||g_layer||₂`` (Cauchy-Schwarz), the correction is half that bound: the
score is invariant to rescaling a layer's units (``a -> a/c`` with the weights that read
them ``-> c·W``), and large units are kept unless their first-order effect clearly says
otherwise. Per token and layer the units with ``s_i`` at or above the ratio's quantile are
kept, the rest zeroed.

``grad_norm="output"`` takes ``g_layer`` at the projection's *output* instead (an earlier
reading of "the gradient at that layer's output"). On SmolLM2-135M that norm is 5-8x smaller
than the units' one (``W_down`` maps 1,536 neurons to 576 dims), the correction nearly
vanishes and the raw ``-GxO`` decides; ``-GxO`` alone drops units whose first-order removal
"helps" the greedy loss, and zeroing half of them at once breaks the model (perplexity
~17,000 at S=0.5; ``docs/methods.md``). Kept only to reproduce that measurement.

Units (decisions where the paper gives no formula):

- MLP neuron ``i``: ``a_i`` = entry ``i`` of the down_proj input ``act(gate) ⊙ up`` [..., F];
  ``g_layer`` = ``∂L/∂a`` [..., F].
- Attention head ``h``: ``o_h`` = its slice of the o_proj input [..., H·d_h];
  ``GxO_h = ⟨o_h, ∂L/∂o_h⟩`` (the sum of its entries' GxO), ``|a_h| = ||o_h||₂``,
  ``g_layer = ∂L/∂o`` [..., H·d_h] (so again ``|GxO_h| <= |a_h| · ||g_layer||₂``). The
  magnitude baseline ranks heads by ``||o_h||₂``.
- Sparsity: the paper counts ``⅓ · head ratio + ⅔ · MLP ratio``. With H heads the per-token
  head quantile zeroes ``floor(S·H)`` heads (ratio ``r_h``), so the MLP ratio is set to
  ``(S - ⅓ r_h) / ⅔`` (clamped to [0, 1]) and the weighted total is ``S`` (SmolLM2's 9 heads would otherwise miss
  S = 0.4 by 2.2 points). ``heads=False``: MLP neurons only, at ``S``.
- ``loss="window"`` (default): ``L`` is the mean greedy cross-entropy of every position of
  the window, one backward per forward: a unit at position t is also credited for later
  positions' losses (through attention). ``loss="position"``: position t's gradients come
  from position t's own loss, as the released code scores one generated token at a time
  (T backwards per forward).
- ``head_reduce="sum"`` (default) is the formula above. ``head_reduce="mean"`` is the
  released code's per-head reduction: ``GxO_h = mean_d(o_h ⊙ g_h)``, a head's gradient
  ``ḡ_h = mean_d(g_h)`` and ``s_h = -GxO_h + ½ ||o_h||₂ · ||(ḡ_1..ḡ_H)||₂``
  (:func:`head_attribution_mean`).
- The released code gives heads and MLP the same percentile; here the MLP ratio absorbs the
  rounding of ``floor(S·H)`` (above), which for SmolLM2 moves it by at most 0.03.

Why it loses to magnitude selection on perplexity (``docs/methods.md``): the first-order
term rewards units by how much they raise the dense model's *own argmax*; removing the units
that spread probability over other tokens lowers ``L``. The selected model agrees with the
dense model's greedy token more often than magnitude selection does (the paper's criterion:
BLEU against the dense model's generations) but is over-confident, which perplexity on real
text punishes.

:class:`AttributionSelection` is a :class:`~qsparse.methods.SparsityMethod` (``method=
attribution``; ``attribution_magnitude`` is the baseline at the same ratios): ``apply`` installs
hooks so that every full-sequence forward of the model first runs the dense model with
gradients (the scores), then the forward with the unselected units zeroed. It is an oracle for
analysis: inference never has the gradient, and a forward costs about three dense ones. The
gradients w.r.t. activations come from ``torch.autograd.grad`` through zero tensors added at
each unit (``a + z``, ``∂L/∂z = ∂L/∂a``), so no parameter needs ``requires_grad``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import sparsify
from ..nn import SparsityConfig, topk_mask
from ..nn.sites import decoder_layers, sparsifiers
from .base import MethodResult, SparsityMethod, register
from .calibration import model_forward

SCORES = ("attribution", "magnitude")
GRAD_NORMS = ("units", "output")
LOSSES = ("window", "position")
HEAD_REDUCES = ("sum", "mean")
HEAD_SHARE, MLP_SHARE = 1.0 / 3.0, 2.0 / 3.0


def corrected_attribution(
    a: torch.Tensor, grad: torch.Tensor, layer_grad_norm: torch.Tensor
) -> torch.Tensor:
    """``s = -a·g + ½ |a| · ||g_layer||₂``.

    Args:
        a: activations [..., N] (N neurons).
        grad: ``∂L/∂a``, shaped like ``a``.
        layer_grad_norm: ``||g_layer||₂`` per token, shape ``a.shape[:-1]``: ``grad.norm(dim=-1)``
            (the paper's, :func:`layer_grad_norm`) or the output gradient's norm.
    """
    return -a * grad + 0.5 * a.abs() * layer_grad_norm.unsqueeze(-1)


def layer_grad_norm(grad: torch.Tensor) -> torch.Tensor:
    """``||g_layer||₂ = ||∂L/∂a||₂`` over the layer's units, per token: [..., N] -> [...]."""
    return grad.float().norm(dim=-1)


def head_attribution(
    o: torch.Tensor, grad: torch.Tensor, layer_grad_norm: torch.Tensor, heads: int
) -> torch.Tensor:
    """Per-head corrected score ``s_h = -⟨o_h, g_h⟩ + ½ ||o_h||₂ · ||g_layer||₂``.

    ``o``, ``grad``: [..., H·d_h] (o_proj input and its gradient); returns [..., H]."""
    o_h = o.unflatten(-1, (heads, -1))
    gxo = (o_h * grad.unflatten(-1, (heads, -1))).sum(-1)
    return -gxo + 0.5 * o_h.norm(dim=-1) * layer_grad_norm.unsqueeze(-1)


def head_attribution_mean(o: torch.Tensor, grad: torch.Tensor, heads: int) -> torch.Tensor:
    """The released code's per-head reduction: ``GxO_h = mean_d(o_h ⊙ g_h)``, the head's
    gradient ``ḡ_h = mean_d(g_h)`` and ``s_h = -GxO_h + ½ ||o_h||₂ · ||(ḡ_1..ḡ_H)||₂``.

    ``o``, ``grad``: [..., H·d_h]; returns [..., H]."""
    o_h, g_h = o.unflatten(-1, (heads, -1)), grad.unflatten(-1, (heads, -1))
    gxo = (o_h * g_h).mean(-1)
    return -gxo + 0.5 * o_h.norm(dim=-1) * g_h.mean(-1).norm(dim=-1, keepdim=True)


def head_magnitude(o: torch.Tensor, heads: int) -> torch.Tensor:
    """``||o_h||₂`` per head: [..., H·d_h] -> [..., H]."""
    return o.unflatten(-1, (heads, -1)).norm(dim=-1)


def zeroed_count(n: int, sparsity: float) -> int:
    """Units zeroed per row at ``sparsity``: ``floor(S·n)``, at most ``n - 1``."""
    return min(n - 1, int(sparsity * n + 1e-9))


def select_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping, per row, the entries at or above the row's ``sparsity``-quantile:
    the ``k = N - floor(sparsity · N)`` highest scores (ties: lower index), ``k >= 1``."""
    n = scores.shape[-1]
    # topk_mask ranks by |x|: shift so every score is >= 0 and the order is kept. No constant
    # is added: attribution scores are ~1e-7 (gradients of a mean loss), below fp32's
    # resolution next to 1.0, where they would all tie (and the lowest indices win).
    shifted = scores.float() - scores.float().min(dim=-1, keepdim=True).values
    return topk_mask(shifted, n - zeroed_count(n, sparsity))


def attribution_mask(
    a: torch.Tensor, grad: torch.Tensor, layer_grad_norm: torch.Tensor, sparsity: float
) -> torch.Tensor:
    """Neurons kept by the corrected attribution at ``sparsity`` (shape of ``a``)."""
    return select_top(corrected_attribution(a, grad, layer_grad_norm), sparsity)


def magnitude_mask(a: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The baseline at the same sparsity: keep the largest ``|a_i|`` per token."""
    return select_top(a.abs(), sparsity)


def unit_ratios(sparsity: float, heads: int | None) -> tuple[float, float]:
    """(head ratio, MLP ratio) so that ``⅓ r_h + ⅔ r_mlp = sparsity`` (module docstring);
    ``heads=None``: no head selection, MLP at ``sparsity``."""
    if heads is None:
        return 0.0, sparsity
    r_h = zeroed_count(heads, sparsity) / heads
    return r_h, min(max((sparsity - HEAD_SHARE * r_h) / MLP_SHARE, 0.0), 1.0)


class _Unit:
    """One hooked projection: its input ``a`` [B, T, N] is scored and masked."""

    def __init__(
        self,
        proj: nn.Module,
        heads: int | None,
        ratio: float,
        grad_norm: str = "units",
        head_reduce: str = "sum",
    ) -> None:
        self.proj, self.heads, self.ratio, self.grad_norm = proj, heads, ratio, grad_norm
        self.head_reduce = head_reduce
        self.a: torch.Tensor | None = None
        self.z_in: torch.Tensor | None = None
        self.z_out: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def keep(self, score: str) -> torch.Tensor:
        """Bool [B, T, N] of the entries kept, from the captured pass."""
        a = self.a
        if score == "attribution":
            g = self.z_in.grad
            g_norm = layer_grad_norm(g if self.grad_norm == "units" else self.z_out.grad)
            if self.heads is None:
                s = corrected_attribution(a.float(), g.float(), g_norm)
            elif self.head_reduce == "mean":
                s = head_attribution_mean(a.float(), g.float(), self.heads)
            else:
                s = head_attribution(a.float(), g.float(), g_norm, self.heads)
        else:
            s = a.float().abs() if self.heads is None else head_magnitude(a.float(), self.heads)
        keep = select_top(s, self.ratio)
        if self.heads is not None:
            keep = keep.repeat_interleave(a.shape[-1] // self.heads, dim=-1)
        return keep


@register
class AttributionSelection(SparsityMethod):
    """Per-token selection of MLP neurons (and attention heads, ``heads=True``) by the
    corrected attribution (``score="attribution"``) or by magnitude (``"magnitude"``), at the
    weighted ratio ``sparsity`` (module docstring). ``grad_norm``: ``"units"`` (the paper's
    ``||∂L/∂a||``) or ``"output"`` (the projection output's gradient; reproduces the broken
    earlier reading). ``loss``: ``"window"`` or ``"position"``; ``head_reduce``: ``"sum"`` or
    ``"mean"`` (the released code's readings; module docstring)."""

    name = "attribution"

    def __init__(
        self,
        sparsity: float = 0.5,
        score: str = "attribution",
        heads: bool = True,
        grad_norm: str = "units",
        loss: str = "window",
        head_reduce: str = "sum",
    ):
        super().__init__(sparsity)
        if score not in SCORES:
            raise ValueError(f"attribution: score={score!r} must be one of {SCORES}")
        if grad_norm not in GRAD_NORMS:
            raise ValueError(f"attribution: grad_norm={grad_norm!r} must be one of {GRAD_NORMS}")
        if loss not in LOSSES:
            raise ValueError(f"attribution: loss={loss!r} must be one of {LOSSES}")
        if head_reduce not in HEAD_REDUCES:
            raise ValueError(
                f"attribution: head_reduce={head_reduce!r} must be one of {HEAD_REDUCES}"
            )
        self.score, self.heads, self.grad_norm = score, bool(heads), grad_norm
        self.loss, self.head_reduce = loss, head_reduce

    def label(self) -> str:
        kind = "attribution" if self.score == "attribution" else "magnitude-select"
        if self.score == "attribution":
            kind += "-outnorm" if self.grad_norm == "output" else ""
            kind += "-posloss" if self.loss == "position" else ""
            kind += "-headmean" if self.head_reduce == "mean" and self.heads else ""
        return f"{kind}{'' if self.heads else '-mlp'} S={self.sparsity:g}"

    def _apply(
        self, model: nn.Module, tokenizer: Any, batches: list[torch.Tensor] | None
    ) -> MethodResult:
        sparsify(model, sparsity=SparsityConfig(ratio=0.0))  # sites that only measure
        info = {"name": self.name, "sparsity": self.sparsity, "score": self.score}
        info["heads"], info["grad_norm"] = self.heads, self.grad_norm
        info["loss"], info["head_reduce"] = self.loss, self.head_reduce
        units = self.restore(model, info)
        self.record(model, info)
        names = {id(sp): n for n, sp in sparsifiers(model).items()}
        site_sparsity, weights = {}, {}
        for unit in units:
            name = names[id(unit.proj.act)]
            site_sparsity[name] = unit.ratio
            weights[name] = (HEAD_SHARE if unit.heads else MLP_SHARE) if self.heads else 1.0
        return MethodResult(self.name, self.sparsity, site_sparsity, site_weights=weights)

    @classmethod
    def restore(cls, model: nn.Module, info: dict[str, Any]) -> list[_Unit]:
        """Install the scoring and masking hooks (idempotent: earlier ones are removed)."""
        for handle in getattr(model, "_qsparse_attribution_hooks", []):
            handle.remove()
        sparsity, score = float(info["sparsity"]), str(info.get("score", "attribution"))
        use_heads = bool(info.get("heads", True))
        grad_norm = str(info.get("grad_norm", "units"))
        loss, head_reduce = str(info.get("loss", "window")), str(info.get("head_reduce", "sum"))
        units: list[_Unit] = []
        for _, attn, mlp in decoder_layers(model):
            heads = attn.o_proj.in_features // attn.head_dim if use_heads else None
            r_h, r_mlp = unit_ratios(sparsity, heads)
            if use_heads:
                units.append(_Unit(attn.o_proj, heads, r_h, grad_norm, head_reduce))
            units.append(_Unit(mlp.down_proj, None, r_mlp, grad_norm))
        state = {"scoring": False}
        sites = list(sparsifiers(model).values())
        select = _select(units, score, state, sites, loss)
        handles = [model.register_forward_pre_hook(select, with_kwargs=True)]
        for unit in units:
            handles.append(unit.proj.register_forward_pre_hook(_unit_input(unit, state)))
            handles.append(unit.proj.register_forward_hook(_unit_output(unit, state)))
        model.__dict__["_qsparse_attribution_hooks"] = handles
        return units


def _unit_input(unit: _Unit, state: dict[str, bool]):
    def hook(module: nn.Module, args: tuple) -> tuple | None:
        a = args[0]
        if state["scoring"]:  # capture a; a + z carries ∂L/∂a to z.grad
            unit.a = a.detach()
            unit.z_in = torch.zeros_like(a, requires_grad=True)
            return (a + unit.z_in, *args[1:])
        if unit.mask is None:
            return None
        return (a * unit.mask.to(a.dtype), *args[1:])

    return hook


def _unit_output(unit: _Unit, state: dict[str, bool]):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not state["scoring"] or unit.grad_norm != "output":
            return None
        unit.z_out = torch.zeros_like(out, requires_grad=True)
        return out + unit.z_out

    return hook


def _unit_grads(logits: torch.Tensor, zs: list[torch.Tensor], loss_kind: str) -> list[torch.Tensor]:
    """``∂L/∂z`` for every ``z`` [B, T, N], ``L`` the cross-entropy of the greedy tokens.

    ``"window"``: one backward of the mean loss over all positions. ``"position"``: position
    t's entries come from the loss of position t alone (T backwards), as the released code
    scores each generated token by its own loss. Both are divided by ``B·T``."""
    greedy = logits.detach().argmax(-1)
    if loss_kind == "window":
        loss = F.cross_entropy(logits.flatten(0, 1).float(), greedy.flatten())
        return list(torch.autograd.grad(loss, zs))
    grads = [torch.zeros_like(z) for z in zs]
    n = greedy.numel()
    for t in range(logits.shape[1]):
        loss_t = F.cross_entropy(logits[:, t].float(), greedy[:, t], reduction="sum") / n
        for out, g in zip(grads, torch.autograd.grad(loss_t, zs, retain_graph=True), strict=True):
            out[:, t] = g[:, t]
    return grads


def _select(
    units: list[_Unit],
    score: str,
    state: dict[str, bool],
    sites: list[nn.Module],
    loss_kind: str = "window",
):
    """Model pre-hook: a dense scoring pass (with a backward for ``attribution``; the ``sites``
    do not count its zeros) that sets every unit's mask for the forward that follows."""

    def hook(model: nn.Module, args: tuple, kwargs: dict) -> None:
        if state["scoring"]:
            return
        if kwargs.get("past_key_values") is not None:
            raise ValueError("attribution selection scores whole sequences: call without a cache")
        ids = kwargs.get("input_ids", args[0] if args else None)
        for unit in units:
            unit.mask = None
        state["scoring"] = True
        tracking = [sp.track_stats for sp in sites]
        for sp in sites:
            sp.track_stats = False
        try:
            with torch.enable_grad():
                logits = model_forward(model, ids)
                if score == "attribution":
                    zs = [z for u in units for z in (u.z_in, u.z_out) if z is not None]
                    for z, g in zip(zs, _unit_grads(logits, zs, loss_kind), strict=True):
                        z.grad = g
        finally:
            state["scoring"] = False
            for sp, on in zip(sites, tracking, strict=True):
                sp.track_stats = on
        with torch.no_grad():
            for unit in units:
                unit.mask = unit.keep(score)
                unit.a = unit.z_in = unit.z_out = None

    return hook
