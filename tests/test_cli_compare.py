"""``qsparse-compare``: the method config group, and one table of dense + every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qsparse
from qsparse.cli.compare import build_method, main, split_overrides
from qsparse.methods import CATS, TEAL, AttributionSelection, QSparse


def test_method_group_instantiates_each_config() -> None:
    teal = build_method("teal", 0.4, ["greedy_tokens=512", "step=0.1"])
    assert isinstance(teal, TEAL) and teal.sparsity == 0.4 and teal.greedy
    assert (teal.greedy_tokens, teal.step, teal.calibration) == (512, 0.1, "wiki_en")
    uniform = build_method("teal_uniform", 0.5)
    assert (
        isinstance(uniform, TEAL) and not uniform.greedy and uniform.label() == "teal-uniform S=0.5"
    )
    assert isinstance(build_method("cats", 0.3), CATS)
    mag = build_method("attribution_magnitude", 0.4)
    assert isinstance(mag, AttributionSelection) and (mag.score, mag.heads) == ("magnitude", True)
    q = build_method("qsparse", 0.6, ["pattern=block_topk"])
    assert isinstance(q, QSparse) and q.config.pattern == "block_topk" and q.config.ratio == 0.6
    assert split_overrides(["teal.step=0.1"], ["teal", "cats"]) == {
        "teal": ["step=0.1"],
        "cats": [],
    }
    with pytest.raises(ValueError, match="<method>.<key>=<value>"):
        split_overrides(["step=0.1"], ["teal"])


def test_compare_prints_one_table_and_writes_json(
    tiny_hf_checkpoint, tmp_path: Path, capsys
) -> None:
    base = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    out = tmp_path / "rows.json"
    code = main(
        [
            str(base),
            "--text",
            "kjv",
            "--methods",
            "qsparse",
            "teal_uniform",
            "cats",
            "attribution",
            "attribution_magnitude",
            "--sparsity",
            "0.5",
            "--seq-len",
            "64",
            "--max-tokens",
            "512",
            "--calibration-tokens",
            "512",
            "--sparsity-tokens",
            "256",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "p.png"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "qsparse-compare" in printed and "teal-uniform S=0.5" in printed
    assert "top-1 kjv" in printed and "KL kjv" in printed
    rows = json.loads(out.read_text())
    assert [r["label"] for r in rows] == [
        "dense",
        "qsparse S=0.5",
        "teal-uniform S=0.5",
        "cats S=0.5",
        "attribution S=0.5",
        "magnitude-select S=0.5",
    ]
    dense, qs, teal, cats, attr, mag = rows
    assert dense["measured_sparsity"] == 0.0 and dense["method"] is None
    # against the dense copy kept as reference: the dense row exactly, every method row not
    assert dense["top1_agreement"] == {"kjv": 1.0} and dense["kl_to_dense"] == {"kjv": 0.0}
    for row in rows[1:]:
        assert 0.0 < row["top1_agreement"]["kjv"] < 1.0 and row["kl_to_dense"]["kjv"] > 0.0
    assert qs["mean_site_sparsity"] == pytest.approx(0.5)
    assert teal["mean_site_sparsity"] == pytest.approx(0.5, abs=0.08)  # held-out text
    assert qs["achieved_sparsity"] == pytest.approx(0.5)
    for row in (teal, cats):  # calibrated on the other half of the documents
        assert row["achieved_sparsity"] == pytest.approx(0.5, abs=0.08)
    # CATS: half of the down inputs -> fewer activated parameters than dense, more than top-k
    assert qs["activated_parameters"] < cats["activated_parameters"] < dense["activated_parameters"]
    # 4 heads: 2 zeroed per token (1/3 of the weight), MLP at 0.5 (2/3): exactly 0.5
    for row in (attr, mag):
        assert row["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert row["ppl"] != dense["ppl"]
    assert attr["ppl"] != mag["ppl"]
    assert all(r["method_seconds"] >= 0 and r["eval_seconds"] > 0 for r in rows[1:])
    assert (tmp_path / "p.png").stat().st_size > 0


def test_compare_rejects_bad_input(tiny_hf_checkpoint, tmp_path: Path, capsys) -> None:
    base = tiny_hf_checkpoint("llama")
    assert main([str(base), "--text", "kjv", "--methods", "nope", "--sparsity", "0.5"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--text", "kjv"]) == 2
    assert main([str(base), "--text", "kjv", "--set", "teal.nokey=1", "--sparsity", "0.5"]) == 2


def test_compare_adds_exported_checkpoints_as_rows(
    tiny_hf_checkpoint, tmp_path: Path, capsys
) -> None:
    """``--compare RUN/hf``: a Q-Sparse export (what continued training writes) is measured as
    saved; exported untrained at S=0.6 it equals the training-free top-k row at 0.6."""
    base = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    exported = tmp_path / "run" / "hf"
    model = qsparse.load(base)
    qsparse.sparsify(model, sparsity=0.6)
    qsparse.export(model, exported, tokenizer=str(base))
    out = tmp_path / "rows.json"
    args = [str(base), "--text", "kjv", "--methods", "qsparse", "--sparsity", "0.6"]
    args += ["--seq-len", "64", "--max-tokens", "256", "--sparsity-tokens", "128"]
    args += ["--compare", str(exported), "--labels", "continued S=0.6", "--json", str(out)]
    args += ["--plot", str(tmp_path / "p.png")]
    assert main(args) == 0
    assert "continued S=0.6" in capsys.readouterr().out
    dense, free, trained = json.loads(out.read_text())
    assert trained["label"] == "continued S=0.6" and trained["path"] == str(exported)
    assert trained["method"] is None and trained["sparsity_setting"] == pytest.approx(0.6)
    assert trained["ppl"]["kjv"] == pytest.approx(free["ppl"]["kjv"], rel=1e-6)
    assert trained["measured_sparsity"] == pytest.approx(free["measured_sparsity"], abs=1e-9)
    assert trained["ppl"]["kjv"] != dense["ppl"]["kjv"]
    assert trained["kl_to_dense"]["kjv"] == pytest.approx(free["kl_to_dense"]["kjv"], rel=1e-6)
    assert trained["top1_agreement"] == free["top1_agreement"]
    # --no-agreement: no dense reference, no columns
    assert main([*args[:-2], "--no-agreement"]) == 0
    assert "top-1" not in capsys.readouterr().out
    assert all(
        not r["top1_agreement"] and not r["kl_to_dense"] for r in json.loads(out.read_text())
    )
    # checked before any row is measured: one label per checkpoint, existing folders
    bad = [str(base), "--text", "kjv", "--methods", "qsparse", "--sparsity", "0.6"]
    assert main(bad + ["--compare", str(exported), "--labels", "a", "b"]) == 2
    assert "2 labels for 1 checkpoints" in capsys.readouterr().err
    assert main(bad + ["--compare", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
    other_vocab = tiny_hf_checkpoint("llama", vocab_size=300)
    assert main(bad + ["--compare", str(other_vocab)]) == 2
    assert "vocabulary differs" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_adds_lm_eval_columns(tiny_hf_checkpoint, tmp_path: Path) -> None:
    base = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    out = tmp_path / "rows.json"
    args = [str(base), "--text", "kjv", "--methods", "qsparse", "--sparsity", "0.5"]
    args += ["--max-tokens", "256", "--seq-len", "64", "--sparsity-tokens", "128"]
    args += ["--tasks", "qsparse_wiki_cloze", "--limit", "8", "--json", str(out)]
    assert main(args) == 0
    rows = json.loads(out.read_text())
    assert all(0.0 <= r["tasks"]["qsparse_wiki_cloze"]["acc"] <= 1.0 for r in rows)


def _rows_file(path: Path, dense_ppl: float, labels: list[str]) -> Path:
    from qsparse.evaluation.compare import CompareRow

    rows = [CompareRow("dense", "m", 0.0, ppl={"kjv": dense_ppl}, measured_sparsity=0.0)]
    rows += [
        CompareRow(lab, "m", 0.5, ppl={"kjv": 2 * dense_ppl}, measured_sparsity=0.4, method="x")
        for lab in labels
    ]
    path.write_text(json.dumps([r.to_dict() for r in rows]))
    return path


def test_merge_keeps_one_dense_row_and_refuses_another_comparison(tmp_path, capsys) -> None:
    """--merge: the first file's dense row, then the others' rows in file order, a repeated
    label once; a file whose dense perplexity differs is refused with its name (exit 2)."""
    from qsparse.evaluation.compare import merge_rows

    a = _rows_file(tmp_path / "a.json", 10.0, ["teal S=0.5", "cats S=0.5"])
    b = _rows_file(tmp_path / "b.json", 10.0, ["cats S=0.5", "qsparse S=0.5"])
    rows = merge_rows([a, b])
    assert [r.label for r in rows] == ["dense", "teal S=0.5", "cats S=0.5", "qsparse S=0.5"]
    out = tmp_path / "all.json"
    assert main(["--merge", str(a), str(b), "--json", str(out)]) == 0
    assert [r["label"] for r in json.loads(out.read_text())] == [r.label for r in rows]
    other = _rows_file(tmp_path / "other.json", 11.0, ["teal S=0.7"])
    assert main(["--merge", str(a), str(other)]) == 2
    assert "other.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        merge_rows([a, tmp_path / "bad.json"])
