"""Gather the jobs of a sweep directory into records: settings, results, and what went wrong.

A Hydra multirun (``qsparse-train -m ...`` or a ``recipe=scaling/...`` grid) lays out::

    multirun/<sweep_name>/
      multirun.yaml          the sweep's config: hydra.sweeper.params + command-line overrides
      <n>/.hydra/            job n's composed config and its overrides.yaml
      <n>/config.yaml        resolved config as trained (written when training starts)
      <n>/summary.json       the run summary (written when training ends)

:func:`read_sweep` returns one :class:`SweepJob` per job: ``ok`` when its ``summary.json``
has a ``val_loss``, ``failed`` when the job started but left no usable summary, ``missing``
when ``multirun.yaml`` says the job should exist but its directory does not (the sweep
stopped or is still running). Nothing is dropped: the report names every job that is not
``ok``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

#: Precision labels: full-precision weights, or BitNet b1.58 ternary weights.
FULL_PRECISION = "full"
TERNARY = "1.58-bit"


@dataclass
class SweepJob:
    """One grid point. ``sparsity`` is the law's S (see :func:`law_sparsity`)."""

    name: str
    status: str  # ok | failed | missing
    overrides: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def precision(self) -> str:
        return TERNARY if self.settings.get("weights") == "ternary" else FULL_PRECISION

    def row(self) -> dict[str, Any]:
        """Flat record for ``runs.csv`` and the wandb table."""
        s = self.summary
        return {
            "job": self.name,
            "status": self.status,
            "precision": self.precision,
            **self.settings,
            "sparsity_overall": s.get("sparsity_overall"),
            "params_total": s.get("params_total"),
            "params_activated": s.get("params_activated"),
            "val_loss": s.get("val_loss"),
            "step": s.get("step"),
            "train_time_s": s.get("train_time_s"),
            "overrides": " ".join(self.overrides),
            "error": self.error,
        }


@dataclass
class Sweep:
    """All jobs of one sweep directory, in job order, and its name (the wandb group)."""

    path: Path
    name: str
    jobs: list[SweepJob]
    project: str = "qsparse"
    expected: int | None = None  # jobs multirun.yaml describes (None: unknown)

    @property
    def ok(self) -> list[SweepJob]:
        return [j for j in self.jobs if j.status == "ok"]

    @property
    def not_ok(self) -> list[SweepJob]:
        return [j for j in self.jobs if j.status != "ok"]


def _settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The grid coordinates of one job from its (resolved) config."""
    model = cfg.get("model") or {}
    sparsity = cfg.get("sparsity") or {}
    quant = cfg.get("quant") or {}
    pattern = sparsity.get("pattern", "none")
    ratio = float(sparsity.get("ratio") or 0.0) if pattern != "none" else 0.0
    return {
        "hidden_size": model.get("hidden_size"),
        "num_layers": model.get("num_hidden_layers"),
        "preset": model.get("preset"),
        "pattern": pattern,
        "ratio": ratio,
        "ste": sparsity.get("ste"),
        "weights": quant.get("weights", "none"),
        "act_bits": quant.get("act_bits"),
    }


def _load_config(job_dir: Path) -> dict[str, Any]:
    """The resolved ``config.yaml`` if training got that far, else Hydra's composed config
    (interpolations left as written when they cannot be resolved outside the job)."""
    for path in (job_dir / "config.yaml", job_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            conf = OmegaConf.load(path)
            try:
                return OmegaConf.to_container(conf, resolve=True)  # type: ignore[return-value]
            except Exception:
                return OmegaConf.to_container(conf, resolve=False)  # type: ignore[return-value]
    return {}


def _last_error(job_dir: Path) -> str:
    """Why a job failed: the last line of the ``error.txt`` traceback ``qsparse-train``
    writes, else the last error-looking line of the job's Hydra log, else ``""``."""
    for log in [job_dir / "error.txt", *sorted(job_dir.glob("*.log"))]:
        if not log.is_file():
            continue
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        for ln in reversed(lines):
            if "Error" in ln or "Exception" in ln or "error" in ln:
                return ln[-300:]
    return ""


