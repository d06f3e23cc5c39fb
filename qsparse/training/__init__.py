"""Training stack: LightningModule, optimizer groups and schedules, callbacks, driver.

``qsparse.training.LMModule`` trains any model built from a spec; ``qsparse.training.train``
(:func:`qsparse.training.run.train`) runs a whole job from a composed Hydra config: it is
what the ``qsparse-train`` command (:mod:`qsparse.cli.train`) calls.
"""

from ..models.builder import build_model
from ..models.checkpointing import enable_gradient_checkpointing
from .callbacks import (
    LayerGradNorm,
    RunSummary,
    SparsityMonitor,
    StepProgressBar,
    StopAtStep,
    TokenThroughputMonitor,
)
from .checkpoint import AtomicCheckpointIO
from .module import LMModule
from .optim import TwoStageSchedule, param_groups, warmup_decay
from .run import train

__all__ = [
    "AtomicCheckpointIO",
    "LMModule",
    "LayerGradNorm",
    "RunSummary",
    "SparsityMonitor",
    "StepProgressBar",
    "StopAtStep",
    "TokenThroughputMonitor",
    "TwoStageSchedule",
    "build_model",
    "enable_gradient_checkpointing",
    "param_groups",
    "train",
    "warmup_decay",
]
