"""Rebuilding a loaded checkpoint's sparsity method: :func:`restore_method`.

The checkpoint names its method (``config.json["qsparse"]["method"]["name"]``); the class is
looked up in :data:`qsparse.methods.base.METHODS`, which the modules defining the methods fill
when imported (``@register``): this package's, and qsparse.moe's D2DMoE and SSD, which build
on this package. Those modules import :mod:`qsparse.methods.base`, never this module, so
importing them here closes no import cycle.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..nn.sites import get_settings
from .base import METHODS

__all__ = ["registry", "restore_method"]


def registry() -> dict[str, type]:
    """:data:`~qsparse.methods.base.METHODS` complete: the modules that register a method
    (this package's and qsparse.moe's) imported first."""
    from .. import moe  # noqa: F401  (registers d2dmoe and ssd)
    from . import attribution, cats, prosparse, qsparse, teal  # noqa: F401  (register theirs)

    return METHODS


def restore_method(model: nn.Module, info: dict[str, Any]) -> None:
    """Rebuild the modules of the method recorded in ``info`` (``{"name": ...}``)."""
    registry()
    name = info.get("name")
    if name not in METHODS:
        raise ValueError(
            f"unknown sparsity method {name!r} in the checkpoint; known: {sorted(METHODS)}"
        )
    METHODS[name].restore(model, info)
    settings = get_settings(model)
    if settings is not None:
        settings["method"] = dict(info)
