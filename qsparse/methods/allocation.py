"""Per-site sparsity allocation at a fixed budget: TEAL's greedy (Liu et al., 2408.14690).

One decoder layer has four sites (the shared q/k/v input, the o input, the shared gate/up
input, the down input), each in front of ``w`` weight parameters (in units of d²). Uniform
sparsity gives every site ``S``; the greedy keeps the layer's weight-averaged sparsity
``Σ s·w / Σ w = S`` (so the activated parameters per token are those of uniform ``S``) and
spends it where the layer's output changes least:

    start every site at s = 0; repeat until Σ s·w / Σ w = S:
        for each site, try s_site + step / w_site   (each try removes the same weight reads)
        keep the try with the smallest block error  mean_tokens ||y(x; s) - y(x; 0)||₂
        (the last step is cut to land on S exactly)

``y`` is the layer's output on its dense inputs ``x`` (captured once on calibration text),
the error taken over the last ``error_fraction`` of each sequence (TEAL's reference). Layers
are allocated independently, so the whole model's budget is uniform ``S``'s too.

The same search serves two sparsifiers: TEAL's magnitude thresholds (``s`` -> a threshold
from the site's histogram, :class:`qsparse.methods.TEAL`) and Q-Sparse top-k (``s`` -> the
site's ratio, k = int((1 - s) d): :func:`topk_site_ratios`, which
``sparsity.allocation=greedy`` runs before continued training).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn import ActivationSparsifier
from ..nn.sites import decoder_layers, sparsifiers
from .calibration import calibration_batches, capture_layer_inputs, layer_output

SITE_NAMES = ("qkv", "o", "gate_up", "down")
#: TEAL's defaults: greedy step in d² units, fraction of each sequence the error is read on
STEP, ERROR_FRACTION = 0.05, 0.25

LayerSites = tuple[nn.Module, dict[str, ActivationSparsifier], dict[str, float], str]


def greedy_allocation(
    error: Callable[[dict[str, float]], float],
    weights: dict[str, float],
    target: float,
    step: float = STEP,
    max_sparsity: float = 0.99,
    trace: list[tuple[dict[str, float], float]] | None = None,
) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """TEAL's greedy per-block allocation (module docstring).

    Args:
        error: block output error for a dict site -> sparsity.
        weights: site -> weight share ``w`` (any unit; steps are ``step / w``).
        target: the weighted sparsity ``Σ s·w / Σ w`` to reach.
        trace: when given, ``(site -> sparsity, error)`` is appended after every step: the
            layer's error curve along the search (:mod:`qsparse.methods.layer_allocation`).

    Returns:
        the final site -> sparsity and the trajectory ``[(site raised, error), ...]``.
    """
    if not 0.0 <= target <= max_sparsity:
        raise ValueError(f"target sparsity {target} must be in [0, {max_sparsity}]")
    total_w = sum(weights.values())
    s = {k: 0.0 for k in weights}
    history: list[tuple[str, float]] = []

    def weighted(x: dict[str, float]) -> float:
        return sum(x[k] * weights[k] for k in x) / total_w

    while weighted(s) < target - 1e-9:
        missing = (target - weighted(s)) * total_w  # weighted sparsity still to place
        best: tuple[float, str, float] | None = None
        for site, w in weights.items():
            inc = min(step / w, missing / w, max_sparsity - s[site])
            if inc <= 1e-12:
                continue
            err = float(error({**s, site: s[site] + inc}))
            if best is None or err < best[0]:
                best = (err, site, inc)
        if best is None:  # every site at max_sparsity
            break
        err, site, inc = best
        s[site] += inc
        history.append((site, err))
        if trace is not None:
            trace.append((dict(s), err))
    return s, history


def layer_sites(model: nn.Module) -> list[LayerSites]:
    """Per decoder layer: (layer module, site -> sparsifier, site -> weight share in d², prefix)."""
    out = []
    for prefix, attn, mlp in decoder_layers(model):
        d = attn.q_proj.in_features
        sites = {
            "qkv": attn.qsparse_input,
            "o": attn.o_proj.act,
            "gate_up": mlp.qsparse_input,
            "down": mlp.down_proj.act,
        }
        numel = {
            "qkv": sum(getattr(attn, n).weight.numel() for n in ("q_proj", "k_proj", "v_proj")),
            "o": attn.o_proj.weight.numel(),
            "gate_up": mlp.gate_proj.weight.numel() + mlp.up_proj.weight.numel(),
            "down": mlp.down_proj.weight.numel(),
        }
        layer = model.get_submodule(prefix) if prefix else model
        out.append((layer, sites, {k: v / d**2 for k, v in numel.items()}, prefix))
    return out


def block_error(
    layer: nn.Module,
    sites: Iterable[str],
    apply: Callable[[dict[str, float]], None],
    inputs: list[tuple[tuple, dict]],
    error_fraction: float = ERROR_FRACTION,
    relative: bool = False,
) -> Callable[[dict[str, float]], float]:
    """``s -> mean_tokens ||layer(x; s) - layer(x; 0)||₂`` over the last ``error_fraction``
    of every captured sequence; ``apply(s)`` sets the layer's sites to sparsities ``s``.
    ``relative``: divided by ``mean_tokens ||layer(x; 0)||₂`` over the same tokens (one
    constant per layer, so the greedy's choices within the layer do not change)."""
    apply({k: 0.0 for k in sites})
    with torch.no_grad():
        dense = [layer_output(layer(*a, **k)) for a, k in inputs]
    scale = 1.0
    if relative:
        tails = [ref[..., int(ref.shape[-2] * (1 - error_fraction)) :, :] for ref in dense]
        norms = torch.cat([t.float().norm(dim=-1).flatten() for t in tails])
        scale = float(norms.mean()) if norms.numel() else 1.0

    @torch.no_grad()
    def error(s: dict[str, float]) -> float:
        apply(s)
        total, count = 0.0, 0
        for (a, k), ref in zip(inputs, dense, strict=True):
            out = layer_output(layer(*a, **k))
            start = int(out.shape[-2] * (1 - error_fraction))
            norms = (out[..., start:, :] - ref[..., start:, :]).float().norm(dim=-1)
            total += float(norms.sum())
            count += norms.numel()
        return total / max(count, 1) / scale

    return error


def corpus_batches(
    tokenizer: Any, sources: Sequence[str], tokens: int, seq_len: int = 256
) -> list[torch.Tensor]:
    """LongTensor[B, seq_len] batches of ``tokens`` tokens taken evenly from ``sources``
    (corpus names or files): full windows of :func:`calibration_batches`, stacked 16 a batch
    so that each greedy try is one layer call."""
    per = -(-tokens // len(sources))
    windows = [
        w
        for src in sources
        for w in calibration_batches(tokenizer, src, per, seq_len)
        if w.shape[-1] == seq_len
    ]
    if not windows:
        raise ValueError(
            f"sparsity.calibration {list(sources)} gave no full {seq_len}-token window; "
            "raise sparsity.calibration_tokens or give a longer corpus"
        )
    return [torch.cat(windows[i : i + 16]) for i in range(0, len(windows), 16)]


@torch.no_grad()
def layer_searches(
    model: nn.Module,
    batches: list[torch.Tensor],
    search: Callable[[Callable[[dict[str, float]], float], dict[str, float], float], Any],
    error_fraction: float = ERROR_FRACTION,
    relative: bool = False,
) -> list[tuple[dict[str, str], Any]]:
    """Run ``search(error, weights, site_cap)`` once per decoder layer of a
    :func:`qsparse.sparsify`-ed (``token_topk``) model: ``error`` is the layer's
    :func:`block_error` on its dense inputs (captured once from ``batches``, LongTensor[B, T]
    token ids; every other site dense), ``weights`` its :func:`layer_sites` shares, and
    ``site_cap`` the largest ratio that keeps k >= 1 at every site. Returns per layer
    ``(site -> metric name, search result)``; the model's ratios are restored afterwards."""
    named = sparsifiers(model)
    saved = {name: (sp.ratio, sp.target_ratio) for name, sp in named.items()}
    by_id = {id(sp): name for name, sp in named.items()}
    layers = layer_sites(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple[dict[str, str], Any]] = []
    try:
        for sp in named.values():
            sp.ratio = 0.0
        inputs = capture_layer_inputs(
            model, [lay[0] for lay in layers], [b.to(device) for b in batches]
        )
        for (layer, sites, weights, _), layer_inputs in zip(layers, inputs, strict=True):
            # k >= 1 at every site: cap each site below 1 - 1/d
            cap = min(0.99, 1.0 - 1.5 / min(sp.dim for sp in sites.values()))

            def apply(s: dict[str, float], sites: dict = sites) -> None:
                for site, sp in sites.items():
                    sp.ratio = s[site]

            err = block_error(layer, sites, apply, layer_inputs, error_fraction, relative)
            result = search(err, weights, cap)
            apply({k: 0.0 for k in sites})
            out.append(({k: by_id[id(sp)] for k, sp in sites.items()}, result))
    finally:
        for name, sp in named.items():
            sp.ratio, sp.target_ratio = saved[name]
        model.train(was_training)
    return out


def topk_site_ratios(
    model: nn.Module,
    batches: list[torch.Tensor],
    target: float,
    step: float = STEP,
    error_fraction: float = ERROR_FRACTION,
) -> dict[str, float]:
    """Greedy per-site top-k ratios of a :func:`qsparse.sparsify`-ed (``token_topk``) model
    at the budget of uniform ``target``: site metric name -> S (module docstring). The model's
    ratios are restored afterwards; ``batches`` are LongTensor[B, T] token ids."""

    def search(err: Callable, weights: dict[str, float], cap: float) -> dict[str, float]:
        return greedy_allocation(err, weights, target, step, cap)[0]

    table: dict[str, float] = {}
    for names, s in layer_searches(model, batches, search, error_fraction):
        table.update({names[k]: round(v, 6) for k, v in s.items()})
    return table


def check_calibration(sources: Sequence[str]) -> None:
    """``ValueError`` naming ``sparsity.calibration`` when a source is neither a file nor a
    bundled corpus (checked before a run writes anything; reading waits for the model)."""
    from ..data.corpora import available_corpora

    known = available_corpora()
    for src in sources:
        if not Path(src).expanduser().is_file() and src not in known:
            raise ValueError(
                f"sparsity.calibration: {src!r} is no file and no bundled corpus; use the "
                f"training corpora ({', '.join(known)}) or a text file"
            )
