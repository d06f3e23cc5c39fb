"""Re-run the benchmarks behind the figures in README.md and benchmarks/README.md, keep their
results as JSON, and regenerate the results tables from that JSON.

    PYTHONPATH=$PWD python3 benchmarks/run_all.py run --group core --budget 500    # on a GPU
    PYTHONPATH=$PWD python3 benchmarks/run_all.py run [--only ID,...] [--repeat N]
    PYTHONPATH=$PWD python3 benchmarks/run_all.py tables [--check]                  # anywhere
    python3 benchmarks/run_all.py manifest .gpu/manifest   # here; QSPARSE_MANIFEST=... there
    python3 benchmarks/run_all.py list                     # groups, ids, GPU-time estimates

``run`` executes the benchmarks of :data:`benchmarks.registry.REGISTRY` in the groups named by
``--group`` (default ``all``; one group fits one device call) or those named by ``--only``, each
as a subprocess, collects the ``FIGURE`` lines it prints (:mod:`benchmarks._figures`) and writes
``benchmarks/results/<id>.json`` with the git commit, whether the tree was dirty, the device,
the UTC date, the exact command, the package versions and the figures (the median of
``repeat`` runs, with their min and max) and the wall time of each run. ``--budget SECONDS``
starts no benchmark whose estimate no longer fits in what is left of it and cuts a run off at
the end of it (figures printed before are kept). It then regenerates the tables. ``tables``
only rewrites the text between ``<!-- run_all:<table> begin -->`` and ``<!-- run_all:<table>
end -->`` in benchmarks/README.md and README.md (its ``summary`` block: the rows the README
quotes) from the JSON files; ``--check`` fails when that text is stale.

Every row says the commit its figures were measured at; a row whose benchmark has no result
yet says so instead of showing a number. A goal is judged on the median; when the margin to
it is inside the run-to-run spread (the min-max range of the goal figure, or of the same-run
baseline it is a ratio to) the verdict says so, and one run cannot tell: it says that too.

Adding a benchmark: make its script print ``FIGURE`` lines with
:func:`benchmarks._figures.emit`, and append a :class:`~benchmarks.registry.Bench` (script,
arguments, the table rows it feeds, its group and estimate) to the registry.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python3 benchmarks/run_all.py` without PYTHONPATH
    sys.path.insert(0, str(ROOT))

from benchmarks._figures import parse  # noqa: E402
from benchmarks.registry import (  # noqa: E402
    ALL,
    GROUPS,
    REGISTRY,
    Bench,
    Goal,
    Row,
    estimate,
    in_groups,
)

__all__ = ["REGISTRY", "Bench", "Goal", "Row", "main"]

RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
TOP_README = ROOT / "README.md"
COLUMNS = ("figure", "value", "goal", "device", "commit", "date", "command")
#: README.md's summary block leaves the command to benchmarks/README.md
SUMMARY = "summary"
#: ``{key}`` or ``{key|format spec}`` in a row's value template
PLACEHOLDER = re.compile(r"\{([^{}|]+)(?:\|([^{}]*))?\}")


# ---------------------------------------------------------------------------------------------
# running


def _git(*args: str) -> str | None:
    """``git <args>`` in the repository, or ``None`` where there is no git or no ``.git``."""
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _generated(path: str) -> bool:
    """Files a benchmark run itself rewrites (results, generated tables): never "dirty"."""
    return path.startswith("benchmarks/results/") or path in ("benchmarks/README.md", "README.md")


def write_manifest(out: Path) -> str:
    """Write the manifest of this checkout's HEAD to ``out``: a ``commit <sha>`` line, then
    ``<blob sha1> <path>`` per tracked regular file (``git ls-tree -r HEAD``). Refuses a
    dirty tree (the manifest would not describe the files shipped). Returns the commit."""
    head, listing = _git("rev-parse", "HEAD"), _git("ls-tree", "-r", "HEAD")
    if head is None or listing is None:
        raise SystemExit(f"manifest: {ROOT} is not a git checkout")
    if _git_dirty():  # git's own state: a QSPARSE_MANIFEST in the environment does not count
        raise SystemExit("manifest: tracked files differ from HEAD; commit them first")
    lines = [f"commit {head}"]
    for row in listing.splitlines():
        meta, path = row.split("\t", 1)
        mode, kind, sha = meta.split()
        if kind == "blob" and mode != "120000":  # regular files (not links, submodules)
            lines.append(f"{sha} {path}")
    out.write_text("\n".join(lines) + "\n")
    return head


def _blob_sha(path: Path) -> str:
    """git's object id of the file's bytes (``git hash-object``)."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def manifest_state(manifest: Path) -> tuple[str, bool]:
    """``(commit, dirty)`` of this tree against a manifest (:func:`write_manifest`): dirty when
    a listed file other than the results and generated tables is missing or differs."""
    lines = manifest.read_text().splitlines()
    if not lines or not lines[0].startswith("commit "):
        raise ValueError(f"QSPARSE_MANIFEST={manifest}: not a run_all manifest (no commit line)")
    commit = lines[0].split()[1]
    for line in lines[1:]:
        sha, path = line.split(" ", 1)
        if _generated(path):
            continue
        file = ROOT / path
        if not file.is_file() or _blob_sha(file) != sha:
            return commit, True
    return commit, False


