"""``qsparse-train -m``: every job's config is checked before the first job starts.

:class:`SweepCheck` is a Hydra callback (``hydra.callbacks.sweep_check`` in
``conf/train.yaml``). When a multirun starts it expands the sweep as Hydra's basic sweeper does,
composes each job's config and runs :func:`qsparse.training.run.check_config` on it, printing
one line per job that cannot run. The sweep then runs as usual: a bad job fails at its own
check (before it writes anything) and the good jobs train. Hydra counts each job's status in
:meth:`SweepCheck.on_job_end`; ``qsparse-train`` exits with the number of failed jobs.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from qsparse.errors import UserError


class SweepJobError(CompactHydraException):
    """A sweep job stopped by a user error; Hydra prints its message without a traceback."""


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The override list of every job of the multirun ``config``, in Hydra's job order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader()
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    params += list(config.hydra.overrides.task)
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(params)
    batches = BasicSweeper.split_arguments(overrides, None)
    return [list(job) for batch in batches for job in batch]


class SweepCheck(Callback):
    """Check the config of every job of a sweep when it starts; count the failed jobs."""

    #: ``(job number, overrides, status)`` of each job that ended, in order
    results: ClassVar[list[tuple[int, str, JobStatus]]] = []
    #: set when a multirun started in this process
    multirun: ClassVar[bool] = False
    #: job number -> the overrides that tell it from the other jobs (``sparsity.ratio=0.3``)
    labels: ClassVar[dict[int, str]] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        from qsparse.training.run import check_config

        SweepCheck.results = []
        SweepCheck.multirun = True
        if config.hydra.sweeper.get("_target_", "").rsplit(".", 1)[-1] != "BasicSweeper":
            return  # another sweeper chooses its jobs as it goes
        loader = GlobalHydra.instance().config_loader()
        jobs = sweep_jobs(config)
        common = set.intersection(*(set(job) for job in jobs)) if len(jobs) > 1 else set()
        SweepCheck.labels = {
            num: ",".join(o for o in job if o not in common) or "no overrides"
            for num, job in enumerate(jobs)
        }
        for num, job in enumerate(jobs):
            job_cfg = loader.load_sweep_config(config, job)
            with open_dict(job_cfg):
                del job_cfg["hydra"]
            try:
                check_config(job_cfg)
            except UserError as exc:
                message = " ".join(str(exc).split())
                print(
                    f"qsparse-train: job #{num} ({SweepCheck.labels[num]}) will fail: {message}",
                    file=sys.stderr,
                )

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        num = int(config.hydra.job.get("num") or 0)
        SweepCheck.results.append((num, self.label(num), job_return.status))

    @classmethod
    def label(cls, num: int) -> str:
        """The overrides of job ``num`` that tell it from the other jobs of the sweep."""
        return cls.labels.get(num, "")

    @classmethod
    def failed(cls) -> list[tuple[int, str]]:
        """``(job number, overrides)`` of each failed job of the last sweep."""
        return [(n, o) for n, o, s in cls.results if s == JobStatus.FAILED]
