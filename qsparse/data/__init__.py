"""Data pipeline: corpora, tokenizers, pretraining and SFT LightningDataModules.

Public API::

    PretrainDataModule(corpus="wiki_en" | data_files=..., tokenizer=None | path, seq_len,
                       streaming=False | True, ...)   # token cache | streamed files
    SFTDataModule(corpus="wiki_qa" | data_files=..., tokenizer=None | path, packing, ...)
    resolve_corpus(...), available_corpora(), sft_corpus_file(name)
    read_documents(corpus or file), load_documents(spec)   # the one document reader
    train_bpe_tokenizer(texts, vocab_size), load_tokenizer(path)
    RandomTokenDataModule(vocab_size, seq_len, ...)   # uniform random tokens (data=random)

The DataModules are stateful (``state_dict`` = position in the training stream) for exact
resume; see :mod:`qsparse.data.resumable`.
"""

from .corpora import available_corpora, register_corpus, resolve_corpus
from .documents import load_documents, read_documents
from .local_files import CorpusSpec
from .pretrain import PretrainDataModule
from .random_tokens import RandomTokenDataModule
from .resumable import DataPosition, ResumableSampler
from .sft import IGNORE_INDEX, SFTDataModule
from .sft_synth import sft_corpus_file
from .tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "EOS_TOKEN",
    "IGNORE_INDEX",
    "PAD_TOKEN",
    "CorpusSpec",
    "DataPosition",
    "PretrainDataModule",
    "RandomTokenDataModule",
    "ResumableSampler",
    "SFTDataModule",
    "available_corpora",
    "load_documents",
    "load_tokenizer",
    "read_documents",
    "register_corpus",
    "resolve_corpus",
    "sft_corpus_file",
    "train_bpe_tokenizer",
]