def commit_state() -> tuple[str, bool | None]:
    """``(commit, dirty)``. ``QSPARSE_MANIFEST``, when set, is a manifest written here by
    ``run_all.py manifest`` and shipped with the tree: the commit is its commit and the tree
    is checked file by file against it (a GPU machine's copy has no usable ``.git``).
    ``QSPARSE_COMMIT``, when set, names the commit measured: a tree shipped to a GPU machine
    may have no ``.git``, sit inside another checkout, or carry a stale ``.git`` whose HEAD is
    some other commit; the tree state is then unknown (``None``) unless git's HEAD is that
    same commit. Without either, git's HEAD of this checkout (dirty: tracked files other than
    the results and the generated tables differ from it), else ``"unknown"``."""
    manifest = os.environ.get("QSPARSE_MANIFEST", "").strip()
    if manifest:
        return manifest_state(Path(manifest))
    wanted = os.environ.get("QSPARSE_COMMIT", "").strip().lower()
    top = _git("rev-parse", "--show-toplevel")
    head = _git("rev-parse", "HEAD") if top and Path(top).resolve() == ROOT else None
    if head is None or (wanted and not head.startswith(wanted)):
        return wanted or "unknown", None
    return head, _git_dirty()


def _git_dirty() -> bool:
    """Tracked files other than the results and the generated tables differ from HEAD."""
    status = _git("status", "--porcelain", "--untracked-files=no") or ""
    return any(not _generated(line[3:].strip()) for line in status.splitlines())


def device_name() -> str:
    """``"cpu"``, the CUDA device's name, or ``"<n> x <name>"`` when ``n > 1`` are visible."""
    try:
        import torch
    except ImportError:
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    n, name = torch.cuda.device_count(), torch.cuda.get_device_name()
    return f"{n} x {name}" if n > 1 else name


