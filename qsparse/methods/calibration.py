"""Calibration shared by the training-free threshold methods (TEAL, CATS).

Both pick a magnitude threshold ``t`` per site so that a target fraction ``s`` of the site's
entries falls at or below it: ``t = icdf_|x|(s)``, read off a histogram of ``|x|``
accumulated over calibration text. The masked site then computes ``x * 1[|x| > t]``
(:class:`qsparse.nn.ActivationSparsifier` with ``pattern="threshold"``).

Histogram (a decision, measured in ``tests/test_methods.py``): TEAL's reference histograms the
*signed* values on 10,000 uniform bins between the 1% / 99% quantiles (plus two outlier bins)
and reads ``icdf(0.5 + s/2)``, assuming a symmetric distribution. We histogram ``|x|``
directly (no symmetry assumption) on fixed log-spaced edges, so batches stream into the same
bins without a first pass for the range: ``edges = [0, logspace(log10 low, log10 high,
bins)]``, relative bin width ``(high/low)^(1/bins) - 1`` (0.68% at the defaults); values above
``high`` count in the last bin. Inside a bin the icdf interpolates linearly (uniform density).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn import ActivationSparsifier


class MagnitudeHistogram:
    """Streaming histogram of ``|x|`` with an inverse CDF.

    ``edges``: float64 [n+1], increasing, ``edges[0] = 0``; ``counts``: float64 [n], entries
    of ``|x|`` in ``[edges[i], edges[i+1])`` (the last bin also takes everything above).
    """

    def __init__(
        self,
        edges: torch.Tensor | None = None,
        bins: int = 4096,
        low: float = 1e-6,
        high: float = 1e6,
    ) -> None:
        if edges is None:
            edges = torch.cat(
                [
                    torch.zeros(1, dtype=torch.float64),
                    torch.logspace(
                        torch.tensor(low).log10(), torch.tensor(high).log10(), bins
                    ).double(),
                ]
            )
        edges = torch.as_tensor(edges, dtype=torch.float64)
        if edges.dim() != 1 or edges.numel() < 2 or bool((edges[1:] <= edges[:-1]).any()):
            raise ValueError("histogram edges must be a 1-D increasing tensor of >= 2 values")
        if float(edges[0]) != 0.0:
            raise ValueError("histogram edges must start at 0 (magnitudes)")
        self.edges = edges
        self.counts = torch.zeros(edges.numel() - 1, dtype=torch.float64)

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def add(self, x: torch.Tensor) -> None:
        """Count the magnitudes of every entry of ``x`` (any shape, any device).

        The bins are counted on ``x``'s device (float64 there too, so a GPU count equals the
        CPU one); only the ``[n]`` counts come back: copying every activation to the host
        made calibrating a 135M model on 16k tokens take minutes."""
        edges = self.edges.to(x.device)  # [n+1]: no copy when x is on the CPU
        mag = x.detach().abs().flatten().double()
        idx = torch.bucketize(mag, edges, right=True) - 1
        idx = idx.clamp_(0, self.counts.numel() - 1)
        self.counts += torch.bincount(idx, minlength=self.counts.numel()).double().cpu()

    def icdf(self, s: float) -> float:
        """The magnitude ``t`` with a fraction ``s`` of the counted entries at or below it.

        With ``C_i`` the cumulative count through bin i and ``N = s * total``, bin ``i`` is the
        first with ``C_i >= N`` and ``t = e_i + (N - C_{i-1}) / c_i * (e_{i+1} - e_i)``.
        ``s = 0`` gives 0 (keep every non-zero entry).
        """
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"sparsity {s} is outside [0, 1]")
        total = self.total
        if total == 0:
            raise ValueError("the histogram is empty: run calibration text through it first")
        if s == 0.0:
            return 0.0
        cum = self.counts.cumsum(0)
        target = s * total
        i = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64))[0])
        i = min(i, self.counts.numel() - 1)
        before = float(cum[i - 1]) if i > 0 else 0.0
        frac = (target - before) / max(float(self.counts[i]), 1e-300)
        lo, hi = float(self.edges[i]), float(self.edges[i + 1])
        return lo + min(max(frac, 0.0), 1.0) * (hi - lo)


def model_forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` on ``ids`` [B, T] without a KV cache (transformers or qsparse)."""
    if type(model).__module__.startswith("transformers"):
        out = model(input_ids=ids, use_cache=False)
    else:
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out["logits"]


def calibration_batches(
    tokenizer, source: str | Path | Sequence[str], tokens: int = 8192, seq_len: int = 256
) -> list[torch.Tensor]:
    """LongTensor[1, T] windows (T <= ``seq_len``) of the first ``tokens`` tokens of
    ``source``: a corpus name or file (:func:`qsparse.data.read_documents`) or a list
    of documents. Tokenized as perplexity evaluation does (each document + EOS)."""
    from ..data.documents import read_documents
    from ..evaluation.perplexity import token_stream

    docs = list(source) if isinstance(source, (list, tuple)) else read_documents(source)
    stream = token_stream(tokenizer, docs, max_tokens=tokens)
    return [w[None] for w in stream.split(seq_len) if w.numel() >= 2]


