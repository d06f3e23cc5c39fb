"""benchmarks/run_all.py on CPU: FIGURE lines, results JSON with provenance, tables regenerated
from fixture results (values, commit column, goal verdicts against the run-to-run spread), and
the committed benchmarks/README.md tables in step with the committed results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import _figures, registry, run_all  # noqa: E402
from benchmarks.run_all import Bench, Goal, Row  # noqa: E402

FIXTURE_README = """# Benchmarks

intro text kept as is

<!-- run_all:speed begin -->
| stale | table |
<!-- run_all:speed end -->

middle text

<!-- run_all:exploration begin -->
<!-- run_all:exploration end -->
tail
"""

REGISTRY = [
    Bench(
        "step",
        "step.py",
        ("--compile",),
        repeat=3,
        rows=(
            Row(
                "speed",
                "Q-Sparse step vs dense",
                "{step.qsparse|.2f}x ({step.qsparse.ms|.1f} ms)",
                Goal("step.qsparse", "<=", 1.10, "step.dense.ms"),
            ),
            Row("speed", "BitNet step", "{step.bitnet|.2f}x", Goal("step.bitnet", "<=", 1.25)),
            Row("speed", "never reported", "{step.nothing|.2f}x"),
        ),
    ),
    Bench("gemv", "gemv.py", rows=(Row("speed", "GEMV", "{gemv.b1|.2f}x", Goal("gemv.b1", ">=", 2.0)),)),
    Bench("unmeasured", "later.py", rows=(Row("speed", "a figure not run yet", "{x.y|.1f}"),)),
    Bench("explore", "explore.py"),
]  # fmt: skip


def _fig(value: float, lo: float, hi: float, n: int, unit: str = "x") -> dict:
    return {"value": value, "min": lo, "max": hi, "n": n, "unit": unit}


def _write_results(path: Path) -> None:
    common = {"device": "NVIDIA H200", "date": "2026-12-01T10:00:00Z", "dirty": False}
    records = [
        {
            "bench": "step",
            "command": "python3 benchmarks/step.py --compile",
            "commit": "0123456789abcdef0123456789abcdef01234567",
            "errors": [],
            "figures": {
                "step.qsparse": _fig(1.06, 1.05, 1.07, 3),  # margin 3.6% < dense spread 5%
                "step.qsparse.ms": _fig(91.8, 91.0, 92.5, 3, "ms"),
                "step.dense.ms": _fig(86.6, 84.0, 88.3, 3, "ms"),
                "step.bitnet": _fig(1.04, 1.03, 1.05, 3),  # margin 17%, spread 2%
            },
            **common,
        },
        {
            "bench": "gemv",
            "command": "python3 benchmarks/gemv.py",
            "commit": "fedcba9876543210fedcba9876543210fedcba98",
            "errors": ["exit 1: CUDA error"],
            "figures": {"gemv.b1": _fig(1.9, 1.9, 1.9, 1)},
            **{**common, "dirty": True},
        },
        {
            "bench": "explore",
            "command": "python3 benchmarks/explore.py",
            "commit": "aaaaaaaaaabbbbbbbbbbcccccccccc0000000000",
            "errors": [],
            "figures": {"e.a": _fig(1.0, 1.0, 1.0, 1, "us"), "e.b": _fig(2.0, 2.0, 2.0, 1, "us")},
            **common,
        },
    ]
    path.mkdir(parents=True, exist_ok=True)
    for r in records:
        (path / f"{r['bench']}.json").write_text(json.dumps(r))


def _rows(text: str, table: str) -> list[list[str]]:
    block = text.split(f"<!-- run_all:{table} begin -->")[1].split(f"<!-- run_all:{table} end")[0]
    lines = [line for line in block.strip().splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]


def test_figure_lines_round_trip_and_reject_bad_lines(capsys: pytest.CaptureFixture[str]) -> None:
    _figures.emit("a.b+c=d", 1.23456789)
    _figures.emit(f"t.{_figures.slug('bn32 w4  st3')}", 15.9, "us")
    out = capsys.readouterr().out
    assert _figures.parse("noise\n" + out + "RATIO x 1.0\n") == {
        "a.b+c=d": {"value": pytest.approx(1.23457), "unit": "x"},
        "t.bn32_w4_st3": {"value": 15.9, "unit": "us"},
    }
    with pytest.raises(ValueError, match="twice"):
        _figures.parse(out + out)
    with pytest.raises(ValueError, match="expected"):
        _figures.parse("FIGURE a 1")
    with pytest.raises(ValueError, match="spaces"):
        _figures.emit("a b", 1.0)


def test_emit_vs_dense_prints_row_ratio_line_and_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks._timing import emit_vs_dense

    emit_vs_dense("g.b1_S0.6", (1, 0.6), 30.0, {"incl": 15.0, "excl": 12.0})
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "| 1 | 0.6 | 30.0 | 15.0 | 12.0 | 2.00x | 2.50x |"
    assert lines[1] == "RATIO g.b1_S0.6 incl 2.00 excl 2.50"
    assert _figures.parse(out) == {
        "g.b1_S0.6.dense_us": {"value": 30.0, "unit": "us"},
        "g.b1_S0.6.incl_us": {"value": 15.0, "unit": "us"},
        "g.b1_S0.6.excl_us": {"value": 12.0, "unit": "us"},
        "g.b1_S0.6.incl": {"value": 2.0, "unit": "x"},
        "g.b1_S0.6.excl": {"value": 2.5, "unit": "x"},
    }


def test_tables_regenerated_from_results(tmp_path: Path) -> None:
    _write_results(tmp_path / "results")
    results = run_all.load_results(tmp_path / "results")
    text = run_all.regenerate(FIXTURE_README, results, REGISTRY)
    assert text.startswith("# Benchmarks\n\nintro text kept as is\n\n")
    assert "middle text" in text and text.endswith("tail\n") and "| stale |" not in text
    speed = _rows(text, "speed")
    assert [r[0] for r in speed] == [
        "Q-Sparse step vs dense",
        "BitNet step",
        "never reported",
        "GEMV",
        "a figure not run yet",
    ]
    qs, bitnet, never, gemv, later = speed
    assert qs[1] == "1.06x (91.8 ms)"
    assert qs[2].startswith("<= 1.1: met (margin 3.6% is inside the run-to-run spread, 5.0%")
    assert qs[3:] == [
        "NVIDIA H200",
        "`0123456789`",
        "2026-12-01",
        "`python3 benchmarks/step.py --compile`",
    ]
    assert (
        bitnet[1] == "1.04x" and bitnet[2] == "<= 1.25: met (margin 16.8%, spread 1.9% over 3 runs)"
    )
    assert never[1] == "not reported"
    assert (
        gemv[1] == "1.90x (1 failed run(s))" and gemv[2] == ">= 2: MISSED (1 run: spread unknown)"
    )
    assert gemv[4] == "`fedcba9876+dirty`"
    assert later[1:6] == ["not measured yet", "-", "-", "-", "-"]
    explore = _rows(text, "exploration")
    assert explore == [
        [
            "every figure of `explore.py`",
            "2 figures in `benchmarks/results/explore.json`",
            "-",
            "NVIDIA H200",
            "`aaaaaaaaaa`",
            "2026-12-01",
            "`python3 benchmarks/explore.py`",
        ]
    ]
    assert run_all.regenerate(text, results, REGISTRY) == text  # idempotent


def test_check_reports_stale_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_results(tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text(FIXTURE_README)
    monkeypatch.setattr(run_all, "REGISTRY", REGISTRY)
    argv = ["--results", str(tmp_path / "results"), "--readme", str(readme)]
    assert run_all.main(["tables", "--check", *argv]) == 1
    assert readme.read_text() == FIXTURE_README  # --check writes nothing
    assert run_all.main(["tables", *argv]) == 0
    assert run_all.main(["tables", "--check", *argv]) == 0
    assert "1.06x (91.8 ms)" in readme.read_text()


def test_run_records_provenance_and_median_of_repeats(tmp_path: Path) -> None:
    """A CPU stand-in for a GPU benchmark: each run prints a different figure; the record
    keeps every run, their median/min/max, and where and when they ran."""
    script = tmp_path / "fake_bench.py"
    counter = tmp_path / "count"
    script.write_text(
        "import pathlib, sys\n"
        "from benchmarks._figures import emit\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) if p.exists() else 0\n"
        "p.write_text(str(n + 1))\n"
        "emit('fake.ratio', [1.0, 3.0, 2.0, 9.0, 9.0][n])\n"
        "emit('fake.us', 10 + n, 'us')\n"
        "if n == 4: emit('fake.us', 0.0, 'us')\n"
        "sys.exit(1 if n == 3 else 0)\n"
    )
    bench = Bench("fake", str(script), ("--flag",), repeat=5)
    record = run_all.run_bench(bench, tmp_path / "results")
    saved = json.loads((tmp_path / "results" / "fake.json").read_text())
    assert saved == record
    assert saved["figures"]["fake.ratio"] == {
        "value": 2.0,
        "min": 1.0,
        "max": 3.0,
        "n": 3,
        "unit": "x",
    }
    assert saved["figures"]["fake.us"]["value"] == 11.0
    assert len(saved["runs"]) == 3  # the 4th run exited 1, the 5th reported fake.us twice
    assert saved["errors"][0].startswith("exit 1") and "twice" in saved["errors"][1]
    assert saved["command"].endswith("fake_bench.py --flag")
    assert len(saved["commit"]) == 40 and isinstance(saved["dirty"], bool)
    assert saved["device"] == "cpu" and saved["date"].endswith("Z")
    assert saved["versions"]["python"] == sys.version.split()[0]


def test_run_cut_off_by_its_time_limit_keeps_what_it_printed(tmp_path: Path) -> None:
    script = tmp_path / "slow_bench.py"
    script.write_text(
        "import time\n"
        "from benchmarks._figures import emit\n"
        "emit('slow.first', 1.5)\n"
        "time.sleep(60)\n"
        "emit('slow.second', 2.5)\n"
    )
    record = run_all.run_bench(Bench("slow", str(script)), tmp_path / "results", timeout_s=5)
    assert record["errors"] == ["timed out after 5 s"]
    assert set(record["figures"]) == {"slow.first"}
    assert record["figures"]["slow.first"]["value"] == 1.5


def test_registry_is_consistent_with_the_repository() -> None:
    """Every registered script exists, ids are unique, every table a row feeds has its marker
    block in benchmarks/README.md, and those blocks match the committed results."""
    ids = [b.id for b in run_all.REGISTRY]
    assert len(ids) == len(set(ids))
    for bench in run_all.REGISTRY:
        assert (run_all.ROOT / "benchmarks" / bench.script).is_file(), bench.script
        source = (run_all.ROOT / "benchmarks" / bench.script).read_text()
        assert "emit" in source, f"{bench.script} prints no FIGURE lines"
    readme = run_all.README.read_text()
    tables = set(run_all.tables_in(readme))
    assert {r.table for b in run_all.REGISTRY for r in b.rows} | {"exploration"} <= tables
    assert not run_all.update_readme(run_all.README, run_all.RESULTS, check=True), (
        "benchmarks/README.md tables are stale: run `python3 benchmarks/run_all.py tables`"
    )


def test_commit_of_a_tree_copied_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU machine that receives the tree without .git, the commit comes from
    QSPARSE_COMMIT and the table says the tree state is unknown."""
    monkeypatch.setattr(run_all, "_git", lambda *args: None)
    monkeypatch.delenv("QSPARSE_COMMIT", raising=False)
    assert run_all.commit_state() == ("unknown", None)
    monkeypatch.setenv("QSPARSE_COMMIT", "77bb3b8c0ffee")
    assert run_all.commit_state() == ("77bb3b8c0ffee", None)
    # a copy inside another checkout (a staging folder): git answers for the outer one
    outer = {("rev-parse", "--show-toplevel"): "/elsewhere", ("rev-parse", "HEAD"): "f" * 40}
    monkeypatch.setattr(run_all, "_git", lambda *args: outer.get(args))
    assert run_all.commit_state() == ("77bb3b8c0ffee", None)
    record = {
        "bench": "gemv",
        "command": "python3 benchmarks/gemv.py",
        "errors": [],
        "figures": {"gemv.b1": _fig(2.2, 2.2, 2.2, 1)},
        "device": "NVIDIA H200",
        "date": "2026-12-01T10:00:00Z",
        **dict(zip(("commit", "dirty"), run_all.commit_state(), strict=True)),
    }
    table = run_all.render("speed", {"gemv": record}, REGISTRY)
    assert "| `77bb3b8c0f (tree state unknown)` |" in table


