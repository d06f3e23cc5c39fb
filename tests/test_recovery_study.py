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
