"""Q-Sparse fine-tuning (recipe=finetune/tiny) on tiny HF checkpoints, end to end: the loss
covers exactly the response tokens of the recipe's batches, the run lowers validation loss
and the exported model reloads with identical logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CHATML, build_from_config, compose_train, validation_loss

import qsparse
from qsparse.data.sft_synth import sft_corpus_file
from qsparse.training import config as _schemas  # noqa: F401  (registers train_schema)
from qsparse.training.module import LMModule
from qsparse.training.run import train

FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qsparse-cache")


def compose_recipe(overrides: list[str]):
    return compose_train(["recipe=finetune/tiny", *overrides])


def spans(labels: torch.Tensor) -> list[list[int]]:
    """Maximal runs of supervised (label != -100) tokens of one row."""
    out: list[list[int]] = []
    current: list[int] = []
    for t in labels.tolist():
        if t != -100:
            current.append(t)
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def expected_targets(corpus: str, cache: Path, suffix: str) -> set[str]:
    """Every response of the generated corpus, followed by what the template trains after it."""
    path = sft_corpus_file(corpus, cache_dir=cache)
    targets = set()
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "response" in row:
                response = row["response"]
            else:
                response = [m for m in row["messages"] if m["role"] == "assistant"][-1]["content"]
            targets.add(response + suffix)
    return targets


@pytest.mark.parametrize(
    "packing,chat", [(False, False), (True, False), (False, True)], ids=["pad", "pack", "chat"]
)
def test_loss_covers_exactly_response_tokens(
    tiny_hf_checkpoint, data_cache: Path, tmp_path: Path, packing: bool, chat: bool
) -> None:
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=512)
    overrides = [
        f"model.path={ckpt}",
        f"data.cache_dir={data_cache}",
        f"data.packing={str(packing).lower()}",
        "data.max_examples=200",
        "data.seq_len=512",  # long enough that no response of these examples is truncated
        "data.shuffle=false",
    ]
    if chat:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(ckpt))
        tok.chat_template = CHATML
        tok.save_pretrained(ckpt)
        overrides.append("data.corpus=wiki_qa_chat")
    dm, module = build_from_config(compose_recipe(overrides))
    dm.prepare_data()
    dm.setup("fit")
    tok = dm.tokenizer
    assert dm.use_chat_template is chat
    suffix = ("<|im_end|>\n" if chat else "") + tok.eos_token
    targets = expected_targets("wiki_qa_chat" if chat else "wiki_qa", data_cache, suffix)

    batch = next(iter(dm.train_dataloader()))
    ids, labels = batch["input_ids"], batch["labels"]
    n_spans = 0
    for row_ids, row_labels in zip(ids, labels, strict=True):
        supervised = row_labels != -100
        # labels are the input ids where supervised (unshifted, HF semantics)
        assert torch.equal(row_labels[supervised], row_ids[supervised])
        row_spans = spans(row_labels)
        assert row_spans, "every example trains on its response"
        for span in row_spans:
            assert tok.decode(span) in targets
        if not packing:
            assert len(row_spans) == 1  # one single-turn example per row
        n_spans += len(row_spans)
        # what precedes each span is the prompt: the assistant header of the template
        start = int(supervised.nonzero()[0])
        header = "<|im_start|>assistant\n" if chat else "### Assistant:\n"
        assert tok.decode(row_ids[:start]).endswith(header)
    assert n_spans >= ids.shape[0]

    # the training loss is the mean cross-entropy over exactly those response tokens
    module.configure_model()
    module.model.eval()
    with torch.no_grad():
        loss = module._step(batch)
        logits = module(batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    targets_next = labels[:, 1:]
    keep = targets_next != -100
    manual = F.cross_entropy(logits[:, :-1][keep].float(), targets_next[keep])
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-6)
    assert int(keep.sum()) == int((labels != -100).sum()) - int((labels[:, 0] != -100).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_recipe_trains_and_exports(
    family: str, tiny_hf_checkpoint, data_cache: Path, tmp_path: Path
) -> None:
    ckpt = tiny_hf_checkpoint(family, max_position_embeddings=512)
    run_dir = tmp_path / "run"
    cfg = compose_recipe(
        [
            f"model.path={ckpt}",
            f"run_dir={run_dir}",
            f"data.cache_dir={data_cache}",
            "data.max_examples=400",
            "logger=csv",
            "trainer.max_steps=30",
            "trainer.val_check_interval=30",
            "trainer.enable_progress_bar=false",
            "callbacks.checkpoint.every_n_train_steps=30",
        ]
    )
    dm, module = build_from_config(cfg)
    before = validation_loss(module, dm, cfg.trainer.limit_val_batches)

    summary = train(cfg)
    assert summary["val_loss"] < before - 0.3, (before, summary["val_loss"])
    assert summary["sparsity_per_site"], "the fine-tuned model is sparse"
    assert all(v >= 0.5 - 1e-6 for v in summary["sparsity_per_site"].values())

    export_dir = Path(summary["export_dir"])
    trained = LMModule.load_from_checkpoint(
        str(run_dir / "checkpoints" / "last.ckpt"), map_location="cpu"
    ).model.eval()
    reloaded = qsparse.load(export_dir, dtype=torch.float32)
    assert qsparse.get_settings(reloaded)["sparsity"]["ratio"] == 0.5
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, reloaded(input_ids=ids).logits)
