"""Run a wandb sweep file offline: its grid becomes one Hydra multirun of ``qsparse-train``.

A wandb sweep file (``method``, ``parameters``, ``command``) drives ``qsparse-train`` online
through ``wandb agent``: its ``command`` ends in ``${args_no_hyphens}``, so each parameter
arrives as a Hydra override ``key=value``. Without the wandb server there is no sweep
controller; ``qsparse-sweep FILE`` then runs the same grid as ``qsparse-train -m`` with
``sweep_name=<name>`` (the product of every ``values`` list, each ``value`` fixed), so the jobs
land in ``multirun/<name>/<n>/`` with the checks, grouping and tags of any qsparse sweep and
``qsparse-report`` reads them. Only ``method: grid`` has an offline meaning (``random`` and
``bayes`` need the controller's state); distributions (``min``/``max``) are refused for the
same reason.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError

__all__ = ["SweepFileError", "hydra_overrides", "load_sweep", "main"]

_PLAIN = re.compile(r"^[A-Za-z0-9_./:+-]+$")


class SweepFileError(UserError):
    """A wandb sweep file qsparse cannot run (the message names the key and the fix)."""


def load_sweep(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a wandb sweep file; return it as a dict."""
    path = Path(path)
    if not path.is_file():
        shipped = Path(__file__).with_name(f"{path.stem}.yaml")
        if not shipped.is_file():
            raise SweepFileError(f"{path}: no such sweep file")
        path = shipped
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SweepFileError(f"{path}: not a YAML file ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("parameters"), Mapping):
        raise SweepFileError(f"{path}: a wandb sweep file needs a 'parameters' mapping")
    command = spec.get("command")
    if command is not None and "${args_no_hyphens}" not in command:
        raise SweepFileError(
            f"{path}: command must pass the parameters as Hydra overrides: end it with "
            "${args_no_hyphens} (wandb's key=value form)"
        )
    return dict(spec)


def _hydra_value(value: Any) -> str:
    """One value as Hydra's override grammar reads it back (quoted when needed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = str(value)
    if isinstance(value, (int, float)) or _PLAIN.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def hydra_overrides(spec: Mapping[str, Any], source: str = "sweep") -> list[str]:
    """The ``qsparse-train -m`` overrides of a grid sweep: ``key=v1,v2`` per ``values``
    list, ``key=v`` per ``value``, in file order."""
    method = spec.get("method", "grid")
    if method != "grid":
        raise SweepFileError(
            f"{source}: method: {method} needs the wandb sweep controller (wandb sweep FILE, "
            "then wandb agent); offline, qsparse-sweep runs method: grid"
        )
    out = []
    for key, param in spec["parameters"].items():
        if not isinstance(param, Mapping):
            raise SweepFileError(f"{source}: parameters.{key} must be a mapping (value/values)")
        if "values" in param:
            values = param["values"]
            if not isinstance(values, list) or not values:
                raise SweepFileError(f"{source}: parameters.{key}.values must be a non-empty list")
            out.append(f"{key}=" + ",".join(_hydra_value(v) for v in values))
        elif "value" in param:
            out.append(f"{key}={_hydra_value(param['value'])}")
        else:
            raise SweepFileError(
                f"{source}: parameters.{key} has {sorted(param)}: a grid takes 'value' or "
                "'values' (distributions need the wandb controller)"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qsparse-sweep", description=__doc__.splitlines()[0])
    p.add_argument("file", help="a wandb sweep YAML (or the name of one in qsparse/sweeps/)")
    p.add_argument("--name", default=None, help="sweep_name (default: the file's name key)")
    p.add_argument("--dry-run", action="store_true", help="print the qsparse-train command")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = p.parse_intermixed_args(argv)
    try:
        spec = load_sweep(args.file)
        overrides = hydra_overrides(spec, args.file)
    except UserError as exc:
        print(f"qsparse-sweep: {exc}", file=sys.stderr)
        return 2
    name = args.name or spec.get("name") or Path(args.file).stem
    cmd = [sys.executable, "-m", "qsparse.cli.train", "-m", *overrides, *args.overrides]
    cmd.append(f"sweep_name={name}")
    if args.dry_run:
        print(" ".join(cmd[1:]))
        return 0
    return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
