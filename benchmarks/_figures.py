"""The machine-readable figure lines benchmark scripts print and ``benchmarks/run_all.py`` reads.

A script reports each figure it measured with :func:`emit`, one line on stdout::

    FIGURE <key> <value> <unit>

``key`` has no spaces and is unique within one run of the script (``train_step.eager.qsparse``,
``sparse_gemv.b1_S0.6.incl``); ``unit`` is one of ``x`` (ratio), ``us``, ``ms``, ``tokens/s``,
``%``, ``GiB``. The lines sit beside the script's human-readable output, so running a script
by hand still prints them; :func:`parse` collects them from captured output. No dependencies.
"""

from __future__ import annotations

import math

PREFIX = "FIGURE"


def emit(key: str, value: float, unit: str = "x") -> None:
    """Print one ``FIGURE key value unit`` line (flushed, so a crash later keeps it)."""
    if not key or any(c.isspace() for c in key):
        raise ValueError(f"figure key {key!r} must be non-empty without spaces")
    if not unit or any(c.isspace() for c in unit):
        raise ValueError(f"figure unit {unit!r} must be non-empty without spaces")
    print(f"{PREFIX} {key} {float(value):.6g} {unit}", flush=True)


def slug(label: str) -> str:
    """``label`` as a key part: runs of whitespace become ``_`` (``"bn32 w4 st3"`` ->
    ``"bn32_w4_st3"``)."""
    return "_".join(label.split())


def parse(text: str) -> dict[str, dict[str, float | str]]:
    """``{key: {"value": float, "unit": str}}`` from every ``FIGURE`` line of ``text``.

    Raises ``ValueError`` on a malformed line or a key reported twice (a script bug that would
    otherwise make a table show whichever value came last)."""
    out: dict[str, dict[str, float | str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0] != PREFIX:
            continue
        if len(parts) != 4:
            raise ValueError(f"line {n}: expected 'FIGURE key value unit', got {line!r}")
        _, key, value, unit = parts
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"line {n}: figure {key} is {value}")
        if key in out:
            raise ValueError(f"line {n}: figure {key} reported twice")
        out[key] = {"value": number, "unit": unit}
    return out