def read_job(job_dir: Path) -> SweepJob:
    """One job directory into a :class:`SweepJob` (``ok`` or ``failed``)."""
    overrides: list[str] = []
    ov = job_dir / ".hydra" / "overrides.yaml"
    if ov.is_file():
        overrides = [str(x) for x in (OmegaConf.to_container(OmegaConf.load(ov)) or [])]
    cfg = _load_config(job_dir)
    job = SweepJob(name=job_dir.name, status="ok", overrides=overrides, settings=_settings(cfg))
    summary_path = job_dir / "summary.json"
    if not summary_path.is_file():
        job.status = "failed"
        job.error = _last_error(job_dir) or "no summary.json (the job failed or did not finish)"
        return job
    try:
        job.summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        job.status, job.error = "failed", f"unreadable summary.json: {exc}"
        return job
    loss = job.summary.get("val_loss")
    if loss is None or not math.isfinite(float(loss)):
        job.status, job.error = "failed", f"summary.json has no finite val_loss ({loss!r})"
    elif not job.summary.get("params_total"):
        job.status, job.error = "failed", "summary.json has no params_total"
    return job


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The override list of every job ``multirun.yaml`` describes, in Hydra's job order
    (``hydra.sweeper.params`` first, then the command line, expanded as the basic sweeper
    does); ``None`` when there is no ``multirun.yaml`` or the sweep cannot be expanded."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        conf = OmegaConf.load(path)
        node = conf.hydra.sweeper.get("params")
        params = OmegaConf.to_container(node) if node is not None else {}
        task = [str(x) for x in OmegaConf.to_container(conf.hydra.overrides.task) or []]
        strings = [f"{k}={v}" for k, v in params.items()] + task
        parsed = OverridesParser.create().parse_overrides(strings)
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
        return [list(job) for batch in batches for job in batch]
    except Exception:
        return None


def _sweep_meta(root: Path, jobs: list[SweepJob]) -> tuple[str, str]:
    """(wandb group, project) of the sweep: the jobs' ``logger.wandb.group`` or their
    ``sweep_name`` (what :func:`qsparse.training.run.train` uses), else the folder name."""
    sources: list[dict[str, Any]] = []
    if (root / "multirun.yaml").is_file():
        conf = OmegaConf.load(root / "multirun.yaml")
        sources.append(OmegaConf.to_container(conf, resolve=False))  # type: ignore[arg-type]
    sources += [_load_config(root / j.name) for j in jobs if (root / j.name).is_dir()]
    for cfg in sources:
        wb = (cfg.get("logger") or {}).get("wandb") or {}
        group = wb.get("group") or cfg.get("sweep_name")
        if isinstance(group, str) and "${" not in group:
            return group, str(wb.get("project") or "qsparse")
    return root.name, "qsparse"


def read_sweep(sweep_dir: str | Path) -> Sweep:
    """Every job of a sweep directory (see the module docstring). Raises
    ``FileNotFoundError`` when the directory holds no job and no ``multirun.yaml``."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    dirs = [
        d
        for d in root.iterdir()
        if d.is_dir()
        and (
            (d / ".hydra").is_dir()
            or (d / "summary.json").is_file()
            or (d / "config.yaml").is_file()
        )
    ]
    dirs.sort(key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))
    jobs = [read_job(d) for d in dirs]
    expected = expected_jobs(root)
    if not jobs and expected is None:
        raise FileNotFoundError(
            f"{root} holds no job directories (with summary.json or .hydra/) and no multirun.yaml"
        )
    if expected is not None:
        present = {j.name for j in jobs}
        for i, overrides in enumerate(expected):
            if str(i) not in present:
                jobs.append(
                    SweepJob(
                        name=str(i),
                        status="missing",
                        overrides=overrides,
                        error="no job directory (the sweep stopped before it, or is running)",
                    )
                )
        jobs.sort(key=lambda j: (0, int(j.name), "") if j.name.isdigit() else (1, 0, j.name))
    group, project = _sweep_meta(root, jobs)
    return Sweep(
        path=root,
        name=group,
        jobs=jobs,
        project=project,
        expected=None if expected is None else len(expected),
    )


def law_sparsity(job: SweepJob, mode: str = "overall") -> float:
    """The S of ``L(N, S)`` for one finished job.

    ``overall`` (default): ``S = 1 - params_activated / params_total``, the measured overall
    sparsity, so ``(1 - S) N`` is exactly the activated parameters (the paper's convention for
    activated parameters; it counts the zeros ReLU² leaves too). ``ratio``: the configured
    top-k ratio (``sparsity.ratio``; 0 for dense).
    """
    if mode == "ratio":
        return float(job.settings.get("ratio") or 0.0)
    if mode != "overall":
        raise ValueError(f"sparsity mode {mode!r} must be 'overall' or 'ratio'")
    total = float(job.summary["params_total"])
    activated = float(job.summary.get("params_activated") or total)
    return max(0.0, 1.0 - activated / total)
