"""Lightning callbacks of a training run, one module each (their ``callbacks.<name>`` entries
in ``conf/callbacks/default.yaml`` target the names below).

- :class:`TokenThroughputMonitor` (``throughput.py``): ``perf/tokens_per_s``,
  ``perf/step_time_s``, ``perf/mfu``, ``perf/peak_memory_gib``.
- :class:`SparsityMonitor` (``sparsity.py``): ``sparsity/<site>``, ``sparsity/overall``,
  ``params/activated``, ``params/total``, ``val/sparsity``, ``val/activated_params``.
- :class:`LayerGradNorm` (``grad_norm.py``): ``grad_norm/layer_<i>`` (off by default).
- :class:`RunSummary` (``run_summary.py``): ``summary.json``, ``loss_curve.png``, the table.
- :class:`StopAtStep` (``stop.py``): stop (or simulate a crash) at a step.
- :class:`StepProgressBar` (``progress.py``): the progress bar counted in optimizer steps.
- :class:`WarmedUpCheckpoint`, :class:`WarmedUpEarlyStopping` (``selection.py``): Lightning's
  ``ModelCheckpoint`` / ``EarlyStopping`` that skip validations inside the sparsity warm-up.
"""

from .grad_norm import LayerGradNorm
from .progress import StepProgressBar
from .run_summary import RunSummary, best_checkpoint
from .selection import WarmedUpCheckpoint, WarmedUpEarlyStopping, warmup_fraction_of
from .sparsity import SparsityMonitor
from .stop import SimulatedCrash, StopAtStep
from .throughput import TokenThroughputMonitor, peak_memory_gib

__all__ = [
    "LayerGradNorm",
    "RunSummary",
    "SimulatedCrash",
    "SparsityMonitor",
    "StepProgressBar",
    "StopAtStep",
    "TokenThroughputMonitor",
    "WarmedUpCheckpoint",
    "WarmedUpEarlyStopping",
    "best_checkpoint",
    "peak_memory_gib",
    "warmup_fraction_of",
]
