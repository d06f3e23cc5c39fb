"""``qsparse-train`` (or ``python -m qsparse.cli.train`` from a source tree): the training
command, the Hydra entry point around the library function :func:`qsparse.training.train`.

    qsparse-train recipe=from_scratch/qsparse_tiny run_name=demo
    qsparse-train recipe=from_scratch/qsparse model=700M trainer=ddp
    qsparse-train -m recipe=from_scratch/qsparse_tiny sparsity.ratio=0.3,0.6 sweep_name=s1
    qsparse-train recipe=from_scratch/qsparse_tiny run_name=demo resume=true

The config directory ``qsparse/conf`` ships inside the package, so installed users get the
same groups and recipes (``--info defaults`` lists what a command composes).

A user's mistake (a bad config value, an unusable data file or checkpoint, a run directory
that holds a run, an on/off ``QSPARSE_*`` variable such as ``QSPARSE_KERNELS`` set to neither
1 nor 0) prints one line ``qsparse-train: <what is wrong and how to fix it>`` and exits with
status 2, before anything is written; ``HYDRA_FULL_ERROR=1`` shows the traceback.
The libraries' INFO chatter is kept out of the output (:mod:`qsparse.training.console`).
A sweep (``-m``) checks every job's config first (:mod:`qsparse.cli.sweep`), runs the jobs
that can run and exits with the number of jobs that failed.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import qsparse.kernels  # noqa: F401  (registers QSPARSE_KERNELS in qsparse.env_flags)
from qsparse.cli.sweep import SweepCheck, SweepJobError
from qsparse.env_flags import check_env_flags
from qsparse.errors import UserError, full_traceback_requested, report
from qsparse.training.config import ConfigError  # noqa: F401  (registers train_schema)
from qsparse.training.console import quiet_libraries


def _job_label() -> str:
    num = int(HydraConfig.get().job.get("num") or 0)
    return f"job #{num} ({SweepCheck.label(num)})"


def _close_log_files(folder: Path) -> None:
    """Detach the job's log file handlers in ``folder`` (Hydra's ``<job>.log``, opened lazily):
    the folder is about to be removed, so a later record must not recreate it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
            root.removeHandler(handler)
            handler.close()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from qsparse.training import train
    from qsparse.training.rundir import remove_if_empty

    try:
        train(cfg)
    except UserError as exc:  # a user's mistake: the message, not a traceback
        # the run failed its checks before writing anything: drop the folders Hydra made
        hc = HydraConfig.get()
        _close_log_files(Path(hc.runtime.output_dir))
        made = hc.runtime.output_dir if SweepCheck.multirun else hc.run.dir  # as written
        remove_if_empty(Path(made), Path(os.getcwd()))
        if full_traceback_requested():
            raise
        if SweepCheck.multirun:  # let Hydra record the failure and run the other jobs
            raise SweepJobError(f"{_job_label()}: {' '.join(str(exc).split())}") from exc
        raise SystemExit(report("qsparse-train", exc)) from None
    except Exception as exc:  # a failure while running: keep why, for qsparse-report
        _record_error(exc)
        raise


def _record_error(exc: BaseException) -> None:
    """Write the traceback to ``<job output dir>/error.txt`` so that ``qsparse-report`` can
    say why a sweep job failed (the multirun itself only stops at the end)."""
    import traceback

    try:
        out = Path(HydraConfig.get().runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").write_text("".join(traceback.format_exception(exc)))
    except Exception:  # never hide the original error
        pass


def _check_environment() -> None:
    """Exit with one line (status 2) when an on/off ``QSPARSE_*`` setting in the environment is
    neither 1 nor 0 (:func:`qsparse.env_flags.check_env_flags`), before Hydra makes a folder."""
    try:
        check_env_flags()
    except UserError as exc:
        if full_traceback_requested():
            raise
        raise SystemExit(report("qsparse-train", exc)) from None


def main() -> None:
    """Console-script entry (``qsparse-train``). A user error prints one line and exits with
    status 2 (a bad on/off ``QSPARSE_*`` variable before Hydra composes anything); a misspelled
    key is reported by Hydra while composing (status 1); a sweep exits with the number of its
    failed jobs; other failures keep their traceback."""
    _check_environment()
    SweepCheck.multirun = False
    quiet_libraries()
    try:
        _main()
    except SystemExit as exit_:
        failed = SweepCheck.failed() if SweepCheck.multirun else []
        if not failed:
            raise
        total = len(SweepCheck.results)
        jobs = ", ".join(f"#{n} ({o})" for n, o in failed)
        print(f"qsparse-train: {len(failed)} of {total} sweep jobs failed: {jobs}", file=sys.stderr)
        raise SystemExit(min(len(failed), 125)) from exit_


if __name__ == "__main__":
    main()
