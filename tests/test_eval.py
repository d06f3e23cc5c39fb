"""Evaluation: perplexity, sparsity report, the lm-eval model wrapper, the local tasks and
``qsparse-eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import qsparse
from qsparse.data.documents import read_documents
from qsparse.evaluation import (
    build_local_tasks,
    perplexity_of_tokens,
    run_lm_eval,
    token_stream,
)
from qsparse.models.hf import load_hf_model
from qsparse.stats import sparsity_report


def _qsparse_lm():
    """The lm-eval wrapper class; skips the test where lm-eval (the ``eval`` extra) is absent."""
    pytest.importorskip("lm_eval")
    from qsparse.evaluation.lm_eval_model import QSparseLM

    return QSparseLM


@pytest.fixture
def tiny(tiny_hf_checkpoint):
    from transformers import AutoTokenizer

    path = tiny_hf_checkpoint("llama", max_position_embeddings=512)
    return path, load_hf_model(path), AutoTokenizer.from_pretrained(str(path))


def brute_force_nll(model, ids: torch.Tensor) -> float:
    """Sum of -log p(x_t | x_<t) for t >= 1 of one window, one position at a time."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, ids.numel()):
            logits = model(input_ids=ids[None, :t]).logits[0, -1].double()
            total -= float(F.log_softmax(logits, -1)[ids[t]])
    return total


def test_perplexity_matches_brute_force(tiny) -> None:
    _, model, tok = tiny
    docs = ["The quick brown fox jumps over the lazy dog.", "Sparse models are cheap."]
    stream = token_stream(tok, docs)
    assert stream[-1] == tok.eos_token_id and (stream == tok.eos_token_id).sum() == 2
    res = perplexity_of_tokens(model, stream, seq_len=16, batch_size=2)
    windows = [w for w in stream.split(16) if w.numel() >= 2]
    nll = sum(brute_force_nll(model, w) for w in windows)
    n = sum(w.numel() - 1 for w in windows)
    assert res.tokens == n and res.windows == len(windows)
    assert res.loss == pytest.approx(nll / n, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_perplexity_agreement_with_a_reference_matches_kl_div(tiny_hf_checkpoint) -> None:
    """``reference=``: the dense model against a second copy of itself agrees exactly (1, 0);
    a top-k model's top-1 agreement and KL(dense || sparse) equal argmax / ``F.kl_div`` on the
    same windows' logits, computed here one window at a time. Weights drawn with std 0.1 so
    the distributions are peaked and KL(p || q) and KL(q || p) differ by ~1%."""
    from transformers import AutoTokenizer

    path = tiny_hf_checkpoint("llama", initializer_range=0.1)
    tok = AutoTokenizer.from_pretrained(str(path))
    dense, sparse = load_hf_model(path), load_hf_model(path)
    qsparse.sparsify(sparse, sparsity=0.5)
    docs = [" ".join(["In the beginning was the word, and the word was sparse."] * 6)] * 3
    stream = token_stream(tok, docs)
    windows = [w for w in stream.split(48) if w.numel() >= 2]
    assert windows[-1].numel() != 48  # the batched windows and a shorter tail
    copy = perplexity_of_tokens(dense, stream, 48, 2, reference=load_hf_model(path))
    assert copy.top1_agreement == 1.0 and copy.kl_to_reference == 0.0
    res = perplexity_of_tokens(sparse, stream, seq_len=48, batch_size=2, reference=dense)
    assert res.ppl == pytest.approx(perplexity_of_tokens(sparse, stream, 48, 2).ppl, rel=1e-6)
    with torch.no_grad():
        q = torch.cat([sparse(input_ids=w[None]).logits[0, :-1] for w in windows]).double()
        p = torch.cat([dense(input_ids=w[None]).logits[0, :-1] for w in windows]).double()
    kl = F.kl_div(
        F.log_softmax(q, -1), F.log_softmax(p, -1), reduction="batchmean", log_target=True
    )
    top1 = (q.argmax(-1) == p.argmax(-1)).double().mean()
    assert q.shape[0] == res.tokens
    assert 0.0 < float(top1) < 1.0 and float(kl) > 0.05
    assert res.top1_agreement == pytest.approx(float(top1), abs=1e-12)
    assert res.kl_to_reference == pytest.approx(float(kl), rel=1e-4)
    assert res.to_dict()["kl_to_reference"] == res.kl_to_reference


def test_read_documents(tmp_path: Path) -> None:
    """Evaluation reads text with the data pipeline's reader and its rule: paragraphs of plain
    text stripped, rows without the text field dropped like empty ones."""
    cache = tmp_path / "cache"
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nstill first\n\n  second doc \n\n\n")
    assert read_documents(txt, cache_dir=cache) == ["first doc\nstill first", "second doc"]
    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
    assert read_documents(jl, cache_dir=cache) == ["x"]
    jl2 = tmp_path / "b.jsonl"
    jl2.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(5)))
    with pytest.raises(ValueError, match="available columns: \\['body'\\]"):
        read_documents(jl2, cache_dir=cache)
    assert read_documents(jl2, text_field="body", max_documents=2, cache_dir=cache) == [
        "doc 0",
        "doc 1",
    ]
    csv = tmp_path / "a.csv"
    csv.write_text('text\nx\n" "\n')
    assert read_documents(csv, cache_dir=cache) == ["x"]
    wiki = read_documents("wiki_en", max_documents=3)
    assert len(wiki) == 3 and all(len(d) > 20 for d in wiki)
    with pytest.raises(FileNotFoundError, match="not a bundled corpus"):
        read_documents(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="unknown extension"):
        (tmp_path / "a.xyz").write_text("x\n")
        read_documents(tmp_path / "a.xyz")


