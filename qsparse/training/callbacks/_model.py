"""The network a LightningModule trains, as the callbacks see it."""

from __future__ import annotations

import lightning as L
import torch


def inner_model(pl_module: L.LightningModule) -> torch.nn.Module:
    """``pl_module.model`` when the module wraps a network there (``LMModule``), else the
    LightningModule itself."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, torch.nn.Module) else pl_module
