"""The interface every activation-sparsity method implements, and the method registry.

A method turns a dense model (an HF Llama/Mistral/Qwen2 or a qsparse Llama) into a sparsely
activated one *in place*, through :func:`qsparse.sparsify`'s sites, so the metrics
(:mod:`qsparse.stats`, :mod:`qsparse.evaluation`) and export (:func:`qsparse.export` /
:func:`qsparse.load`) work unchanged::

    method = TEAL(sparsity=0.5, calibration="wiki_en")
    result = method.apply(model, tokenizer)      # calibrates, installs thresholds
    qsparse.export(model, "out/teal50", tokenizer=tokenizer)
    qsparse.load("out/teal50")                   # same thresholds, same logits

``apply`` records ``{"name": ..., **what restore needs}`` under the model's qsparse settings
(``config.json["qsparse"]["method"]``); :func:`qsparse.methods.restore.restore_method`
rebuilds the method's modules on load, before the saved tensors (thresholds) are loaded into them.

Training (``qsparse-train method=<name>``): :class:`~qsparse.training.LMModule` builds the
method from ``cfg.method`` (:func:`method_from_spec`) and calls its training hooks, so a method
that trains plugs into every recipe without a callback of its own::

    sparsity, activation = method.training_conversion(run_sparsity, run_activation)
    qsparse.sparsify(model, sparsity, quant, activation)    # in LMModule.configure_model
    method.on_model_configured(model)                        # record settings for export
    metrics = method.on_train_step(model, global_step)       # before every training batch
    method.on_fit_end(model)                                 # after the last step, before export

Training-free methods (TEAL, CATS) refuse in ``training_conversion`` with a
:class:`MethodConfigError` naming the setting.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import UserError
from ..nn.sites import get_settings

if TYPE_CHECKING:
    from ..nn import SparsityConfig


class MethodConfigError(UserError):
    """A ``method=`` setting that cannot run: the message names the setting and the fix."""


#: name -> method class, filled by ``register`` as the modules defining the methods are imported
#: (qsparse.moe's d2dmoe and ssd once qsparse.moe is; restore_method imports them all)
METHODS: dict[str, type[SparsityMethod]] = {}


@dataclass
class MethodResult:
    """What ``apply`` did: the target, per-site sparsities it set (calibration targets, not
    measurements), thresholds where it set any, and the seconds / peak memory it cost.
    ``site_weights``: how the method weighs its sites to reach ``sparsity`` (TEAL: weight
    parameters; default 1 each), used by :meth:`achieved`."""

    method: str
    sparsity: float
    site_sparsity: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    peak_memory_mib: float = 0.0
    calibration_tokens: int = 0
    site_weights: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def achieved(self, measured: dict[str, float]) -> float | None:
        """``Σ w·s_measured / Σ w`` over the method's sites: the sparsity the method reached,
        in the units of its target (``None`` when no site was measured)."""
        pairs = [(self.site_weights.get(n, 1.0), measured.get(n)) for n in self.site_sparsity]
        pairs = [(w, s) for w, s in pairs if s is not None]
        if not pairs:
            return None
        return sum(w * s for w, s in pairs) / sum(w for w, _ in pairs)


class SparsityMethod:
    """Base class: ``apply(model, tokenizer, batches=None) -> MethodResult``.

    Subclasses set ``name``, ``training_free`` and implement ``_apply``; ``restore`` rebuilds
    any modules beyond :func:`qsparse.sparsify`'s sites from the recorded settings.
    """

    name: ClassVar[str] = "base"
    training_free: ClassVar[bool] = True
    #: methods that calibrate read ``self.calibration``: a corpus name, a file, or documents
    needs_calibration: ClassVar[bool] = False

    def __init__(self, sparsity: float = 0.5) -> None:
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"{self.name}: sparsity={sparsity} must be in [0, 1)")
        self.sparsity = float(sparsity)
        self.calibration: str | list[str] | None = None

    def label(self) -> str:
        return f"{self.name} S={self.sparsity:g}"

    def apply(
        self, model: nn.Module, tokenizer: Any = None, batches: list[torch.Tensor] | None = None
    ) -> MethodResult:
        """Convert ``model`` in place; ``batches`` (LongTensor[1, T] each) override the
        method's own calibration text. Times the call and samples peak memory."""
        with CostMeter() as cost:
            result = self._apply(model, tokenizer, batches)
        result.seconds, result.peak_memory_mib = cost.seconds, cost.peak_mib
        return result

    def _apply(
        self, model: nn.Module, tokenizer: Any, batches: list[torch.Tensor] | None
    ) -> MethodResult:
        raise NotImplementedError

    @classmethod
    def restore(cls, model: nn.Module, info: dict[str, Any]) -> None:
        """Re-create the method's extra modules on a freshly sparsified model (default: none)."""

    # ----------------------------------------------------------- training hooks
    def training_conversion(
        self, sparsity: SparsityConfig, activation: str
    ) -> tuple[SparsityConfig, str]:
        """The ``sparsify`` settings of a training run with this method, given the run's own
        ``sparsity=`` group and ``activation``. Default: refuse (a training-free method)."""
        raise MethodConfigError(
            f"config error: method={self.name} is training-free (it is applied to a trained "
            f"model): run it with qsparse-compare or {type(self).__name__}(...).apply(model); "
            f"qsparse-train takes method=qsparse or method=prosparse"
        )

    def on_model_configured(self, model: nn.Module) -> None:
        """After ``sparsify`` in ``LMModule.configure_model``: record the method's settings
        (``config.json["qsparse"]["method"]``) so export and load keep them."""
        self.record(model, {"name": self.name, "sparsity": self.sparsity})

    def on_train_step(self, model: nn.Module, step: int) -> dict[str, float]:
        """Before each training batch at optimizer step ``step``; returns metrics to log."""
        return {}

    def on_fit_end(self, model: nn.Module) -> None:
        """After the last training step (before the final validation and the export)."""

    @staticmethod
    def record(model: nn.Module, info: dict[str, Any]) -> None:
        """Store ``info`` (with ``name``) as ``settings["method"]`` (exported in config.json)."""
        settings = get_settings(model)
        if settings is None:
            raise RuntimeError("record() needs a model converted by qsparse.sparsify")
        settings["method"] = info


