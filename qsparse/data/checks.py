"""Argument checks every DataModule shares; each error names the argument and the fix."""

from __future__ import annotations

__all__ = ["check_loader_args", "check_positive_or_none", "check_seeds", "check_source"]


def check_source(
    corpus: str | None,
    data_files: object,
    default_corpus: str,
    seq_len: object,
    val_fraction: float,
    purpose: str,
) -> str | None:
    """Validate the data-source arguments; return the corpus to use.

    Exactly one of ``corpus`` / ``data_files`` (neither: ``default_corpus``); ``seq_len`` an
    int >= 2; ``val_fraction`` in [0, 1).
    """
    if corpus is not None and data_files is not None:
        raise ValueError(
            f"give either corpus ({corpus!r}) or data_files, not both; set corpus=null "
            f"to {purpose} on your own files"
        )
    if corpus is None and data_files is None:
        corpus = default_corpus
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    return corpus


def check_loader_args(batch_size: object, num_workers: object) -> None:
    """``batch_size`` a positive int, ``num_workers`` an int >= 0."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")


def check_seeds(seed: object, shuffle_seed: object) -> None:
    """``seed`` an int, ``shuffle_seed`` an int or ``None`` (bools are refused)."""
    for name, value, optional in (("seed", seed, False), ("shuffle_seed", shuffle_seed, True)):
        if isinstance(value, bool) or not (isinstance(value, int) or (optional and value is None)):
            raise ValueError(f"data.{name}={value!r} must be an integer")


def check_positive_or_none(name: str, value: object) -> None:
    """``value`` is ``None`` or an int >= 1."""
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 or null, got {value!r}")