def test_training_and_evaluation_read_the_same_documents(tmp_path: Path) -> None:
    """Cached and streamed reads and the list reader give the same documents (one rule)."""
    from qsparse.data.corpora import resolve_corpus
    from qsparse.data.documents import load_documents

    txt = tmp_path / "c.txt"
    txt.write_text("\n\n a \n\nb\nc\n\n \n\n\n\nd")
    spec = resolve_corpus(data_files=txt)
    cached = list(load_documents(spec, tmp_path / "cache")["text"])
    streamed = [r["text"] for r in load_documents(spec, tmp_path / "cache", streaming=True)]
    assert cached == streamed == read_documents(txt, cache_dir=tmp_path / "cache")
    assert cached == ["a", "b\nc", "d"]


def test_sparsity_report_dense_and_sparse(tiny) -> None:
    _, model, tok = tiny
    ids = token_stream(tok, ["The quick brown fox jumps over the lazy dog."] * 3)[None]
    dense = sparsity_report(model, [ids])
    assert dense.overall == 0.0 and dense.activated_parameters == dense.total_parameters
    qsparse.sparsify(model, 0.75)
    rep = sparsity_report(model, [ids])
    assert len(rep.sites) == 8  # 2 layers x 4 sites
    assert all(v >= 0.75 - 1e-9 for v in rep.sites.values())
    assert rep.configured_ratio == 0.75 and rep.tokens == ids.numel()
    # activated = total - sum over projections of (zero fraction of its input) * |W|
    linears = 0
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linears += getattr(layer.self_attn, name).weight.numel()
        for name in ("gate_proj", "up_proj", "down_proj"):
            linears += getattr(layer.mlp, name).weight.numel()
    assert rep.activated_parameters <= rep.total_parameters - 0.75 * linears + 1
    assert rep.overall == pytest.approx(1 - rep.activated_parameters / rep.total_parameters)


def _requests(pairs):
    return [SimpleNamespace(args=p) for p in pairs]


def test_lm_eval_wrapper_scores_match_manual(tiny) -> None:
    QSparseLM = _qsparse_lm()
    _, model, tok = tiny
    qsparse.sparsify(model, 0.5)
    lm = QSparseLM(model, tok, batch_size=2)
    pairs = [("The quick brown", " fox jumps"), ("Sparse", " models are cheap."), ("A", " b")]
    scores = lm.loglikelihood(_requests(pairs), disable_tqdm=True)
    for (ctx, cont), (score, greedy) in zip(pairs, scores, strict=True):
        c = tok.encode(ctx, add_special_tokens=False)
        whole = tok.encode(ctx + cont, add_special_tokens=False)
        x = whole[len(c) :]
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
        manual = sum(float(logp[len(c) - 1 + j, t]) for j, t in enumerate(x))
        assert score == pytest.approx(manual, abs=1e-4)
        argmax = [int(logp[len(c) - 1 + j].argmax()) for j in range(len(x))]
        assert greedy == (argmax == x)
    # rolling loglikelihood of a text = its summed token log-probs after the prefix token
    text = "The quick brown fox jumps over the lazy dog."
    (rolling,) = lm.loglikelihood_rolling(_requests([(text,)]))
    ids = [lm.prefix_token_id, *tok.encode(text, add_special_tokens=False)]
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    manual = sum(float(logp[j, ids[j + 1]]) for j in range(len(ids) - 1))
    assert rolling == pytest.approx(manual, abs=1e-4)
    # greedy generation stops at the stop string and respects max_gen_toks
    (out,) = lm.generate_until(_requests([("The quick", {"until": ["\n"], "max_gen_toks": 5})]))
    assert isinstance(out, str) and "\n" not in out


