"""Peak host memory of SFT on a large generated file (issue 15): tokenize + train, CPU.

Writes an OpenOrca-style jsonl of ``--rows`` rows (system prompt, question, response built
from sentences of the packaged wiki corpus, every row distinct), trains a byte-level BPE on
the first 20,000 rows, then, in this process: ``SFTDataModule(packing=True).setup()``
(``datasets.map`` into Arrow under the cache dir) and ``--steps`` optimizer steps of the tiny
Llama with Lightning on the CPU. Peak RSS is ``ru_maxrss`` of this process, measured before
the data module is built (the baseline: Python, torch, Lightning) and at the end.

Figures: ``peak_rss_gib``, ``data_rss_gib`` (peak minus baseline), ``raw_text_gib``,
``rss_over_raw_text`` = data_rss / raw size (the issue's bound: far below 10), and
``peak_anon_rss_gib`` / ``anon_over_raw_text``: the peak of the process's own (anonymous)
memory, without the pages of the memory-mapped Arrow files that RSS also counts.

    PYTHONPATH=$PWD python3 benchmarks/sft_memory.py --rows 1000000 --steps 20 --work /tmp/sft1m
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from pathlib import Path

from benchmarks._figures import emit


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class AnonPeak(threading.Thread):
    """Samples ``RssAnon`` (memory the process owns: heap, Arrow buffers, tensors) of
    ``/proc/self/status`` every 50 ms and keeps the peak. ``ru_maxrss`` also counts the pages
    of memory-mapped files (the Arrow caches), which the kernel can drop at any time."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kib = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            time.sleep(0.05)


def write_rows(path: Path, rows: int, cache: Path) -> int:
    """The generated jsonl (streamed to disk); returns its size in bytes."""
    from qsparse.data import resolve_corpus

    spec = resolve_corpus("wiki_en", cache_dir=cache)
    sentences: list[str] = []
    with open(spec.data_files[0], encoding="utf-8") as f:
        for line in f:
            sentences.extend(s.strip() + "." for s in json.loads(line)["text"].split(". ") if s)
    n = len(sentences)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for i in range(rows):
            a, b, c = sentences[i % n], sentences[(7 * i + 3) % n], sentences[(13 * i + 5) % n]
            row = {
                "system_prompt": "You are a helpful assistant." if i % 3 else "",
                "question": f"Question {i}: what follows from this? {a}",
                "response": f"{b} ({c[:40]})",
            }
            out.write(json.dumps(row) + "\n")
    tmp.rename(path)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--work", default="/tmp/qsparse_sft_memory")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    data = work / f"sft_{args.rows}.jsonl"
    t0 = time.perf_counter()
    raw = data.stat().st_size if data.is_file() else write_rows(data, args.rows, cache)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        from qsparse.data import train_bpe_tokenizer

        with open(data, encoding="utf-8") as f:
            sample = [
                " ".join(json.loads(line).values())
                for _, line in zip(range(20_000), f, strict=False)
            ]
        train_bpe_tokenizer(sample, vocab_size=4096).save_pretrained(tok_dir)
    t_gen = time.perf_counter() - t0

    import lightning as L

    from qsparse.data import SFTDataModule
    from qsparse.training import LMModule

    base = _rss_gib()
    anon = AnonPeak()
    anon.start()
    t0 = time.perf_counter()
    dm = SFTDataModule(
        data_files=str(data),
        tokenizer=str(tok_dir),
        seq_len=args.seq_len,
        batch_size=8,
        packing=True,
        val_fraction=0.001,
        cache_dir=str(cache),
    )
    dm.setup("fit")
    t_data = time.perf_counter() - t0
    after_data = _rss_gib()
    module = LMModule(model={"preset": "tiny", "vocab_size": dm.vocab_size})
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        limit_val_batches=2,
        val_check_interval=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    peak = _rss_gib()
    anon.running = False
    anon.join()
    gib = raw / 2**30
    print(
        json.dumps(
            {
                "rows": args.rows,
                "train_examples": dm.num_train_examples,
                "packed_blocks": len(dm._train_dataset),
                "generate_s": round(t_gen, 1),
                "tokenize_setup_s": round(t_data, 1),
                "rss_after_data_gib": round(after_data, 3),
            }
        )
    )
    emit("raw_text_gib", gib, "GiB")
    emit("baseline_rss_gib", base, "GiB")
    emit("peak_rss_gib", peak, "GiB")
    emit("data_rss_gib", peak - base, "GiB")
    emit("rss_over_raw_text", (peak - base) / gib, "x")
    emit("peak_anon_rss_gib", anon.peak_kib / 2**20, "GiB")
    emit("anon_over_raw_text", anon.peak_kib / 2**20 / gib, "x")


if __name__ == "__main__":
    main()
