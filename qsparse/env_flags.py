"""On/off settings read from the environment at import: ``1`` on, ``0`` off, unset the default.

A module reads such a setting once, at import, with :func:`flag_at_import`, which records the
variable and its default in :data:`ENV_FLAGS` and never fails (an unknown value such as
``false`` gives the default, so that ``import qsparse`` still works). The commands call
:func:`check_env_flags` before they build or train a model, so that an unknown value stops them
with one line naming the variable instead of silently meaning on or off.

This module imports nothing of qsparse but :mod:`qsparse.errors` (which imports only the
standard library), so that :mod:`qsparse.kernels` can import it without a cycle.
"""

from __future__ import annotations

import os

from qsparse.errors import UserError

__all__ = ["ENV_FLAGS", "check_env_flags", "flag_at_import", "flag_from_env"]

#: the on/off settings read so far with :func:`flag_at_import`: variable name -> default
ENV_FLAGS: dict[str, bool] = {}


def flag_from_env(name: str, default: bool) -> bool:
    """The on/off setting ``name`` in the environment: ``1`` True, ``0`` False, unset
    ``default``; any other value is a :class:`~qsparse.errors.UserError` (a ValueError) naming
    the variable, its value and the forms it takes."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value not in ("0", "1"):
        raise UserError(f"{name}={value!r}: use 1 (on) or 0 (off), or leave it unset")
    return value == "1"


def flag_at_import(name: str, default: bool) -> bool:
    """:func:`flag_from_env`, but ``default`` for an unknown value (so that ``import`` works;
    :func:`check_env_flags` reports the value later); records ``name`` and ``default`` in
    :data:`ENV_FLAGS`."""
    ENV_FLAGS[name] = default
    try:
        return flag_from_env(name, default)
    except UserError:
        return default


def check_env_flags() -> None:
    """Raise the :class:`~qsparse.errors.UserError` of :func:`flag_from_env` for the first
    setting in :data:`ENV_FLAGS` whose value in the environment is neither ``1`` nor ``0``."""
    for name, default in ENV_FLAGS.items():
        flag_from_env(name, default)