def take_tokens(batches: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The first of ``batches`` (in order) until they hold at least ``tokens`` elements: a
    smaller calibration set cut from a larger one."""
    out, seen = [], 0
    for b in batches:
        if seen >= tokens:
            break
        out.append(b)
        seen += b.numel()
    return out


def site_input(sp: ActivationSparsifier, x: torch.Tensor) -> torch.Tensor:
    """What the mask of ``sp`` sees for input ``x``: ``x`` after its SubLN norm if any."""
    return sp.norm(x) if sp.norm is not None else x


class StopForward(Exception):
    """Raised by a calibration hook to end a forward pass early (nothing after it is needed)."""


@torch.no_grad()
def run_with_hooks(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    hooks: Iterable[tuple[nn.Module, Callable[..., Any]]],
    with_kwargs: bool = False,
) -> None:
    """Run ``batches`` through ``model`` (eval mode, no cache) with forward pre-hooks
    ``(module, hook)`` installed for the pass; hooks and train mode are restored after. A hook
    may raise :class:`StopForward` to cut a batch's pass short."""
    handles = [m.register_forward_pre_hook(h, with_kwargs=with_kwargs) for m, h in hooks]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for ids in batches:
            try:
                model_forward(model, ids.to(device))
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


@torch.no_grad()
def collect_histograms(
    model: nn.Module,
    sites: dict[str, ActivationSparsifier],
    batches: Iterable[torch.Tensor],
    make: Callable[[], MagnitudeHistogram] = MagnitudeHistogram,
) -> dict[str, MagnitudeHistogram]:
    """Run ``batches`` through ``model`` and histogram the input magnitudes of every site.

    The sites' thresholds are set to 0 for the pass (dense activations, as TEAL and CATS
    calibrate) and restored afterwards.
    """
    hists = {name: make() for name in sites}
    saved = {name: sp.threshold.clone() for name, sp in sites.items() if hasattr(sp, "threshold")}
    for name in saved:
        sites[name].threshold.zero_()

    def hook_for(name: str) -> Callable[..., None]:
        return lambda module, args: hists[name].add(site_input(module, args[0]))

    try:
        run_with_hooks(model, batches, [(sp, hook_for(n)) for n, sp in sites.items()])
    finally:
        for name, t in saved.items():
            sites[name].threshold.copy_(t)
    return hists


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: list[nn.Module], batches: list[torch.Tensor], args: bool = True
) -> list[list[tuple[tuple, dict]]]:
    """The (args, kwargs) every decoder layer receives on ``batches`` (one pass; ``args=False``
    keeps the positional arguments (the hidden states) of the first layer only)."""
    captured: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def hook_for(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, a: tuple, k: dict) -> None:
            k = dict(k)
            if not a and "hidden_states" in k:  # hidden states by keyword: positional here
                a = (k.pop("hidden_states"),)
            captured[i].append((a if args or i == 0 else (), k))

        return hook

    run_with_hooks(model, batches, [(lay, hook_for(i)) for i, lay in enumerate(layers)], True)
    return captured


@torch.no_grad()
def sequential_thresholds(
    model: nn.Module,
    sites: dict[str, ActivationSparsifier],
    batches: list[torch.Tensor],
    sparsity: dict[str, float],
) -> dict[str, float]:
    """Thresholds set site by site in forward order (``sites``' order), each histogrammed on
    inputs that every earlier site already sparsifies, so each site zeroes its ``sparsity``
    fraction of the calibration text exactly (to bin width) rather than drifting with the
    sparsity upstream.

    Layer by layer: one model pass captures the first decoder layer's inputs (and every
    layer's keyword arguments: masks, rotary tables); each layer then runs once per site it
    holds (cut at the site, :class:`StopForward`) and once more, thresholds set, to give the
    next layer its input. About 5 layer passes per layer instead of a model pass per site.
    Every site must sit inside a decoder layer (``ValueError`` otherwise).
    """
    from ..nn.sites import decoder_layers

    layers = [model.get_submodule(p) if p else model for p, _, _ in decoder_layers(model)]
    owner: dict[int, int] = {}
    for i, layer in enumerate(layers):
        owner.update({id(m): i for m in layer.modules()})
    per_layer: list[list[tuple[str, ActivationSparsifier]]] = [[] for _ in layers]
    for name, sp in sites.items():
        if id(sp) not in owner:
            raise ValueError(f"site {name} is not inside a decoder layer")
        per_layer[owner[id(sp)]].append((name, sp))
    for sp in sites.values():
        sp.threshold.zero_()
    captured = capture_layer_inputs(model, layers, batches, args=False)
    inputs = captured[0]
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for i, layer in enumerate(layers):
            kwargs = [k for _, k in captured[i]]
            for name, sp in per_layer[i]:
                hist = MagnitudeHistogram()

                def hook(module, args, _hist=hist):
                    _hist.add(site_input(module, args[0]))
                    raise StopForward

                handle = sp.register_forward_pre_hook(hook)
                try:
                    for (a, _), k in zip(inputs, kwargs, strict=True):
                        try:
                            layer(*a, **k)
                        except StopForward:
                            pass
                finally:
                    handle.remove()
                out[name] = set_threshold(sp, hist, sparsity[name])
            if i + 1 < len(layers):
                inputs = [
                    ((layer_output(layer(*a, **k)), *a[1:]), {})
                    for (a, _), k in zip(inputs, kwargs, strict=True)
                ]
    finally:
        model.train(was_training)
    return out


def set_threshold(sp: ActivationSparsifier, hist: MagnitudeHistogram, sparsity: float) -> float:
    """Point ``sp`` at ``t = hist.icdf(sparsity)``; ``sp.ratio`` records the target."""
    t = hist.icdf(sparsity)
    sp.threshold.fill_(t)
    sp.ratio = sp.target_ratio = float(sparsity)
    return t
