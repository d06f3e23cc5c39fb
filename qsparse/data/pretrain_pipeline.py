"""What the two pretraining pipelines share: :class:`PretrainPipeline`, the contract
:class:`~qsparse.data.pretrain.PretrainDataModule` calls, plus the document-split key and the
tokenizer both build the same way.

A pipeline turns the DataModule's corpus into batches ``{"input_ids", "labels"}:
LongTensor[B, T]``. It is a part of its DataModule: the DataModule owns the settings
(``seq_len``, batch sizes, split, seed, ``cache_dir``...), the resolved corpus ``spec``, the
``tokenizer`` and the training ``position``; the pipeline reads them from it and fills in the
tokenizer and the data it builds. There are two, and the DataModule picks one once, from
``streaming``:

* :class:`~qsparse.data.packed.CachedPipeline` (``streaming=False``): a token cache on disk,
  map-style blocks, :class:`~qsparse.data.resumable.ResumableSampler`;
* :class:`~qsparse.data.streaming.StreamingPipeline` (``streaming=True``): files read lazily,
  tokenized by loader workers, packed on the fly, resumed from per-rank cursors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from .tokenizer import resolve_tokenizer

if TYPE_CHECKING:
    from .pretrain import PretrainDataModule

__all__ = ["PretrainPipeline"]


class PretrainPipeline(ABC):
    """One way of making pretraining batches for ``dm`` (see the module docstring).

    Class attributes a pipeline sets: ``epoch_from_last_batch`` (an iterable loader has no
    sampler for Lightning to call ``set_epoch`` on, so the DataModule moves its position to the
    next epoch at Lightning's last batch) and ``tokenizer_key`` (extra parts of the trained
    BPE's cache key, so each pipeline keeps its own cached tokenizer).
    """

    epoch_from_last_batch: bool = False
    tokenizer_key: tuple[str, ...] = ()

    def __init__(self, dm: PretrainDataModule) -> None:
        self.dm = dm

    def split_key(self) -> list[Any]:
        """The settings that fix which documents exist and which split each falls in: corpus
        fingerprint, text field, ``max_documents``, ``val_fraction``, ``seed`` and (``.txt``
        files) ``text_sample_by``. It names the token cache and the trained tokenizer."""
        dm = self.dm
        assert dm.spec is not None
        return [
            dm.spec.fingerprint,
            dm.spec.text_field,
            dm.max_documents,
            dm.val_fraction,
            dm.seed,
            dm.text_sample_by if dm.spec.builder == "text" else None,
        ]

    def resolve_tokenizer(self, texts: Callable[[], Iterable[str]]) -> PreTrainedTokenizerBase:
        """The DataModule's tokenizer: the given one, or a BPE trained on ``texts()`` (cached
        under :meth:`split_key` + ``tokenizer_key``). It must have an EOS token (the separator
        between documents)."""
        dm = self.dm
        assert dm.spec is not None
        tok = resolve_tokenizer(
            dm.tokenizer_spec,
            texts=texts,
            corpus_name=dm.spec.name,
            key_parts=self.split_key() + list(self.tokenizer_key),
            vocab_size=dm.bpe_vocab_size,
            cache_dir=dm.cache_dir,
        )
        if tok.eos_token_id is None:
            raise ValueError(
                "tokenizer has no eos_token; documents are separated by EOS. Set "
                "tokenizer.eos_token (e.g. in tokenizer_config.json) or use the trained BPE"
            )
        return tok

    # ------------------------------------------------------------ the contract
    @abstractmethod
    def prepare(self) -> None:
        """Set ``dm.tokenizer`` (when not set yet) and build what must exist on disk
        (idempotent; ``dm.spec`` is resolved)."""

    @abstractmethod
    def setup(self) -> None:
        """Load what :meth:`prepare` built (called after it, possibly more than once)."""

    @abstractmethod
    def train_loader(self) -> DataLoader:
        """Training batches, starting right after ``dm.position``."""

    @abstractmethod
    def val_loader(self) -> DataLoader:
        """Validation batches in a fixed order, sharded across ranks."""

    @abstractmethod
    def num_train_blocks(self) -> int:
        """Training blocks per epoch, all ranks together."""

    @abstractmethod
    def unigram_entropy(self, max_tokens: int) -> float:
        """Entropy (nats) of the training tokens' unigram distribution."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """What the pipeline saves beside the DataModule's position in a checkpoint."""

    @abstractmethod
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Read back what :meth:`state_dict` saved (the position is restored already)."""