def test_commit_env_wins_over_a_stale_git(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree shipped with a stale .git (HEAD d23a60c for a copy of 6f6ad64): QSPARSE_COMMIT is
    recorded, tree state unknown; when HEAD is that commit, git's dirty flag is kept."""
    head = "d23a60c" + "0" * 33
    answers = {
        ("rev-parse", "--show-toplevel"): str(run_all.ROOT),
        ("rev-parse", "HEAD"): head,
        ("status", "--porcelain", "--untracked-files=no"): " M qsparse/nn/linear.py",
    }
    monkeypatch.setattr(run_all, "_git", lambda *args: answers.get(args))
    monkeypatch.setenv("QSPARSE_COMMIT", "6f6ad64")
    assert run_all.commit_state() == ("6f6ad64", None)
    monkeypatch.setenv("QSPARSE_COMMIT", "D23A60C")  # the same commit, abbreviated
    assert run_all.commit_state() == (head, True)
    answers[("status", "--porcelain", "--untracked-files=no")] = (
        " M benchmarks/results/x.json\n M benchmarks/README.md\n M README.md"
    )
    assert run_all.commit_state() == (head, False)  # only results and generated tables
    monkeypatch.delenv("QSPARSE_COMMIT")
    assert run_all.commit_state() == (head, False)


@pytest.mark.parametrize(("count", "expected"), [(1, "NVIDIA H200"), (2, "2 x NVIDIA H200")])
def test_device_names_the_gpu_count(
    count: int, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert run_all.device_name() == expected
    assert run_all.provenance()["device"] == expected


def test_groups_fit_one_device_call_and_cover_the_registry() -> None:
    """Every bench is in a known group; each group of ``all`` is estimated to fit one 600 s
    device call; a setup step shared by several benches is counted once."""
    assert {b.group for b in run_all.REGISTRY} <= set(registry.GROUPS)
    assert set(registry.ALL) <= set(registry.GROUPS)
    assert registry.in_groups(["all"]) == [b for b in run_all.REGISTRY if b.group in registry.ALL]
    for group in registry.GROUPS:
        benches = registry.in_groups([group])
        assert benches, group
        if group in registry.ALL:
            assert registry.estimate(benches) <= 600, group
    memory = [b for b in run_all.REGISTRY if b.setup]
    assert len(memory) > 1
    assert registry.estimate(memory) == sum(b.est_s for b in memory) + memory[0].setup_s
    with pytest.raises(ValueError, match="unknown group"):
        registry.in_groups(["nope"])


def _quick_bench(tmp_path: Path, name: str, body: str, **kw) -> Bench:
    script = tmp_path / f"{name}.py"
    script.write_text("import time\nfrom benchmarks._figures import emit\n" + body)
    return Bench(name, str(script), **kw)


def test_budget_skips_what_no_longer_fits_and_cuts_the_last_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a budget: a bench whose estimate does not fit is not started (later ones that fit
    still are), a run is cut off at the end of the budget keeping what it printed, and every
    record carries its runs' wall times; the setup's estimate counts while it has not run."""
    marker = tmp_path / "made"
    fast = _quick_bench(tmp_path, "fast", "emit('fast.x', 2.0)\n", est_s=1)
    huge = _quick_bench(tmp_path, "huge", "emit('huge.x', 1.0)\n", est_s=10_000)
    setup = (str(marker), (str(tmp_path / "make.py"),))
    (tmp_path / "make.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    needs_setup = _quick_bench(
        tmp_path, "setup", "emit('setup.x', 3.0)\n", est_s=1, setup=(setup,), setup_s=3
    )
    slow = _quick_bench(tmp_path, "slow", "emit('slow.a', 1.5)\ntime.sleep(60)\n", est_s=1)
    assert run_all.needed_s(needs_setup) == 4 and run_all.needed_s(fast, repeat=3) == 3
    skipped = run_all.run_benches([fast, huge, needs_setup, slow], tmp_path / "r", budget_s=8)
    assert skipped == ["huge"]
    assert "huge: not started, needs about 10000 s" in capsys.readouterr().out
    results = run_all.load_results(tmp_path / "r")
    assert set(results) == {"fast", "setup", "slow"}
    assert results["fast"]["figures"]["fast.x"]["value"] == 2.0
    assert marker.exists() and results["setup"]["setup_s"] >= 0
    assert run_all.needed_s(needs_setup) == 1  # the checkpoint exists now
    slow_rec = results["slow"]
    assert slow_rec["errors"][0].startswith("timed out after")
    assert slow_rec["figures"]["slow.a"]["value"] == 1.5 and slow_rec["run_s"][0] < 30
    assert all(len(r["run_s"]) == 1 for r in results.values())


def test_top_readme_quotes_only_generated_rows_and_tables_are_current() -> None:
    """README.md's speed figures come from its generated summary block (the rows marked
    ``summary``), and `run_all.py tables --check` passes at HEAD for both READMEs."""
    top = run_all.TOP_README.read_text()
    assert run_all.tables_in(top) == [run_all.SUMMARY]
    quoted = [r.summary for b in run_all.REGISTRY for r in b.rows if r.summary]
    block = top.split("<!-- run_all:summary begin -->")[1].split("<!-- run_all:summary end")[0]
    assert [row[0] for row in _rows(top, "summary")] == quoted and len(quoted) > 10
    assert all(f"| {label} |" in block for label in quoted)
    assert run_all.main(["tables", "--check"]) == 0


@pytest.mark.parametrize("bench_id", ["train_step_overhead", "train_step_overhead_compiled"])
def test_train_step_overhead_emits_every_key_its_rows_read(
    bench_id: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The script's FIGURE keys cover its registry rows (timing stubbed: it needs CUDA)."""
    from benchmarks import train_step_overhead as tso

    bench = next(b for b in run_all.REGISTRY if b.id == bench_id)
    times = iter(range(100, 200))
    monkeypatch.setattr(tso, "step_time", lambda *args, **kwargs: float(next(times)))
    monkeypatch.setattr(sys, "argv", ["train_step_overhead.py", *bench.args])
    tso.main()
    figures = _figures.parse(capsys.readouterr().out)
    for row in bench.rows:
        assert run_all.fill(row.value, figures) is not None, row.value
        if row.goal:
            assert {row.goal.key, row.goal.baseline} <= set(figures)


def test_decode_emits_every_key_its_rows_read(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/decode.py reads qsparse-generate's per-mode lines into FIGURE lines: run on
    the tiny preset on CPU, they cover the decode_eager rows."""
    from benchmarks import decode

    bench = next(b for b in run_all.REGISTRY if b.id == "decode_eager")
    cpu = ["--preset", "tiny", "--device", "cpu", "--no-kernels", "--no-graph", "--dtype", "fp32"]
    assert decode.run([*bench.args, *cpu, "--new-tokens", "2", "--prompt-len", "4"]) == 0
    figures = _figures.parse(capsys.readouterr().out)
    assert figures["decode.eager.dense.ratio"]["value"] == 1.0
    for row in bench.rows:
        assert run_all.fill(row.value, figures) is not None, row.value


DECODE_MODES_BENCHES = [b.id for b in run_all.REGISTRY if b.script == "decode_modes.py"]


@pytest.mark.parametrize("bench_id", DECODE_MODES_BENCHES)
def test_decode_modes_emits_every_key_its_rows_read(
    bench_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/decode_modes.py with a registered bench's arguments, the presets swapped for
    the tiny one and run on CPU (2 new tokens, the compiled step on the eager backend): its
    FIGURE keys, renamed back to each registered preset, cover the bench's rows."""
    from benchmarks import decode_modes

    assert registry._NEW_TOKENS == decode_modes.NEW_TOKENS  # the rows' token counts
    bench = next(b for b in run_all.REGISTRY if b.id == bench_id)
    args = list(bench.args)
    at = args.index("--presets") + 1
    presets, args[at] = args[at].split(","), "tiny"
    cpu = ["--device", "cpu", "--no-kernels", "--no-graph", "--dtype", "fp32", "--prompt-len", "4"]
    decode_modes.main([*args, "--new-tokens", "2", "--compile-backend", "eager", "--", *cpu])
    tiny = _figures.parse(capsys.readouterr().out)
    assert all(k.startswith("decode_modes.tiny.") for k in tiny)
    figures = {
        k.replace("decode_modes.tiny.", f"decode_modes.{p}.", 1): v
        for p in presets
        for k, v in tiny.items()
    }
    dense = [v["value"] for k, v in figures.items() if k.endswith(".dense.ratio")]
    assert dense and all(v == 1.0 for v in dense)
    for row in bench.rows:
        assert run_all.fill(row.value, figures) is not None, row.value
        if row.goal:
            assert {row.goal.key, row.goal.baseline} <= set(figures), row.goal


def test_sparse_gemv_7b_emits_every_key_its_rows_read(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/sparse_gemv_7b.py needs CUDA: run on CPU with the kernel check and the
    timing stubbed and the 7B shapes shrunk (same names), its FIGURE keys cover its rows."""
    from benchmarks import sparse_gemv_7b as sg7

    assert registry._SHAPES_7B == sg7.SHAPES  # the shapes the rows name
    bench = next(b for b in run_all.REGISTRY if b.id == "sparse_gemv_7b")
    times = iter(range(100, 1000))
    monkeypatch.setattr(sg7, "DEVICE", "cpu")
    monkeypatch.setattr(sg7, "SHAPES", {name: (64, 32) for name in sg7.SHAPES})
    monkeypatch.setattr(sg7, "check", lambda *args: None)
    monkeypatch.setattr(sg7, "time_graph", lambda calls: float(next(times)))
    monkeypatch.setattr(sys, "argv", ["sparse_gemv_7b.py", *bench.args, "--buffers", "1"])
    sg7.main()
    figures = _figures.parse(capsys.readouterr().out)
    assert figures["sparse_gemv_7b.qkv_b1_S0.6.incl"]["value"] == pytest.approx(100 / 101)
    for row in bench.rows:
        assert run_all.fill(row.value, figures) is not None, row.value
        if row.goal:
            assert {row.goal.key, row.goal.baseline} <= set(figures), row.goal


def test_sweep_picks_the_fastest_config_by_time_alone(monkeypatch, capsys) -> None:
    """Equal times must not compare the configs (frozen dataclasses do not order); a config
    the compiler rejects is skipped."""
    from dataclasses import dataclass

    from benchmarks import _timing

    @dataclass(frozen=True)
    class Cfg:
        n: int

    times = {1: 3.0, 2: 2.0, 3: 2.0, 4: None, 5: 2.5}

    def fake_time_graph(calls, reps=4, replays=20):
        t = times[calls[0]]
        if t is None:
            raise RuntimeError("launch shape rejected")
        return t

    monkeypatch.setattr(_timing, "time_graph", fake_time_graph)
    best = _timing.sweep([Cfg(n) for n in times], lambda c: [c.n], "ties", top=2)
    assert best == Cfg(2)
    out = capsys.readouterr().out
    assert "Cfg(n=4): RuntimeError" in out
    assert out.count("# sweep ties:") == 2


def test_manifest_names_the_commit_and_checks_the_copied_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tree copied without .git with HEAD's manifest: clean while every listed file matches
    its blob (results and generated tables may differ), dirty after any other edit or a missing
    file."""
    import hashlib

    files = {"qsparse/a.py": b"x = 1\n", "README.md": b"# r\n", "benchmarks/results/b.json": b"{}"}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    sha = {n: hashlib.sha1(b"blob %d\0" % len(d) + d).hexdigest() for n, d in files.items()}
    manifest = tmp_path / "manifest"
    manifest.write_text("commit abc123\n" + "".join(f"{sha[n]} {n}\n" for n in files))
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    monkeypatch.setattr(run_all, "_git", lambda *args: None)
    monkeypatch.setenv("QSPARSE_MANIFEST", str(manifest))
    assert run_all.commit_state() == ("abc123", False)
    (tmp_path / "README.md").write_text("# regenerated tables\n")
    (tmp_path / "benchmarks/results/b.json").write_text('{"new": 1}')
    assert run_all.commit_state() == ("abc123", False)
    (tmp_path / "qsparse/a.py").write_text("x = 2\n")
    assert run_all.commit_state() == ("abc123", True)
    (tmp_path / "qsparse/a.py").unlink()
    assert run_all.commit_state() == ("abc123", True)
    manifest.write_text("not a manifest\n")
    with pytest.raises(ValueError, match="QSPARSE_MANIFEST"):
        run_all.commit_state()


def test_manifest_of_this_checkout_matches_git() -> None:
    """The manifest written here lists git's own blob ids: this checkout checks clean against
    it exactly when git says so."""
    if run_all._git("rev-parse", "HEAD") is None:
        pytest.skip("not a git checkout")
    import tempfile

    if run_all.commit_state()[1]:
        pytest.skip("tracked files differ from HEAD")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "manifest"
        head = run_all.write_manifest(out)
        assert run_all.manifest_state(out) == (head, False)


def test_decode_plot_rows_come_from_run_all_records() -> None:
    """benchmarks/decode_modes.py --plot reads run_all records: one row per preset, batch and
    mode with its tokens/s, whether the step was compiled, the record's commit and its GPU."""
    from benchmarks.decode_modes import _batch_label, rows_from_records, short_device

    record = {
        "commit": "d59dc26d56e6",
        "device": "NVIDIA H100 80GB HBM3",
        "figures": {
            "decode_modes.1.3B.b1.compile.bitnet.tokens_per_s": _fig(837.5, 837.5, 837.5, 1),
            "decode_modes.1.3B.b1.compile.bitnet.ratio": _fig(1.3, 1.3, 1.3, 1),
            "decode_modes.7B.b8.eager.dense.tokens_per_s": _fig(1165.3, 1165.3, 1165.3, 1),
            "decode_modes.7B.b1.transformers.tokens_per_s": _fig(19.1, 19.1, 19.1, 1),
        },
    }
    rows = sorted(rows_from_records([record]), key=lambda r: r["preset"])
    assert rows == [
        dict(preset="1.3B", batch=1, mode="bitnet", tokens_per_s=837.5, compiled=True,
             commit="d59dc26", device="H100"),
        dict(preset="7B", batch=8, mode="dense", tokens_per_s=1165.3, compiled=False,
             commit="d59dc26", device="H100"),
    ]  # fmt: skip
    assert short_device("NVIDIA H200") == "H200" and short_device(None) is None
    # a bar group measured on two cards names both, so no figure passes for another card's
    assert _batch_label(1, [rows[0], dict(rows[0], device="H200")]) == (
        "batch 1\ncompiled, H100, H200"
    )
    assert _batch_label(8, [rows[1]]) == "batch 8\nH100"
    # an older record of the same preset, batch, mode and compile setting is left out
    older = dict(record, commit="0762a01", device="NVIDIA H200", date="2026-12-02T00:09:14Z")
    newer = dict(record, date="2026-12-06T05:26:01Z")
    assert sorted(rows_from_records([older, newer]), key=lambda r: r["preset"]) == rows
    assert rows_from_records([newer, older]) == rows_from_records([older, newer])
