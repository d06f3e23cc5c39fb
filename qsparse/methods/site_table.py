"""The per-site table a run trains at: the search ``sparsity.allocation`` names, cached.

:func:`allocate` runs TEAL's greedy (:mod:`qsparse.methods.allocation`, every layer at S) or
the cross-layer allocation (:mod:`qsparse.methods.layer_allocation`) on calibration text and
caches the table under ``<cache root>/allocation/``, so the jobs of a study and a resumed run
search once.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache import CACHE_FORMAT_VERSION, file_fingerprint, resolve_cache_dir, stable_hash
from ..io import atomic_write_text
from ..nn import SparsityConfig
from .allocation import ERROR_FRACTION, check_calibration, corpus_batches, topk_site_ratios
from .layer_allocation import cross_layer_site_ratios


def allocate(
    model: nn.Module, sparsity: SparsityConfig, tokenizer: Any, checkpoint: str | None = None
) -> SparsityConfig:
    """``sparsity`` with ``sites`` filled at ``sparsity.ratio``'s budget by the search
    ``sparsity.allocation`` names: ``greedy``
    (:func:`~qsparse.methods.allocation.topk_site_ratios`, every layer at S) or ``cross_layer``
    (:func:`~qsparse.methods.layer_allocation.cross_layer_site_ratios`, layer sparsities up
    to ``sparsity.layer_cap``), in steps of ``sparsity.allocation_step`` on
    ``sparsity.calibration_tokens`` tokens of ``sparsity.calibration`` (``tokenizer``: an HF
    tokenizer or a local folder). ``model`` is already sparsified with top-k. With the dense
    ``checkpoint`` folder the model was loaded from, the table is cached (``<cache
    root>/allocation/``, keyed by the folder's files, the model's dtype and these settings;
    the cross-layer curves also without the ratio): the jobs of a study and a resumed run
    calibrate once."""
    check_calibration(sparsity.calibration)
    path = _cache_path(model, sparsity, checkpoint)
    if path is not None and path.is_file():
        return replace(sparsity, sites=json.loads(path.read_text()))

    def batches() -> list[torch.Tensor]:
        tok = tokenizer
        if isinstance(tok, str):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tok, local_files_only=True)
        return corpus_batches(tok, sparsity.calibration, sparsity.calibration_tokens)

    if sparsity.allocation == "cross_layer":
        curves = _cache_path(model, sparsity, checkpoint, curves=True)
        table = cross_layer_site_ratios(
            model, batches, sparsity.ratio, sparsity.layer_cap, sparsity.allocation_step, curves
        )
    else:
        table = topk_site_ratios(model, batches(), sparsity.ratio, sparsity.allocation_step)
    if path is not None:
        atomic_write_text(path, json.dumps(table, indent=1))
    return replace(sparsity, sites=table)


def _cache_path(
    model: nn.Module, sparsity: SparsityConfig, checkpoint: str | None, curves: bool = False
) -> Path | None:
    """The cache file of :func:`allocate`'s table (``curves``: of the cross-layer curves,
    which do not depend on the ratio); ``None`` without a checkpoint folder of weights."""
    if checkpoint is None or not Path(checkpoint).is_dir():
        return None
    weights = sorted(p for p in Path(checkpoint).iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        return None
    files = [Path(c) for c in sparsity.calibration if Path(c).expanduser().is_file()]
    # greedy's key is the one it had before cross_layer existed (its cached tables stay valid)
    search = () if sparsity.allocation == "greedy" else (sparsity.allocation, sparsity.layer_cap)
    key = stable_hash(
        CACHE_FORMAT_VERSION,
        file_fingerprint([*weights, *files]),
        str(next(model.parameters()).dtype),
        "curves" if curves else sparsity.ratio,
        list(sparsity.calibration),
        sparsity.calibration_tokens,
        sparsity.allocation_step,
        ERROR_FRACTION,
        *search,
    )
    return resolve_cache_dir() / "allocation" / f"{key}.json"
