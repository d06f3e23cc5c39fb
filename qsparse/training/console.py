"""What a training run prints: its progress bar, a few lines of its own, its summary table.

:func:`say` prints one of the run's own status lines (rank zero, stdout, in order with the
progress bar and the summary table). :func:`quiet_libraries`, which the ``qsparse-train``
command calls before composing the config (the library function :func:`qsparse.training.train`
leaves the libraries as they are), keeps the libraries' chatter from landing between those
lines: Lightning's INFO records (device availability, "💡 Tip" adverts, "`Trainer.fit`
stopped") and the ``LeafSpec`` FutureWarning that torch 2.13 raises inside Lightning 2.6. Lightning's warnings (WARNING and up) still print. The driver writes its
transformers export inside :func:`no_transformers_progress_bars`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities import rank_zero_only

#: loggers whose INFO records are library chatter during a qsparse-train run
CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric")


@rank_zero_only
def say(message: str) -> None:
    """Print one status line of the run (rank zero only)."""
    print(message, flush=True)


def quiet_libraries() -> None:
    """Raise the chatty libraries' log level to WARNING and drop the known deprecation
    warning that is not ours to fix (see the module docstring)."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )


@contextmanager
def no_transformers_progress_bars() -> Iterator[None]:
    """transformers' progress bars off inside the block (the export of a run, which prints
    its own line), as they were after it."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
