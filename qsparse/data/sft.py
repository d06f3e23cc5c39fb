"""``SFTDataModule``: instruction / chat fine-tuning batches with a response-only loss.

The jobs are split by module: row formatting, rendering and loss masking in
:mod:`qsparse.data.sft_format`; tokenization with ``datasets.map`` into an Arrow file under
``<cache>/sft_tokenized/`` and the train/val split in :mod:`qsparse.data.sft_tokenized`;
padding and packing over the memory-mapped examples in :mod:`qsparse.data.sft_batches`. This
module resolves the files, the format and the tokenizer, and serves the loaders. Memory does
not grow with the number of examples (a 1M-row file: ``benchmarks/sft_memory.py``). Exact
resume works as in pretraining (:mod:`qsparse.data.resumable`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from ..cache import CACHE_FORMAT_VERSION, file_fingerprint, stable_hash
from .checks import check_positive_or_none
from .corpus_module import CorpusDataModule, corpus_args
from .documents import split_fraction
from .local_files import builder_for_files, load_local_dataset
from .sft_batches import ExampleDataset, ExampleRows, PackedBlocks, pad_collate
from .sft_format import IGNORE_INDEX, example_to_messages
from .sft_synth import SFT_CORPORA, sft_corpus_file
from .sft_tokenized import build_sft_cache, load_sft_cache
from .tokenizer import resolve_tokenizer, tokenizer_fingerprint

__all__ = ["IGNORE_INDEX", "SFTDataModule"]


class SFTDataModule(CorpusDataModule):
    """LightningDataModule for instruction / chat fine-tuning with a response-only loss.

    Args:
        corpus: generated real-data set name (``"wiki_qa"``, ``"kjv_continue"``, or with
            ``_chat`` appended for the messages layout; see :mod:`qsparse.data.sft_synth`).
            Default when neither ``corpus`` nor ``data_files`` is given: ``"wiki_qa"``.
        data_files: local ``.jsonl``/``.json``/``.parquet`` file(s) instead of a corpus.
        tokenizer: local tokenizer folder (e.g. the HF checkpoint being fine-tuned), a
            tokenizer object, or ``None``/``"bpe"`` for a BPE trained on the training texts.
        vocab_size: size of that trained BPE.
        seq_len: maximum example length (truncation) and block length when packing.
        batch_size: examples (padding) or blocks (packing) per batch per rank.
        packing: pack examples into ``seq_len`` blocks instead of padding each batch.
        val_fraction: expected fraction of examples in validation, in [0, 1).
        num_workers, seed, cache_dir, shuffle, val_batch_size, shuffle_seed: as in
            ``PretrainDataModule`` (``seed`` keys the split, ``shuffle_seed`` the order).
        max_examples: keep only the first N rows (tiny runs, tests).
        format: ``"auto"`` (from the columns), ``"openorca"`` or ``"messages"``.
        template: ``"auto"`` (chat template if the tokenizer has one), ``"chat"`` or ``"plain"``.
        system_field, question_field, response_field: OpenOrca column names.
        messages_field: chat column name.
        num_proc: processes for the tokenizing ``datasets.map`` (``None``: this one).

    Attributes (after ``setup``): ``tokenizer``, ``vocab_size``, ``num_train_examples``,
    ``num_val_examples``, ``num_dropped`` (examples with no trained token after truncation),
    ``use_chat_template``.
    """

    def __init__(
        self,
        corpus: str | None = None,
        data_files: str | Sequence[str] | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        vocab_size: int = 4096,
        seq_len: int = 512,
        batch_size: int = 8,
        packing: bool = False,
        val_fraction: float = 0.02,
        num_workers: int = 0,
        seed: int = 1234,
        cache_dir: str | None = None,
        max_examples: int | None = None,
        format: str = "auto",
        template: str = "auto",
        system_field: str = "system_prompt",
        question_field: str = "question",
        response_field: str = "response",
        messages_field: str = "messages",
        shuffle: bool = True,
        val_batch_size: int | None = None,
        num_proc: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(**corpus_args(locals()), default_corpus="wiki_qa", purpose="fine-tune")
        check_positive_or_none("num_proc", num_proc)
        check_positive_or_none("max_examples", max_examples)
        if format not in ("auto", "openorca", "messages"):
            raise ValueError(f"format must be 'auto', 'openorca' or 'messages', got {format!r}")
        if template not in ("auto", "chat", "plain"):
            raise ValueError(f"template must be 'auto', 'chat' or 'plain', got {template!r}")
        self.packing = packing
        self.max_examples = max_examples
        self.format = format
        self.template = template
        self.fields = {
            "system_field": system_field,
            "question_field": question_field,
            "response_field": response_field,
            "messages_field": messages_field,
        }
        self.num_proc = num_proc
        self.use_chat_template: bool | None = None
        self.num_train_examples: int | None = None
        self.num_val_examples: int | None = None
        self.num_dropped: int | None = None
        self._files: list[str] | None = None
        self._train_dataset: Dataset | None = None
        self._val_dataset: Dataset | None = None
        self._train_examples: ExampleRows | None = None
        self._val_examples: ExampleRows | None = None

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        assert tok is not None
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither pad_token nor eos_token; set one")
        return int(pad)

    # ------------------------------------------------------------------ data
    def _resolve_files(self) -> list[str]:
        if self._files is None:
            if self.corpus is not None:
                names = sorted(SFT_CORPORA) + sorted(f"{k}_chat" for k in SFT_CORPORA)
                if self.corpus not in names:
                    raise ValueError(
                        f"corpus: unknown SFT corpus {self.corpus!r}; choose one of {names} or "
                        "pass data_files"
                    )
                self._files = [str(sft_corpus_file(self.corpus, self.cache_dir))]
            else:
                files = (
                    [self.data_files]
                    if isinstance(self.data_files, (str, os.PathLike))
                    else list(self.data_files or [])
                )
                if not files:
                    raise ValueError("data_files: empty list; give at least one local file")
                for f in files:
                    if not Path(f).is_file():
                        raise FileNotFoundError(f"data_files: file not found: {str(f)!r}")
                self._files = [str(Path(f).resolve()) for f in files]
        return self._files

    def _rows(self) -> tuple[Any, str]:
        """The raw rows (a ``datasets`` Arrow table, after ``max_examples``) and the format."""
        files = self._resolve_files()
        builder = builder_for_files(files)
        if builder not in ("json", "parquet"):
            raise ValueError(
                f"data_files: SFT data must be .jsonl/.json/.parquet, got {builder!r} files"
            )
        ds = load_local_dataset(builder, files, self.cache_dir)
        cols = set(ds.column_names)
        f = self.fields
        fmt = self.format
        if fmt == "auto":
            if f["messages_field"] in cols:
                fmt = "messages"
            elif f["question_field"] in cols and f["response_field"] in cols:
                fmt = "openorca"
            else:
                raise ValueError(
                    f"cannot find SFT fields in {files}: columns are {sorted(cols)}; expected "
                    f"{f['messages_field']!r} (chat) or {f['question_field']!r} + "
                    f"{f['response_field']!r} (OpenOrca); set messages_field / question_field / "
                    "response_field to your column names"
                )
        need = (
            [f["messages_field"]]
            if fmt == "messages"
            else [f["question_field"], f["response_field"]]
        )
        missing = [c for c in need if c not in cols]
        if missing:
            raise ValueError(
                f"fields {missing} not found in {files} (columns: {sorted(cols)}); set the "
                "matching *_field argument"
            )
        if self.max_examples is not None:
            ds = ds.select(range(min(self.max_examples, len(ds))))
        return ds, fmt

    def _data_key(self) -> list[Any]:
        return [
            file_fingerprint(self._resolve_files()),
            self.format,
            self.fields,
            self.max_examples,
            self.val_fraction,
            self.seed,
        ]

    def prepare_data(self) -> None:
        """Build the tokenizer and the tokenized-example cache (idempotent)."""
        if self.cache_path is not None and (self.cache_path / "meta.json").is_file():
            return
        rows, fmt = self._rows()

        def train_texts() -> Iterable[str]:
            # the BPE is trained on the training side of the split (the SFT split rule)
            for start in range(0, len(rows), 1000):
                batch = rows[start : start + 1000]
                names = list(batch)
                for i, values in enumerate(zip(*batch.values(), strict=True)):
                    row = dict(zip(names, values, strict=True))
                    msgs = example_to_messages(row, fmt, index=start + i, **self.fields)
                    key = split_fraction(json.dumps(msgs, sort_keys=True), self.seed)
                    if key >= self.val_fraction:
                        yield "\n".join(m["content"] for m in msgs)

        if self.tokenizer is None:
            self.tokenizer = resolve_tokenizer(
                self.tokenizer_spec,
                texts=train_texts,
                corpus_name=f"sft_{self.corpus or 'files'}",
                key_parts=self._data_key(),
                vocab_size=self.bpe_vocab_size,
                cache_dir=self.cache_dir,
            )
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token; responses end with EOS, set one")
        has_template = bool(getattr(tok, "chat_template", None))
        if self.template == "chat" and not has_template:
            raise ValueError(
                "template='chat' but the tokenizer has no chat_template; use template='plain' "
                "or a tokenizer with a chat template"
            )
        self.use_chat_template = self.template == "chat" or (
            self.template == "auto" and has_template
        )
        key = stable_hash(
            CACHE_FORMAT_VERSION,
            "sft-arrow",
            self._data_key(),
            tokenizer_fingerprint(tok),
            self.use_chat_template,
            self.seq_len,
        )
        self.cache_path = self.cache_dir / "sft_tokenized" / f"{self.corpus or 'files'}-{key}"
        if (self.cache_path / "meta.json").is_file():
            return
        build_sft_cache(
            rows,
            tok,
            self.cache_path,
            fmt=fmt,
            fields=self.fields,
            use_chat_template=self.use_chat_template,
            seq_len=self.seq_len,
            seed=self.seed,
            val_fraction=self.val_fraction,
            num_proc=self.num_proc,
        )

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the tokenized examples (building them first when needed)."""
        self.prepare_data()
        if self._train_dataset is not None:
            return
        assert self.cache_path is not None
        table, train_idx, val_idx, meta = load_sft_cache(self.cache_path)
        self._train_examples = ExampleRows(table, train_idx)
        self._val_examples = ExampleRows(table, val_idx)
        self.num_train_examples = meta["num_train"]
        self.num_val_examples = meta["num_val"]
        self.num_dropped = meta["dropped"]
        if self.num_dropped:
            warnings.warn(
                f"{self.num_dropped} SFT examples had no response token left after truncation to "
                f"seq_len={self.seq_len} and were dropped",
                stacklevel=2,
            )
        if self.num_train_examples == 0:
            raise ValueError("no training examples left; raise seq_len or max_examples")
        if self.packing:
            pad = self.pad_token_id
            self._train_dataset = PackedBlocks(self._train_examples, self.seq_len, pad)
            self._val_dataset = PackedBlocks(self._val_examples, self.seq_len, pad)
        else:
            self._train_dataset = ExampleDataset(self._train_examples)
            self._val_dataset = ExampleDataset(self._val_examples)

    def train_dataloader(self) -> DataLoader:
        """Training batches ``{"input_ids", "labels", "attention_mask"}``, resumable."""
        return self._split_loader(True, self._collate())

    def val_dataloader(self) -> DataLoader:
        """Validation batches in fixed order."""
        return self._split_loader(False, self._collate())

    def _collate(self) -> Any:
        # packed blocks all have length seq_len and carry their own attention_mask
        return None if self.packing else pad_collate(self.pad_token_id)
