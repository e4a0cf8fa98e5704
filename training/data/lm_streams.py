"""Language modelling: `tokenize_for_lm` + `TokenizedCorpus` keep every token id in one memory-mapped array, and
`LanguageModelingStream` reads it the way fastai's `LMDataLoader` does (one long stream cut into `batch_size`
parallel rows, read `bptt` tokens at a time, so the recurrent state carries over from one batch to the next)."""

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from .checks import _check_columns, _iter_batches
from .sources import DataValidationError

# Above this many documents a corpus is tokenized by one process per core (here, and when a fastai vocabulary is
# counted in `ulmfit.tokenizer_training`).
PARALLEL_MIN_DOCUMENTS = 20_000


def tokenize_for_lm(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str = "text",
    num_proc: int | None = None,
    backwards: bool = False,
) -> datasets.Dataset:
    """Tokenize every document (batched and cached by `datasets.map`) into `input_ids` (and their `length`).

    `backwards` reverses each document's ids (its `xxbos` last), as fastai's `backwards=True` does for a language
    model that reads text from the end; a backward classifier reverses its documents itself (`config.backwards`).
    """
    _check_columns(dataset, [text_column])
    if num_proc is None and len(dataset) >= PARALLEL_MIN_DOCUMENTS:
        num_proc = os.cpu_count()
    return dataset.map(
        _tokenize_batch,
        batched=True,
        input_columns=text_column,
        remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_length": None, "backwards": backwards},
        num_proc=num_proc,
        # Keyed by what decides the ids, not by the tokenizer object: one rebuilt or reloaded from a checkpoint (as
        # a resumed stage does) finds the same cached tokens.
        new_fingerprint=Hasher.hash([dataset._fingerprint, text_column, backwards, tokenizer_fingerprint(tokenizer)]),
        desc="Tokenizing",
    )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides a tokenizer's ids (its class, vocabulary and rules), wherever it was loaded from."""
    if getattr(tokenizer, "is_fast", False):
        state = [type(tokenizer).__name__, tokenizer.backend_tokenizer.to_str()]
    else:
        vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        state = [type(tokenizer).__name__, vocabulary, getattr(tokenizer, "lang", None),
                 getattr(tokenizer, "special_tokens_pattern", None)]
    return Hasher.hash(state)


