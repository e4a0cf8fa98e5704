# Copyright 2025 The ULMFiT-HF Authors. Licensed under the Apache License, Version 2.0.
"""Building tokenizers from a corpus.

- `train_fastai_tokenizer`: the word-level `AwdLstmTokenizer` with the vocabulary that fastai's `make_vocab` would
  build from the same texts (ULMFiT).
- `train_subword_tokenizer`: a SentencePiece-style unigram (or BPE) tokenizer trained with the `tokenizers` library,
  as MultiFiT uses, saved as a plain `tokenizer.json` that `AutoTokenizer.from_pretrained` loads with no custom code.

Both take the corpus as a `datasets.Dataset` (with a text column), an iterable of strings, or text files (plain or
gzip; one document per non-blank line).
"""

import itertools
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, concatenate_datasets
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from modeling_awd_lstm.tokenization_awd_lstm import (
    BOS,
    EOS,
    FASTAI_SPECIAL_TOKENS,
    PAD,
    UNK,
    VOCAB_PADDING_TOKEN,
    AwdLstmTokenizer,
)

from .data import DataSpec, load_data
from .data.lm_streams import PARALLEL_MIN_DOCUMENTS

# Subword tokenizers keep fastai's ids for the four roles, so an AWD-LSTM config's pad/bos/eos ids fit both kinds.
SUBWORD_SPECIAL_TOKENS = [UNK, PAD, BOS, EOS]


def _documents(source, text_column: str, encoding: str) -> tuple[Iterator[tuple[str, object]], int | None]:
    """(where, document) pairs from any supported source, and their number when known (for the progress bar)."""
    if isinstance(source, (DatasetDict, IterableDatasetDict)):
        raise TypeError(f"Got a dataset with splits {list(source)}; pass one split, e.g. `dataset['train']`.")
    if isinstance(source, (Dataset, IterableDataset)):
        if source.column_names is not None and text_column not in source.column_names:
            raise KeyError(
                f"The dataset has no column {text_column!r} (columns: {source.column_names}); pass `text_column=` "
                "the name of the column that holds the text."
            )
        texts = (text for batch in source.iter(batch_size=1000) for text in batch[text_column])
        total = source.num_rows if isinstance(source, Dataset) else None
        return ((f"row {i} of column {text_column!r}", text) for i, text in enumerate(texts)), total

    if isinstance(source, (str, os.PathLike)):
        source = [Path(source)]
    if isinstance(source, (list, tuple)) and source and all(isinstance(p, os.PathLike) for p in source):
        missing = [str(p) for p in source if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"No such text file(s): {missing}. Pass existing plain or .gz text files.")
        files = [load_data(DataSpec(path=str(path), format="text", encoding=encoding)) for path in source]
        return _documents(concatenate_datasets(files), "text", encoding)

    if isinstance(source, Iterable):
        total = len(source) if hasattr(source, "__len__") else None
        return ((f"item {i}", text) for i, text in enumerate(source)), total
    raise TypeError(
        f"Cannot read texts from a {type(source).__name__}: pass a datasets.Dataset, an iterable of str, or text "
        "file path(s)."
    )


def iter_texts(
    source, text_column: str = "text", encoding: str = "utf-8", show_progress: bool = True, desc: str = "Reading texts"
) -> Iterator[str]:
    """The documents of `source`, checked to be strings, with a progress bar.

    Args:
        source: a `datasets.Dataset` with a `text_column`, an iterable of str, or the path of a text file (str or
            `Path`) or a list of `Path`s; files are plain or gzip text, one document per non-blank line.
        text_column: the dataset column that holds the text.
        encoding: the files' encoding (TREC, for one, is "latin-1").
    """
    documents, total = _documents(source, text_column, encoding)  # bad sources fail here, before any work

    def checked() -> Iterator[str]:
        n = 0
        for where, text in tqdm(documents, total=total, desc=desc, unit=" docs", disable=not show_progress):
            if not isinstance(text, str):
                raise TypeError(f"Expected text, got {type(text).__name__} at {where}: {text!r:.80}. Fix or drop it.")
            n += 1
            yield text
        if n == 0:
            raise ValueError("The corpus is empty: there is no text to build a tokenizer from.")

    return checked()


def make_vocab(
    counter: Counter, min_freq: int = 3, max_vocab: int = 60000, special_tokens: list[str] | None = None
) -> list[str]:
    """fastai's `make_vocab`, to the token: the `max_vocab` most common tokens seen at least `min_freq` times,
    special tokens first, padded with "xxfake" to a multiple of 8 (fastai adds 8 when already a multiple)."""
    special_tokens = FASTAI_SPECIAL_TOKENS if special_tokens is None else special_tokens
    vocab = [token for token, count in counter.most_common(max_vocab) if count >= min_freq]
    vocab = list(special_tokens) + [token for token in vocab if token not in special_tokens]
    vocab = vocab[:max_vocab]
    return vocab + [VOCAB_PADDING_TOKEN] * (8 - len(vocab) % 8)


