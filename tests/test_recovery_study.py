"""benchmarks/recovery.py re-plots and re-prints the committed recovery study from its JSON."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("recovery", ROOT / "benchmarks" / "recovery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_only_reproduces_the_docs_table(tmp_path: Path, capsys) -> None:
    src = ROOT / "docs" / "recovery.json"
    data = json.loads(src.read_text())
    copy = tmp_path / "recovery.json"
    shutil.copy(src, copy)
    assert _load_script().main(["--plot-only", str(copy)]) == 0
    assert (tmp_path / "recovery-convention_speeches.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    dense = next(r for r in data["results"] if r["kind"] == "dense")["ppl"]
    for r in data["results"]:
        ratio = r["ppl"]["convention_speeches"] / dense["convention_speeches"]
        assert f"convention_speeches={r['ppl']['convention_speeches']:.3f} ({ratio:.3f}x)" in out
    # the ratios docs/recovery.md quotes are the JSON's
    doc = (ROOT / "docs" / "recovery.md").read_text()
    for kind in ("lm", "distill"):  # the recipe (LM loss) and CE + KL, at every S
        rows = {r["S"]: r for r in data["results"] if r["kind"] == kind}
        for s in (0.25, 0.4, 0.5, 0.6, 0.7):
            for text in ("convention_speeches", "python_docs"):
                ratio = rows[s]["ppl"][text] / dense[text]
                assert f"{ratio:.3f}x" in doc, (kind, s, text)


def test_a_cpu_study_with_the_dense_control(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """A two-step study on the tiny recipe: dense, training-free and the recipe (lm) at S=0.5,
    and the dense control (--dense-control: continued without sparsity, no warm-up callback,
    even where the recipe has one), all in recovery.json, each a ratio to dense."""
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    out = tmp_path / "study"
    argv = [
        *("--base", str(ckpt), "--recipe", "continue/recovery_tiny"),
        *("--eval-text", "python_docs", "--device", "cpu", "--max-tokens", "1024"),
        *("--sparsities", "--lm-sparsities", "0.5", "--paper-sparsities", "--free-sparsities"),
        *("--dense-control", "--out", str(out), "--"),
        *("data.max_documents=200", "trainer.max_steps=2", "trainer.val_check_interval=1"),
        "+callbacks.sparsity_warmup._target_=qsparse.training.sparsity_warmup.SparsityWarmup",
        "+callbacks.sparsity_warmup.steps=1",
    ]
    assert _load_script().main(argv) == 0
    results = {
        (r["kind"], r["S"]): r for r in json.loads((out / "recovery.json").read_text())["results"]
    }
    assert set(results) == {("dense", 0.0), ("free", 0.5), ("lm", 0.5), ("dense_cont", 0.0)}
    dense_cont, lm = results[("dense_cont", 0.0)], results[("lm", 0.5)]
    assert dense_cont["measured_sparsity"] == 0.0
    assert dense_cont["activated_parameters"] == results[("dense", 0.0)]["activated_parameters"]
    free = results[("free", 0.5)]["measured_sparsity"]
    assert lm["measured_sparsity"] > 0.2 and abs(lm["measured_sparsity"] - free) < 0.02
    assert "++callbacks.sparsity_warmup=null" in dense_cont["overrides"]
    for row in (lm, dense_cont):  # each job's validation curves, in-domain and held-out
        assert set(row["curves"]) == {"val/loss", "val_ood/loss"}
        assert all(v > 0 for curve in row["curves"].values() for v in curve.values())
    assert (out / "recovery-python_docs.png").is_file()
    for job in ("lm_S0.5", "dense_cont_S0"):  # the exports stay, the checkpoints are pruned
        assert (out / "runs" / job / "hf" / "config.json").is_file()
        assert not (out / "runs" / job / "checkpoints").exists()


def test_prune_checkpoints_needs_the_export(tmp_path: Path) -> None:
    prune = _load_script().prune_checkpoints
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "last.ckpt").write_bytes(b"x" * 10)
    assert prune(tmp_path) == 0 and (ckpt / "last.ckpt").is_file()  # no hf/ export: kept
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert prune(tmp_path) == 10 and not ckpt.exists()
    assert prune(tmp_path) == 0
