"""``PretrainDataModule``: the LightningDataModule of causal-LM pretraining on a corpus.

Documents -> tokens (+EOS) -> one stream -> fixed blocks of ``seq_len``; batches are
``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` with ``labels == input_ids``
(the model shifts them). The DataModule holds the settings, the corpus, the tokenizer and the
position in the training stream; the batches come from one of two pipelines
(:mod:`qsparse.data.pretrain_pipeline`), picked once from ``streaming``:

* ``False`` (default): :class:`~qsparse.data.packed.CachedPipeline`, the corpus tokenized once
  into a token array per split on disk and memory-mapped; blocks shuffled per epoch by
  :class:`~qsparse.data.resumable.ResumableSampler`;
* ``True``: :class:`~qsparse.data.streaming.StreamingPipeline`, files read lazily, tokenized
  by DataLoader workers in chunks and packed on the fly, sharded by rank and worker, resumable
  from a cursor without re-tokenizing consumed text. Nothing is cached but the tokenizer.

Both read documents by the same rules and split them by the same key
(:mod:`qsparse.data.documents`), so with ``shuffle=False`` on one rank they yield the same
token stream. Exact resume: :mod:`qsparse.data.resumable` (``state_dict`` = position in the
stream, plus each rank's stream cursor when streaming). Both pipelines save their state under
this one class, so a checkpoint resumes whichever pipeline the resumed run picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from .checks import check_positive_or_none
from .corpora import resolve_corpus
from .corpus_module import CorpusDataModule, corpus_args
from .local_files import CorpusSpec
from .packed import CachedPipeline
from .pretrain_pipeline import PretrainPipeline
from .streaming import StreamingPipeline

__all__ = ["PretrainDataModule"]


class PretrainDataModule(CorpusDataModule):
    """LightningDataModule for causal-LM pretraining on packed token blocks, made by the
    pipeline ``streaming`` picks (``pipeline``: a
    :class:`~qsparse.data.pretrain_pipeline.PretrainPipeline`).

    Args:
        corpus: registered corpus name (``"wiki_en"``, ``"kjv"``, ``"kjv_verses"``); the
            default when neither ``corpus`` nor ``data_files`` is given is ``"wiki_en"``.
        data_files: local ``.txt``/``.jsonl``/``.json``/``.parquet``/``.csv`` file(s) instead of
            a corpus (give one or the other).
        text_field: document column (default ``"text"``).
        tokenizer: local tokenizer folder, or ``None``/``"bpe"`` for a byte-level BPE trained
            on the training split and cached; a tokenizer object is accepted too.
        vocab_size: size of the trained BPE (ignored for a tokenizer folder).
        seq_len: tokens per block ``T``.
        batch_size: blocks per batch per rank ``B``.
        val_fraction: expected fraction of documents in validation, in [0, 1).
        num_workers: DataLoader workers (streaming: they tokenize chunks in parallel).
        seed: split key (and the shuffle's, unless ``shuffle_seed`` is given).
        shuffle_seed: base of the training shuffle (``shuffle_seed + epoch``; ``None``: ``seed``).
        cache_dir: cache root (default ``$QSPARSE_CACHE`` or ``./.cache/qsparse``).
        max_documents: keep only the first N documents (tiny runs, tests).
        streaming: ``True``: read files lazily and pack on the fly (large inputs; no token
            cache); ``False``: tokenize once into a token cache (see the module docstring).
        text_sample_by: for ``.txt`` files: a document is a ``"line"``, ``"paragraph"``
            (blank-line separated; default) or the whole ``"document"``.
        shuffle: shuffle training blocks (cached) or documents (streaming) every epoch.
        shuffle_buffer: streaming: rows per chunk, the unit that is shuffled, tokenized by
            one worker and resumed from.
        val_batch_size: validation batch size (default ``batch_size``).

    Attributes (after ``setup``): ``tokenizer``, ``vocab_size`` (``len(tokenizer)``); cached:
    ``num_train_tokens``/``num_val_tokens`` (tokens in whole blocks), ``num_train_blocks``.
    """

    def __init__(
        self,
        corpus: str | None = None,
        data_files: str | Sequence[str] | None = None,
        text_field: str | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.01,
        num_workers: int = 0,
        seed: int = 1234,
        cache_dir: str | None = None,
        max_documents: int | None = None,
        streaming: bool = False,
        text_sample_by: str = "paragraph",
        shuffle: bool = True,
        shuffle_buffer: int = 10_000,
        val_batch_size: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(**corpus_args(locals()), default_corpus="wiki_en", purpose="train")
        check_positive_or_none("max_documents", max_documents)
        check_positive_or_none("shuffle_buffer", shuffle_buffer)
        if not isinstance(streaming, bool):
            raise ValueError(
                f"streaming must be true (read files lazily) or false (token cache), got "
                f"{streaming!r}"
            )
        self.text_field = text_field
        self.max_documents = max_documents
        self.streaming = streaming
        self.text_sample_by = text_sample_by
        self.shuffle_buffer = shuffle_buffer
        self.spec: CorpusSpec | None = None
        self.num_train_tokens: int | None = None
        self.num_val_tokens: int | None = None
        pipeline = StreamingPipeline if streaming else CachedPipeline
        self.pipeline: PretrainPipeline = pipeline(self)
        self._epoch_from_last_batch = self.pipeline.epoch_from_last_batch

    # ----------------------------------------------------------------- build
    def prepare_data(self) -> None:
        """Resolve the corpus; the pipeline resolves the tokenizer and builds what it keeps on
        disk (cached: the token cache). Idempotent."""
        if self.spec is None:
            self.spec = resolve_corpus(
                self.corpus, self.data_files, self.text_field, self.cache_dir
            )
        self.pipeline.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Load the pipeline's data (cached: memory-map the token cache), preparing it first
        if ``prepare_data`` did not run."""
        self.prepare_data()
        self.pipeline.setup()

    @property
    def num_train_blocks(self) -> int:
        """Training blocks per epoch (all ranks together); cached pipeline only."""
        return self.pipeline.num_train_blocks()

    def unigram_entropy(self, max_tokens: int = 5_000_000) -> float:
        """Entropy (nats) of the unigram distribution of the training tokens.

        ``H = -sum_v p_v ln p_v`` with ``p_v`` the frequency of token ``v`` in the training
        stream (documents + EOS). This is the cross-entropy of the best model that ignores
        context, so a language model's validation loss must fall clearly below it. Streaming
        mode estimates it from the first ``max_tokens`` training tokens.
        """
        return self.pipeline.unigram_entropy(max_tokens)

    # --------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        """Training batches ``{"input_ids", "labels"}: LongTensor[B, T]``, resumable."""
        return self.pipeline.train_loader()

    def val_dataloader(self) -> DataLoader:
        """Validation batches in fixed order (sharded across ranks)."""
        return self.pipeline.val_loader()

    def set_epoch(self, epoch: int) -> None:
        """Streaming mode without Lightning: start ``epoch`` on the next iteration.

        Under a Trainer the streaming epoch advances by itself after the last batch of an
        epoch; map-style loaders use their sampler's ``set_epoch`` (called by Lightning).
        """
        pos = self.position
        if pos.epoch != int(epoch):
            pos.epoch, pos.batches_consumed, pos.samples_consumed = int(epoch), 0, 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The position, plus what the pipeline keeps with it (streaming: ``cursors[r]``, every
        rank's stream cursor at that position, gathered from all ranks, so call it on every
        rank as Lightning does)."""
        return {**super().state_dict(), **self.pipeline.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position (and stream cursors); the next loader continues after it."""
        super().load_state_dict(state_dict)
        self.pipeline.load_state_dict(state_dict)