def _tokenize_batch(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int | None, backwards: bool = False
) -> dict[str, list]:
    encoded = tokenizer(
        texts,
        truncation=max_length is not None,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    ids = [row[::-1] for row in encoded["input_ids"]] if backwards else encoded["input_ids"]
    return {"input_ids": ids, "length": [len(row) for row in ids]}


class TokenizedCorpus:
    """
    Every document's token ids, back to back in one flat memory-mapped array, plus where each document starts.

    Tokens are stored as `uint16` when the vocabulary fits (up to 65,536 ids) and `uint32` otherwise, so a
    WikiText-103-size corpus (100M+ tokens) takes a few hundred MB on disk and almost nothing in RAM.

    Args:
        tokens (`np.ndarray`): all token ids, document after document (usually a read-only `np.memmap`).
        offsets (`np.ndarray`): `int64`, one more than the number of documents; document `i` is
            `tokens[offsets[i]:offsets[i + 1]]`.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(tokens):
            raise ValueError("offsets must run from 0 to len(tokens), one entry more than the number of documents.")
        self.tokens = tokens
        self.offsets = offsets

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def document_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    @classmethod
    def from_dataset(
        cls,
        dataset: datasets.Dataset,
        vocab_size: int,
        cache_dir: str | os.PathLike | None = None,
        column: str = "input_ids",
    ) -> "TokenizedCorpus":
        """
        Write a tokenized dataset's ids into a memory-mapped array, reading it in Arrow batches (never as one list).

        The array is cached under `cache_dir` by the dataset's fingerprint, so a second run (or another process of
        the same distributed job) reuses it. `cache_dir` defaults to the folder of the dataset's own cache files; a
        dataset held in memory has none, and its array goes to a temporary folder deleted with the corpus.
        """
        _check_columns(dataset, [column])
        dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
        temporary_dir = None
        if cache_dir is None and dataset.cache_files:
            cache_dir = os.path.dirname(dataset.cache_files[0]["filename"])
        if cache_dir is None:
            cache_dir = temporary_dir = tempfile.mkdtemp(prefix="lm-tokens-")
        stem = Path(cache_dir) / f"lm-tokens-{dataset._fingerprint}-{dtype.name}"
        tokens_path, offsets_path = stem.with_suffix(".tokens.npy"), stem.with_suffix(".offsets.npy")

        if not tokens_path.exists():
            _write_token_arrays(dataset, column, vocab_size, dtype, tokens_path, offsets_path)
        corpus = cls(np.load(tokens_path, mmap_mode="r"), np.load(offsets_path))
        if temporary_dir is not None:
            weakref.finalize(corpus, shutil.rmtree, temporary_dir, ignore_errors=True)
        return corpus


def _write_token_arrays(
    dataset: datasets.Dataset, column: str, vocab_size: int, dtype: np.dtype, tokens_path: Path, offsets_path: Path
) -> None:
    ids = dataset.select_columns([column]).with_format("arrow")
    lengths = [
        pc.list_value_length(batch.column(column)).to_numpy(zero_copy_only=False) for _, batch in _iter_batches(ids)
    ]
    offsets = np.zeros(len(dataset) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths) if lengths else [], out=offsets[1:])
    if offsets[-1] == 0:
        raise DataValidationError("The dataset has no tokens at all; check the text column and the tokenizer.")

    # Written under a temporary name and renamed, so an interrupted run never leaves a truncated array to be reused.
    suffix = f".tmp-{os.getpid()}"
    tokens_tmp, offsets_tmp = Path(f"{tokens_path}{suffix}"), Path(f"{offsets_path}{suffix}")
    tokens = np.lib.format.open_memmap(tokens_tmp, mode="w+", dtype=dtype, shape=(int(offsets[-1]),))
    position = 0
    for _, batch in _iter_batches(ids):
        values = pc.list_flatten(batch.column(column)).to_numpy(zero_copy_only=False)
        if len(values) and (values.min() < 0 or values.max() >= vocab_size):
            bad_id = values.min() if values.min() < 0 else values.max()
            raise DataValidationError(
                f"Token ids must lie in 0..{vocab_size - 1} (the vocabulary size given), but the dataset holds "
                f"{bad_id}; pass the tokenizer's full size, len(tokenizer)."
            )
        tokens[position : position + len(values)] = values
        position += len(values)
    tokens.flush()
    del tokens
    with open(offsets_tmp, "wb") as file:
        np.save(file, offsets)
    os.replace(offsets_tmp, offsets_path)
    # The tokens file is renamed last: its presence marks a complete pair.
    os.replace(tokens_tmp, tokens_path)


class LanguageModelingStream(torch.utils.data.IterableDataset):
    """
    Batches for language modelling with a recurrent state carried across batches, as fastai's `LMDataLoader` makes.

    At each epoch the documents are (optionally) shuffled, joined into one stream, and the stream is cut into
    `batch_size` equal parallel rows; batch `k` holds, in row `i`, the `bptt` tokens of row `i` that follow those of
    batch `k - 1`. So `input_ids[i]` of batch `k + 1` continues exactly where `input_ids[i]` of batch `k` ended, and
    `shift_labels` are the next tokens (the inputs shifted by one in the stream). Tokens that do not fill a whole row
    are dropped, and the last batch may be shorter than `bptt`.

    Each item is a whole batch: `{"input_ids": LongTensor(B, T), "shift_labels": LongTensor(B, T)}`. Wrap it as
    `torch.utils.data.DataLoader(stream, batch_size=None)` (no re-batching, no worker processes).

    Args:
        corpus (`TokenizedCorpus`): the token ids.
        batch_size (`int`): rows per batch on this process.
        bptt (`int`): tokens per row per batch (backpropagation-through-time length).
        shuffle (`bool`, defaults to `False`): shuffle the documents each epoch (seeded by `seed + epoch`); on for
            training, off for evaluation.
        seed (`int`, defaults to 0): seed for the shuffle and the variable lengths.
        variable_bptt (`bool`, defaults to `False`): draw each batch's length as AWD-LSTM does: `bptt` with
            probability 0.95 (else `bptt / 2`), plus normal noise of standard deviation 5, at least `min_seq_len`.
            Scale the learning rate of each step by `input_ids.shape[1] / bptt`, as AWD-LSTM does.
        min_seq_len (`int`, defaults to 5): the shortest length `variable_bptt` draws.
        rank (`int`, defaults to 0), world_size (`int`, defaults to 1): under distributed training the stream is cut
            into `world_size * batch_size` rows and process `rank` reads its own contiguous block of `batch_size`
            rows, so every process yields the same number of batches and no state crosses processes.
    """

    def __init__(
        self,
        corpus: TokenizedCorpus,
        batch_size: int,
        bptt: int,
        shuffle: bool = False,
        seed: int = 0,
        variable_bptt: bool = False,
        min_seq_len: int = 5,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or bptt < 1 or min_seq_len < 1:
            raise ValueError(
                f"batch_size, bptt and min_seq_len must be positive; got {batch_size}, {bptt}, {min_seq_len}."
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in 0..world_size-1; got rank={rank}, world_size={world_size}.")
        needed = world_size * batch_size * bptt + 1
        if corpus.num_tokens < needed:
            raise DataValidationError(
                f"The corpus is too small for one batch: {world_size * batch_size} rows "
                f"({world_size} process(es) x batch_size {batch_size}) of bptt {bptt} need {needed:,} tokens, but it "
                f"has {corpus.num_tokens:,}. Add text, or lower batch_size or bptt."
            )
        self.corpus = corpus
        self.batch_size = batch_size
        self.bptt = bptt
        self.shuffle = shuffle
        self.seed = seed
        self.variable_bptt = variable_bptt
        self.min_seq_len = min_seq_len
        self.rank = rank
        self.world_size = world_size
        # fastai keeps one token back so the last row still has a next token to predict.
        self.row_length = (corpus.num_tokens - 1) // (world_size * batch_size)
        self.epoch = 0
        self.batch_index = 0
        self._layout_epoch, self._layout_cache = None, None

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` (reshuffling when `shuffle`); reading restarts at its first batch."""
        if epoch != self.epoch:
            self.epoch, self.batch_index = epoch, 0

    def __len__(self) -> int:
        """Number of batches in the current epoch (it changes from epoch to epoch with `variable_bptt`)."""
        return len(self.seq_lens)

    @property
    def seq_lens(self) -> np.ndarray:
        """The length (`input_ids.shape[1]`) of every batch of the current epoch."""
        return self._layout()[2]

    def document_order(self) -> np.ndarray:
        """The order in which the current epoch joins the documents."""
        return self._layout()[0]

    def state_dict(self) -> dict[str, int]:
        """Where reading stands: the epoch and the number of its batches already yielded."""
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume reading at the batch `state_dict()` recorded; batches depend only on (seed, epoch, batch index)."""
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise RuntimeError(
                "LanguageModelingStream yields whole batches that must stay in order; load it with num_workers=0 "
                "(or 1), e.g. DataLoader(stream, batch_size=None)."
            )
        if self.batch_index >= len(self):
            self.batch_index = 0
        while self.batch_index < len(self):
            batch = self.batch(self.batch_index)
            self.batch_index += 1
            yield batch

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch `index` of the current epoch."""
        order, stream_starts, seq_lens, batch_starts = self._layout()
        if not 0 <= index < len(seq_lens):
            raise IndexError(f"batch {index} is out of range; this epoch has {len(seq_lens)} batches.")
        row_starts = (self.rank * self.batch_size + np.arange(self.batch_size)) * self.row_length
        # Stream positions read by each row: the inputs plus one more token for the last label.
        positions = row_starts[:, None] + batch_starts[index] + np.arange(seq_lens[index] + 1)
        documents = np.searchsorted(stream_starts, positions, side="right") - 1
        token_positions = self.corpus.offsets[order[documents]] + (positions - stream_starts[documents])
        window = torch.from_numpy(self.corpus.tokens[token_positions].astype(np.int64))
        return {"input_ids": window[:, :-1].contiguous(), "shift_labels": window[:, 1:].contiguous()}

    def _layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """
        The current epoch's document order, where each document starts in the joined stream, and each batch's
        length and start within a row. Only per-document and per-batch arrays: tokens are read when a batch is.
        """
        if self._layout_epoch != self.epoch:
            rng = np.random.default_rng(self.seed + self.epoch)
            num_documents = self.corpus.num_documents
            order = rng.permutation(num_documents) if self.shuffle else np.arange(num_documents)
            stream_starts = np.zeros(num_documents + 1, dtype=np.int64)
            np.cumsum(self.corpus.document_lengths[order], out=stream_starts[1:])
            seq_lens = self._draw_seq_lens(rng) if self.variable_bptt else self._fixed_seq_lens()
            batch_starts = np.concatenate([[0], np.cumsum(seq_lens)[:-1]])
            self._layout_cache = (order, stream_starts, seq_lens, batch_starts)
            self._layout_epoch = self.epoch
        return self._layout_cache

    def _fixed_seq_lens(self) -> np.ndarray:
        num_full, remainder = divmod(self.row_length, self.bptt)
        return np.array([self.bptt] * num_full + ([remainder] if remainder else []), dtype=np.int64)

    def _draw_seq_lens(self, rng: np.random.Generator) -> np.ndarray:
        # AWD-LSTM (Merity et al. 2018, main.py): bptt, or bptt/2 with probability 0.05, plus N(0, 5) noise.
        seq_lens, total = [], 0
        while total < self.row_length:
            mean = self.bptt if rng.random() < 0.95 else self.bptt / 2
            seq_len = min(max(self.min_seq_len, int(rng.normal(mean, 5))), self.row_length - total)
            seq_lens.append(seq_len)
            total += seq_len
        return np.array(seq_lens, dtype=np.int64)