def register(cls: type[SparsityMethod]) -> type[SparsityMethod]:
    """Class decorator: make ``cls`` known by name to
    :func:`~qsparse.methods.restore.restore_method` and the CLIs."""
    METHODS[cls.name] = cls
    return cls


def method_from_spec(spec: Any) -> SparsityMethod | None:
    """The method of a ``method=`` config node (``{"_target_": ..., **settings}``, as
    ``qsparse/conf/method/<name>.yaml``); ``None`` for an empty node. Raises
    :class:`MethodConfigError` naming the setting when it cannot be built."""
    if not spec:
        return None
    spec = dict(spec)
    target = spec.get("_target_")
    if not target:
        raise MethodConfigError("config error: method needs a _target_ (e.g. method=prosparse)")
    from hydra.utils import instantiate

    try:
        method = instantiate(spec, _convert_="all")
    except Exception as exc:  # hydra wraps the constructor's error: surface its message
        cause = " ".join(str(exc.__cause__ or exc).split())
        raise MethodConfigError(f"config error: method: could not build {target}: {cause}") from exc
    if not isinstance(method, SparsityMethod):
        raise MethodConfigError(
            f"config error: method._target_={target!r} is not a qsparse.methods.SparsityMethod"
        )
    return method


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux
        return 0.0


class CostMeter:
    """Context manager: wall seconds and peak memory (MiB) of the block.

    Peak memory: on CUDA the peak allocated bytes above the start; otherwise the peak resident
    set size above the start, sampled every 5 ms by a thread (a lower bound).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.cuda = torch.cuda.is_available() and (device is None or "cuda" in str(device))
        self.seconds = 0.0
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CostMeter:
        if self.cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._base = _rss_mib()
            self._peak = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _rss_mib())

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._start
        if self.cuda:
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_mib = max(self._peak, _rss_mib()) - self._base