def test_local_tasks_are_deterministic_and_well_formed(tmp_path: Path) -> None:
    a = build_local_tasks(tmp_path / "a", n=40, seed=0)
    b = build_local_tasks(tmp_path / "b", n=40, seed=0)
    for name in ("qsparse_wiki_cloze", "qsparse_wiki_topic", "qsparse_kjv_next"):
        rows_a = (a / f"{name}.jsonl").read_text()
        assert rows_a == (b / f"{name}.jsonl").read_text()
        rows = [json.loads(line) for line in rows_a.splitlines()]
        assert len(rows) == 40
        for r in rows:
            assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
            assert 0 <= r["label"] < 4 and r["context"]
        spec = json.loads((a / f"{name}.yaml").read_text())
        assert spec["output_type"] == "multiple_choice"
        assert Path(spec["dataset_kwargs"]["data_files"]["test"]).is_file()
        # answers are spread over positions (shuffled), not always the same slot
        assert len({r["label"] for r in rows}) > 1
    cloze = [json.loads(x) for x in (a / "qsparse_wiki_cloze.jsonl").read_text().splitlines()]
    # the right ending continues the context into a real first sentence of the corpus
    docs = read_documents("wiki_en")
    first = cloze[0]
    sentence = first["context"] + first["choices"][first["label"]]
    assert any(d.startswith(sentence) for d in docs)


def test_run_lm_eval_on_local_tasks(tiny, tmp_path: Path) -> None:
    QSparseLM = _qsparse_lm()
    _, model, tok = tiny
    qsparse.sparsify(model, 0.5)
    task_dir = build_local_tasks(tmp_path / "tasks", n=12)
    res = run_lm_eval(model, tok, ["qsparse_local"], limit=6, batch_size=8, task_dir=task_dir)
    assert set(res) == {
        "qsparse_local",
        "qsparse_wiki_cloze",
        "qsparse_wiki_topic",
        "qsparse_kjv_next",
    }
    lm = QSparseLM(model, tok)
    # lm-eval's accuracy is the argmax of the wrapper's loglikelihoods over the choices
    rows = [json.loads(x) for x in (task_dir / "qsparse_kjv_next.jsonl").read_text().splitlines()]
    correct = 0
    for r in rows[:6]:
        scores = lm.loglikelihood(
            _requests([(r["context"], c) for c in r["choices"]]), disable_tqdm=True
        )
        correct += int(max(range(4), key=lambda i: scores[i][0]) == r["label"])
    assert res["qsparse_kjv_next"]["acc"] == pytest.approx(correct / 6)
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_lm_eval(model, tok, ["no_such_task"], task_dir=task_dir)


def test_qsparse_eval_cli(tiny_hf_checkpoint, tmp_path: Path, capsys) -> None:
    from qsparse.cli.convert import main as convert
    from qsparse.cli.evaluate import main

    src = tiny_hf_checkpoint("qwen2", max_position_embeddings=512)
    dst = tmp_path / "sparse"
    assert convert([str(src), str(dst), "--sparsity", "0.5"]) == 0
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\nTop-k keeps the largest.\n")
    out = tmp_path / "r.json"
    assert main([str(dst), "--text", str(text), "--seq-len", "16", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["settings"]["sparsity"]["ratio"] == 0.5
    assert res["perplexity"]["ppl"] > 1 and res["perplexity"]["seq_len"] == 16
    assert 0.0 < res["sparsity"]["overall"] < 0.5
    assert res["sparsity"]["activated_parameters"] < res["sparsity"]["total_parameters"]
    assert "perplexity" in capsys.readouterr().out
    # training-free top-k on the dense checkpoint, through the CLI override
    out2 = tmp_path / "d.json"
    assert main([str(src), "--text", str(text), "--seq-len", "16", "--sparsity", "0.5",
                 "--json", str(out2)]) == 0  # fmt: skip
    assert json.loads(out2.read_text())["perplexity"] == res["perplexity"]
    # an incomplete checkpoint fails naming the missing tokenizer
    for f in src.glob("tokenizer*"):
        f.unlink()
    assert main([str(src), "--text", str(text)]) == 2
    assert "no tokenizer" in capsys.readouterr().err