def provenance() -> dict[str, object]:
    """Commit and tree state (:func:`commit_state`), device (:func:`device_name`), UTC date
    and versions, recorded with every result."""
    commit, dirty = commit_state()
    versions = {"python": sys.version.split()[0]}
    for package in ("torch", "triton"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    return {
        "commit": commit,
        "dirty": dirty,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(),
        "versions": versions,
    }


def summarize(runs: Sequence[dict[str, dict]]) -> dict[str, dict[str, object]]:
    """Per figure over the runs that reported it: median ``value``, ``min``, ``max``, ``n``."""
    keys = dict.fromkeys(k for r in runs for k in r)
    out: dict[str, dict[str, object]] = {}
    for key in keys:
        vals = [float(r[key]["value"]) for r in runs if key in r]
        unit = next(r[key]["unit"] for r in runs if key in r)
        out[key] = {
            "value": statistics.median(vals),
            "min": min(vals),
            "max": max(vals),
            "n": len(vals),
            "unit": unit,
        }
    return out


def _limit(timeout_s: int, deadline: float | None) -> float:
    """Seconds a subprocess may take: ``timeout_s``, or less where ``deadline`` (a
    :func:`time.monotonic` instant) comes first."""
    return timeout_s if deadline is None else min(timeout_s, deadline - time.monotonic())


def _missing_setup(bench: Bench) -> list[tuple[str, tuple[str, ...]]]:
    return [(path, cmd) for path, cmd in bench.setup if not Path(path).exists()]


def run_bench(
    bench: Bench,
    results_dir: Path,
    repeat: int | None = None,
    timeout_s: int | None = None,
    deadline: float | None = None,
) -> dict:
    """Run ``bench`` (``repeat`` overrides its run count, ``timeout_s`` its time limit per run;
    no run goes past ``deadline``, a :func:`time.monotonic` instant) and write ``<id>.json``
    with each run's wall time (``run_s``) and its setup's (``setup_s``). A run cut off by a
    limit keeps the figures it printed before (and the record says it timed out)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    record: dict[str, object] = {"bench": bench.id, "command": bench.command(), **provenance()}
    runs: list[dict] = []
    errors: list[str] = []
    run_s: list[float] = []
    start = time.monotonic()
    for path, cmd in _missing_setup(bench):
        argv = [sys.executable, str(ROOT / "benchmarks" / cmd[0]), *cmd[1:]]
        try:
            subprocess.run(argv, cwd=ROOT, env=env, check=True, timeout=_limit(3600, deadline))
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            errors.append(f"setup of {path} failed: {err}")
    if bench.setup:
        record["setup_s"] = round(time.monotonic() - start, 1)
    for i in range(0 if errors else (repeat or bench.repeat)):
        limit = _limit(timeout_s or bench.timeout_s, deadline)
        if limit <= 0:
            errors.append(f"run {i + 1} not started: the budget was spent")
            break
        started = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, str(ROOT / "benchmarks" / bench.script), *bench.args],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=limit,
            )
        except subprocess.TimeoutExpired as exc:
            run_s.append(round(time.monotonic() - started, 1))
            errors.append(f"timed out after {limit:.0f} s")
            out = exc.stdout or ""
            out = out.decode() if isinstance(out, bytes) else out
            sys.stdout.write(out)
            try:
                partial = parse(out)
            except ValueError:
                partial = {}
            if partial:
                runs.append(partial)
            continue
        run_s.append(round(time.monotonic() - started, 1))
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            errors.append(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
            continue
        try:
            runs.append(parse(proc.stdout))
        except ValueError as err:  # a malformed or repeated FIGURE line: the script's bug
            errors.append(f"unreadable figures: {err}")
    record.update(runs=runs, figures=summarize(runs), errors=errors, run_s=run_s)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{bench.id}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def needed_s(bench: Bench, repeat: int | None = None) -> int:
    """Estimated seconds ``bench`` needs now: its estimate scaled to ``repeat`` runs, plus its
    setup's when the setup has not run on this machine yet."""
    runs = bench.est_s * (repeat or bench.repeat) / bench.repeat
    return round(runs) + (bench.setup_s if _missing_setup(bench) else 0)


def run_benches(
    benches: Sequence[Bench],
    results_dir: Path,
    repeat: int | None = None,
    timeout_s: int | None = None,
    budget_s: float | None = None,
) -> list[str]:
    """Run ``benches`` in order; with ``budget_s`` skip each whose :func:`needed_s` no longer
    fits in what is left of the budget and cut runs off at its end. Returns the skipped ids."""
    start = time.monotonic()
    deadline = None if budget_s is None else start + budget_s
    skipped = []
    for bench in benches:
        need = needed_s(bench, repeat)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and need > left:
            print(
                f"-- {bench.id}: not started, needs about {need} s, {left:.0f} s of the budget left"
            )
            skipped.append(bench.id)
            continue
        print(f"== {bench.id} (about {need} s): {bench.command()}", flush=True)
        record = run_bench(bench, results_dir, repeat, timeout_s, deadline)
        took = sum(record["run_s"]) + record.get("setup_s", 0)
        print(f"== {bench.id}: {took:.0f} s (estimated {need} s)", flush=True)
        for err in record["errors"]:
            print(f"!! {bench.id}: {err}", file=sys.stderr)
    print(f"== {time.monotonic() - start:.0f} s in all; not started: {', '.join(skipped) or '-'}")
    return skipped


# ---------------------------------------------------------------------------------------------
# tables


def load_results(results_dir: Path) -> dict[str, dict]:
    """Bench id -> its result record, for every ``*.json`` in ``results_dir``."""
    out = {}
    for path in sorted(results_dir.glob("*.json")):
        record = json.loads(path.read_text())
        out[record["bench"]] = record
    return out


def fill(template: str, figures: dict[str, dict]) -> str | None:
    """``template`` with every placeholder replaced by its figure's value; ``None`` when one
    of them was not measured."""
    missing = [m.group(1) for m in PLACEHOLDER.finditer(template) if m.group(1) not in figures]
    if missing:
        return None
    return PLACEHOLDER.sub(
        lambda m: format(float(figures[m.group(1)]["value"]), m.group(2) or ".3g"), template
    )


def _spread(fig: dict) -> float:
    """Relative min-max range of one figure over its runs (0 for a single run)."""
    value = abs(float(fig["value"])) or 1.0
    return (float(fig["max"]) - float(fig["min"])) / value


def verdict(goal: Goal, figures: dict[str, dict]) -> str:
    """``"<= 1.1x: met"`` / ``"missed"``, qualified when the margin is inside the spread."""
    text = f"{goal.op} {goal.target:g}"
    fig = figures.get(goal.key)
    if fig is None:
        return text
    value = float(fig["value"])
    met = value <= goal.target if goal.op == "<=" else value >= goal.target
    margin = abs(value - goal.target) / goal.target
    spreads = [_spread(fig)]
    if goal.baseline in figures:
        spreads.append(_spread(figures[goal.baseline]))
    n = int(fig.get("n", 1))
    text += ": met" if met else ": MISSED"
    if n < 2:
        return text + " (1 run: spread unknown)"
    if margin <= max(spreads):
        return text + (
            f" (margin {100 * margin:.1f}% is inside the run-to-run spread, "
            f"{100 * max(spreads):.1f}% over {n} runs)"
        )
    return text + f" (margin {100 * margin:.1f}%, spread {100 * max(spreads):.1f}% over {n} runs)"


def _table_rows(table: str, registry: Sequence[Bench]) -> list[tuple[Bench, Row, str]]:
    """``(bench, row, label)`` of every row shown in ``table``: the rows naming it, or for
    :data:`SUMMARY` the rows with a ``summary`` label (README.md quotes them)."""
    out = []
    for bench in registry:
        if table == SUMMARY:
            out += [(bench, r, r.summary) for r in bench.rows if r.summary]
            continue
        rows = [r for r in bench.rows if r.table == table]
        if not rows and table == "exploration" and not bench.rows:
            rows = [Row(table, f"every figure of `{bench.script}`", "")]
        out += [(bench, r, r.figure) for r in rows]
    return out


def render(table: str, results: dict[str, dict], registry: Sequence[Bench] | None = None) -> str:
    """The Markdown table ``table`` from ``results`` (see :func:`load_results`) for the rows of
    ``registry`` (default :data:`REGISTRY`); the :data:`SUMMARY` table has no command column
    (benchmarks/README.md's tables give it)."""
    registry = REGISTRY if registry is None else registry
    columns = COLUMNS[:-1] if table == SUMMARY else COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for bench, row, label in _table_rows(table, registry):
        record = results.get(bench.id)
        if record is None:
            goal = verdict(row.goal, {}) if row.goal else "-"
            cells = [label, "not measured yet", goal, "-", "-", "-", f"`{bench.command()}`"]
        else:
            figures = record["figures"]
            if row.value:
                value = fill(row.value, figures)
            else:
                value = f"{len(figures)} figures in `benchmarks/results/{bench.id}.json`"
            if value is None:
                value = "failed" if record.get("errors") else "not reported"
            elif record.get("errors"):
                value += f" ({len(record['errors'])} failed run(s))"
            state = {True: "+dirty", False: "", None: " (tree state unknown)"}
            commit = str(record["commit"])[:10] + state[record.get("dirty")]
            cells = [
                label,
                value,
                verdict(row.goal, figures) if row.goal else "-",
                str(record["device"]),
                f"`{commit}`",
                str(record["date"])[:10],
                f"`{record['command']}`",
            ]
        lines.append("| " + " | ".join(cells[: len(columns)]) + " |")
    return "\n".join(lines)


def tables_in(text: str) -> list[str]:
    """Names of the ``<!-- run_all:<name> begin -->`` blocks in ``text``."""
    return re.findall(r"<!-- run_all:(\S+) begin -->", text)


def regenerate(text: str, results: dict[str, dict], registry: Sequence[Bench] | None = None) -> str:
    """``text`` with every ``run_all`` block replaced by its freshly rendered table."""
    for name in tables_in(text):
        begin, end = f"<!-- run_all:{name} begin -->", f"<!-- run_all:{name} end -->"
        if end not in text:
            raise ValueError(f"{begin} has no matching {end}")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        body = render(name, results, registry)
        text = f"{head}{begin}\n{body}\n{end}{tail}"
    return text


def update_readme(readme: Path, results_dir: Path, check: bool = False) -> bool:
    """Regenerate the tables of ``readme``; return whether it changed (``check``: only
    compare, write nothing)."""
    old = readme.read_text()
    new = regenerate(old, load_results(results_dir))
    if new != old and not check:
        readme.write_text(new)
    return new != old


def list_groups(results_dir: Path, registry: Sequence[Bench] | None = None) -> str:
    """Per group: its estimated GPU seconds, then per bench the runs, estimate, the wall time
    its last recorded run took (runs plus setup, from ``results_dir``) and its command."""
    registry = REGISTRY if registry is None else registry
    results = load_results(results_dir)
    lines = []
    for group in GROUPS:
        benches = [b for b in registry if b.group == group]
        if not benches:
            continue
        part = "in `all`" if group in ALL else "not in `all`"
        lines.append(f"{group}: about {estimate(benches)} s of H200 time ({part})")
        for b in benches:
            rec = results.get(b.id, {})
            took = sum(rec.get("run_s", [])) + rec.get("setup_s", 0)
            last = f"last {took:.0f} s" if "run_s" in rec else "last -"
            setup = f" + setup {b.setup_s} s" if b.setup else ""
            lines.append(
                f"  {b.id:30s} x{b.repeat} ~{b.est_s} s{setup}, {last}, {len(b.rows)} rows  "
                f"{b.command()}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run benchmarks (GPU), write results JSON, update tables")
    r.add_argument(
        "--group",
        default="all",
        help=f"comma list of groups: all (= {','.join(ALL)}) or any of {','.join(GROUPS)}",
    )
    r.add_argument("--only", default="", help="comma list of benchmark ids (instead of --group)")
    r.add_argument("--repeat", type=int, default=None, help="runs per benchmark (override)")
    r.add_argument(
        "--timeout",
        type=int,
        default=None,
        help="seconds per run (override; figures printed before the limit are kept)",
    )
    r.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run: start no benchmark whose estimate no longer fits, "
        "cut runs off at the end (figures printed before are kept)",
    )
    t = sub.add_parser("tables", help="regenerate the tables from the results JSON")
    t.add_argument("--check", action="store_true", help="exit 1 if the tables are stale")
    ls = sub.add_parser("list", help="print the groups, benchmarks and GPU-time estimates")
    m = sub.add_parser(
        "manifest",
        help="write HEAD's file manifest, to ship with a tree copied without .git and name "
        "in QSPARSE_MANIFEST there (its records then say the commit and whether it is clean)",
    )
    m.add_argument("out", type=Path)
    for p in (r, t, ls):
        p.add_argument("--results", type=Path, default=RESULTS)
    for p in (r, t):
        p.add_argument(
            "--readme",
            type=Path,
            action="append",
            help=f"file whose run_all blocks to regenerate (repeatable; default {README} "
            f"and {TOP_README})",
        )
    args = ap.parse_args(argv)
    if args.cmd == "manifest":
        print(f"{args.out}: manifest of {write_manifest(args.out)}")
        return 0
    if args.cmd == "list":
        print(list_groups(args.results))
        return 0
    if args.cmd == "run":
        ids = [i for i in args.only.split(",") if i]
        unknown = sorted(set(ids) - {b.id for b in REGISTRY})
        if unknown:
            ap.error(f"--only: unknown {unknown}; `run_all.py list` shows the ids")
        try:
            benches = (
                [b for b in REGISTRY if b.id in ids] if ids else in_groups(args.group.split(","))
            )
        except ValueError as err:
            ap.error(f"--group: {err}")
        run_benches(benches, args.results, args.repeat, args.timeout, args.budget)
    check = getattr(args, "check", False)
    stale = [
        readme
        for readme in args.readme or (README, TOP_README)
        if update_readme(readme, args.results, check=check)
    ]
    if check and stale:
        for readme in stale:
            print(f"{readme}: tables are stale; run `benchmarks/run_all.py tables`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
