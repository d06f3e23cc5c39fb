"""The state the pretraining and SFT DataModules share: where the text comes from (a corpus
name or local files), which tokenizer reads it, and the sizes and split of the examples.

Subclasses (:class:`~qsparse.data.pretrain.PretrainDataModule`,
:class:`~qsparse.data.sft.SFTDataModule`) resolve the source, build ``self.tokenizer`` in
``prepare_data`` and the datasets in ``setup``; the loaders and exact resume come from
:class:`~qsparse.data.resumable.ResumableDataModule`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..cache import resolve_cache_dir
from .checks import check_source
from .resumable import ResumableDataModule

__all__ = ["CorpusDataModule", "corpus_args"]


class CorpusDataModule(ResumableDataModule):
    """Source, tokenizer and split settings of a text DataModule (checked here).

    Args:
        corpus, data_files: exactly one (neither: ``default_corpus``), see
            :func:`~qsparse.data.checks.check_source`.
        tokenizer: local tokenizer folder or object, or ``None``/``"bpe"`` for a byte-level
            BPE trained on the training texts; kept as ``tokenizer_spec``.
        vocab_size: size of that trained BPE; kept as ``bpe_vocab_size`` (the
            :attr:`vocab_size` property is ``len(tokenizer)``).
        seq_len, val_fraction, cache_dir: tokens per example/block, expected validation
            fraction in [0, 1), cache root (default ``$QSPARSE_CACHE`` or ``./.cache/qsparse``).
        batch_size, seed, num_workers, shuffle, val_batch_size, shuffle_seed: as in
            :class:`~qsparse.data.resumable.ResumableDataModule` (``seed`` keys the split).
        default_corpus, purpose: the corpus used when no source is given, and what the data
            is for (named in the error message).

    A subclass declares the other arguments in its own signature (its defaults) and passes
    them on with :func:`corpus_args`.
    """

    def __init__(
        self,
        *,
        corpus: str | None,
        data_files: str | Sequence[str] | None,
        tokenizer: str | PreTrainedTokenizerBase | None,
        vocab_size: int,
        seq_len: int,
        val_fraction: float,
        cache_dir: str | None,
        batch_size: int,
        seed: int,
        num_workers: int,
        shuffle: bool,
        val_batch_size: int | None,
        shuffle_seed: int | None,
        default_corpus: str,
        purpose: str,
    ) -> None:
        super().__init__(batch_size, seed, num_workers, shuffle, val_batch_size, shuffle_seed)
        self.corpus = check_source(
            corpus, data_files, default_corpus, seq_len, val_fraction, purpose
        )
        self.data_files = data_files
        self.tokenizer_spec = tokenizer
        self.bpe_vocab_size = vocab_size
        self.seq_len = seq_len
        self.val_fraction = float(val_fraction)
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.cache_path: Path | None = None
        self._train_dataset: Any = None
        self._val_dataset: Any = None

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model must embed (``len(tokenizer)``; prepares the data
        first when the tokenizer is not built yet)."""
        if self.tokenizer is None:
            self.prepare_data()
        assert self.tokenizer is not None
        return len(self.tokenizer)

    def _split_loader(
        self, train: bool, collate_fn: Callable[[list[Any]], Any] | None = None
    ) -> DataLoader:
        """The loader of the training split (resumable, ``batch_size``) or the validation
        split (fixed order, ``val_batch_size``); runs ``setup`` first when needed."""
        train_set = self._train_set()
        dataset = train_set if train else self._val_dataset
        assert dataset is not None
        batch_size = self.batch_size if train else self.val_batch_size
        return self._loader(dataset, train, batch_size, collate_fn)


#: the parameters a subclass takes under the same names and hands on (all but its own two)
_SHARED = tuple(
    name
    for name, p in inspect.signature(CorpusDataModule.__init__).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name not in ("default_corpus", "purpose")
)


def corpus_args(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`CorpusDataModule` arguments among a subclass's ``arguments`` (its
    ``__init__``'s ``locals()``, whose parameters carry the same names), so each subclass
    keeps its own signature and defaults without naming every argument again to pass it on."""
    return {name: arguments[name] for name in _SHARED}
