"""qsparse-eval's comparison table (evaluation/compare.py): dense, training-free, trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qsparse
from qsparse.cli.evaluate import main
from qsparse.evaluation import evaluate_checkpoint
from qsparse.evaluation.compare import compare_models


def test_compare_rows_match_single_evaluations(tiny_hf_checkpoint, tmp_path: Path) -> None:
    base = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    trained = tmp_path / "sparse"
    model = qsparse.load(base)
    qsparse.sparsify(model, sparsity=0.6)
    qsparse.export(model, trained, tokenizer=str(base))
    text = tmp_path / "held_out.txt"
    text.write_text("Sparse models read fewer weights.\n\nThe fox jumps over the dog.\n" * 20)
    rows = compare_models(
        base,
        [str(text), "kjv"],
        sparsities=[0.5],
        checkpoints=[trained],
        labels=["exported S=0.6"],
        seq_len=32,
        max_tokens=512,
    )
    assert [r.label for r in rows] == ["dense", "training-free S=0.5", "exported S=0.6"]
    assert [r.sparsity_setting for r in rows] == [0.0, 0.5, pytest.approx(0.6)]
    for row, sparsity in zip(rows, (None, 0.5, None), strict=True):
        path = base if row.path == str(base) else trained
        single = evaluate_checkpoint(
            path, text=str(text), seq_len=32, max_tokens=512, sparsity=sparsity
        )
        assert row.ppl[str(text)] == pytest.approx(single.perplexity.ppl, rel=1e-6)
        assert row.measured_sparsity == pytest.approx(single.sparsity.overall, abs=1e-6)
    assert (
        rows[0].measured_sparsity == 0.0 and rows[2].measured_sparsity > rows[1].measured_sparsity
    )
    assert rows[1].ppl["kjv"] != rows[0].ppl["kjv"]


def test_compare_cli_writes_json_and_rejects_bad_labels(
    tiny_hf_checkpoint, tmp_path: Path, capsys
) -> None:
    base = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    out = tmp_path / "r.json"
    code = main(
        [
            str(base),
            "--text",
            "kjv",
            "--sparsity",
            "0.3",
            "0.6",
            "--seq-len",
            "32",
            "--max-tokens",
            "256",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["label"] for r in rows] == ["dense", "training-free S=0.3", "training-free S=0.6"]
    assert "qsparse-eval: dense vs training-free vs trained" in capsys.readouterr().out
    code = main([str(base), "--text", "kjv", "--compare", str(base), "--labels", "a", "b"])
    assert code == 2
    assert "2 labels for 1 checkpoints" in capsys.readouterr().err