def train_fastai_tokenizer(
    source,
    max_vocab: int = 60000,
    min_freq: int = 3,
    text_column: str = "text",
    lang: str = "en",
    encoding: str = "utf-8",
    show_progress: bool = True,
    num_proc: int | None = None,
) -> AwdLstmTokenizer:
    """The ULMFiT word-level tokenizer for a corpus, with fastai's vocabulary for it.

    Tokens are counted as fastai's `tokenize_df` counts them (every document starts with xxbos, documents in order, so
    ties in frequency keep fastai's order), then `make_vocab(counter, min_freq, max_vocab)` picks the vocabulary.
    `num_proc` processes count (default: one per core for a dataset or list of 20,000 documents or more).
    """
    tokenizer = AwdLstmTokenizer(vocab=list(FASTAI_SPECIAL_TOKENS), lang=lang)  # the rules and spaCy need no vocab
    texts = iter_texts(source, text_column, encoding, show_progress, desc="Tokenizing (fastai rules + spaCy)")
    counter = Counter()
    if num_proc is None:
        num_proc = os.cpu_count() if _num_documents(source) >= PARALLEL_MIN_DOCUMENTS else 1
    if num_proc <= 1:
        for text in texts:
            _count_document(counter, tokenizer, text)
    else:
        # Chunks come back in order and Counter.update keeps first-seen order, so ties in frequency (and with them
        # the vocabulary) are exactly those of counting in one process.
        with multiprocessing.Pool(num_proc, initializer=_start_counting_worker, initargs=(tokenizer,)) as pool:
            for chunk_counter in pool.imap(_count_chunk, _chunks(texts, COUNTING_CHUNK_DOCUMENTS)):
                counter.update(chunk_counter)
    return AwdLstmTokenizer(vocab=make_vocab(counter, min_freq=min_freq, max_vocab=max_vocab), lang=lang)


# Counting goes in chunks of this many documents (one process per core above `PARALLEL_MIN_DOCUMENTS`).
COUNTING_CHUNK_DOCUMENTS = 200
_worker_tokenizer: AwdLstmTokenizer | None = None


def _num_documents(source) -> int:
    return source.num_rows if isinstance(source, Dataset) else len(source) if isinstance(source, (list, tuple)) else 0


def _count_document(counter: Counter, tokenizer: AwdLstmTokenizer, text: str) -> None:
    counter.update([BOS, *tokenizer.tokenize(text)])


def _chunks(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(texts, size)):
        yield chunk


def _start_counting_worker(tokenizer: AwdLstmTokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _count_chunk(texts: list[str]) -> Counter:
    counter = Counter()
    for text in texts:
        _count_document(counter, _worker_tokenizer, text)
    return counter


def train_subword_tokenizer(
    source,
    vocab_size: int = 15000,
    model: Literal["unigram", "bpe"] = "unigram",
    text_column: str = "text",
    encoding: str = "utf-8",
    show_progress: bool = True,
) -> PreTrainedTokenizerFast:
    """A subword tokenizer for a new model: SentencePiece-style unigram (MultiFiT's choice, 15k pieces) or BPE.

    The text is NFKC-normalised and split on spaces with a Metaspace pre-tokenizer that marks a word preceded by a
    space with "▁" (prepend_scheme="never": the first word of a text gets no mark). Decoding turns each "▁" back into
    a space, so `decode(encode(text))` gives the text back and the tokens that continue a text (as a text-generation
    pipeline decodes them) start with their separating space. `add_special_tokens=True` puts xxbos in front; the
    special tokens xxunk, xxpad, xxbos, xxeos have ids 0-3, as in fastai vocabularies.
    """
    if model == "unigram":
        backend = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=SUBWORD_SPECIAL_TOKENS, unk_token=UNK, show_progress=False
        )
    elif model == "bpe":
        backend = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SUBWORD_SPECIAL_TOKENS, show_progress=False
        )
    else:
        raise ValueError(f"model must be 'unigram' or 'bpe', got {model!r}.")
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")

    texts = iter_texts(source, text_column, encoding, show_progress, desc=f"Training a {model} tokenizer")
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )


__all__ = ["iter_texts", "make_vocab", "train_fastai_tokenizer", "train_subword_tokenizer"]
