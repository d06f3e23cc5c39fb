"""Training stack: LightningModule, optimizer groups and schedules, callbacks, driver.

``qsparse.training.LMModule`` trains any model built from a spec; ``qsparse.training.train``
runs a whole job from a composed Hydra config (what ``qsparse-train`` calls).
"""

from .callbacks import RunSummary, SparsityMonitor, StopAtStep, ThroughputMonitor
from .checkpoint import AtomicCheckpointIO
from .module import LMModule, build_model, enable_gradient_checkpointing
from .optim import TwoStageSchedule, param_groups, warmup_decay


def train(cfg):  # noqa: ANN001, ANN201 - thin lazy wrapper, see qsparse.training.run.train
    """Run one training job from a composed config (see :func:`qsparse.training.run.train`)."""
    from .run import train as _train

    return _train(cfg)


__all__ = [
    "AtomicCheckpointIO",
    "LMModule",
    "RunSummary",
    "SparsityMonitor",
    "StopAtStep",
    "ThroughputMonitor",
    "TwoStageSchedule",
    "build_model",
    "enable_gradient_checkpointing",
    "param_groups",
    "train",
    "warmup_decay",
]
