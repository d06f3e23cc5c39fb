"""``sparsity.allocation=greedy|cross_layer`` at model build: the per-site top-k table for a
training run.

:class:`~qsparse.training.module.LMModule` calls :func:`allocate_at_build` in
``configure_model`` when the table is empty, with the weights just built (the same on every
rank: same weights, same text, so every rank computes the same table). The search itself is
:func:`qsparse.methods.site_table.allocate` (TEAL's greedy, or the cross-layer allocation, at
uniform S's activated parameters, calibrated on ``sparsity.calibration``); this module only
checks that the run can calibrate, finds the tokenizer, and reports the result. The module
keeps the table in its hyperparameters, so a resumed run or a checkpoint loads it instead of
calibrating again.

A run that starts from a qsparse export trained with a searched table (``model.path=RUN/hf``
of a ``sparsity.allocation=greedy`` run: its ``config.json`` stores ``sparsity.sites``) keeps
that table when it asks for the same allocation at the same S (the weights were trained at
those ratios; no search); at another S or allocation it searches again on the loaded weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from qsparse.nn import SparsityConfig

from .console import say


def allocate_at_build(
    model: nn.Module,
    sparsity: SparsityConfig,
    trainer: Any,
    model_path: str | None,
    with_method: bool,
) -> SparsityConfig:
    """``sparsity`` with ``sites`` filled for ``model`` (already sparsified with top-k).

    ``trainer``: the Lightning trainer (``None`` for a build outside fit, e.g. the meta build
    of the config check, which returns ``sparsity`` unchanged unless ``model_path`` stores a
    table at this S); ``model_path``: the checkpoint folder (stored table, tokenizer fallback
    and table cache key); ``with_method``: a ``method=`` is set (refused: methods choose their
    own sites)."""
    from qsparse.methods.allocation import check_calibration
    from qsparse.methods.site_table import allocate

    name = f"sparsity.allocation={sparsity.allocation}"
    if with_method:
        raise ValueError(f"{name} cannot be combined with method=")
    stored = stored_sites(model_path)
    if stored is not None and stored[0] == sparsity.ratio and stored[2] == sparsity.allocation:
        if trainer is not None:
            say(
                f"{name}: the {len(stored[1])} site ratios stored in "
                f"{model_path} at S={sparsity.ratio:g} (no search)"
            )
        return replace(sparsity, sites=stored[1])
    check_calibration(sparsity.calibration)
    if next(model.parameters()).is_meta:
        if trainer is None:  # check_config's meta build: nothing to calibrate
            return sparsity
        raise ValueError(
            f"{name} needs the weights when the model is built; this "
            "strategy builds it on the meta device (trainer=fsdp): set sparsity.sites"
        )
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    tokenizer = getattr(dm, "tokenizer", None) or model_path
    if tokenizer is None:
        raise ValueError(
            f"{name} needs a tokenizer for sparsity.calibration: "
            "a datamodule with one, or a model.path checkpoint"
        )
    start = time.perf_counter()
    out = allocate(model, sparsity, tokenizer, model_path)
    ratios = out.sites.values()
    say(
        f"{name}: {len(ratios)} site ratios in "
        f"{min(ratios):.3f}..{max(ratios):.3f} at S={sparsity.ratio:g} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return out


def stored_sites(model_path: str | None) -> tuple[float, dict[str, float], str] | None:
    """``(S, sites, allocation)`` of the per-site table a qsparse export at ``model_path``
    stores in its ``config.json`` (``qsparse.sparsity``; an export from before
    ``allocation`` was stored counts as ``greedy``), or ``None`` (no folder, no table)."""
    if model_path is None or not (Path(model_path) / "config.json").is_file():
        return None
    stored = json.loads((Path(model_path) / "config.json").read_text()).get("qsparse") or {}
    spec = stored.get("sparsity") or {}
    if not spec.get("sites"):
        return None
    sites = {k: float(v) for k, v in spec["sites"].items()}
    allocation = spec.get("allocation") or "greedy"
    return float(spec.get("ratio", 0.0)), sites, "greedy" if allocation == "uniform" else allocation


def note_replaced_table(model_path: str | None, sparsity: SparsityConfig) -> None:
    """Say so when the run's uniform top-k replaces a per-site table ``model_path`` stores."""
    stored = stored_sites(model_path)
    if stored is not None and sparsity.pattern != "none" and not sparsity.sites:
        say(
            f"{model_path} stores a per-site table at S={stored[0]:g}; this run's "
            f"sparsity.allocation={sparsity.allocation} at S={sparsity.ratio:g} replaces it "
            f"(sparsity.allocation={stored[2]} at the same S keeps it)"
        )
