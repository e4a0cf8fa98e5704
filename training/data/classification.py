"""Classification batches: `tokenize_for_classification`, `ClassificationCollator` (padding) and
`SortedBatchSampler` (fastai's `SortedDL`: batches of similar lengths, so padding stays small)."""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .checks import _check_columns
from .lm_streams import _tokenize_batch


def tokenize_for_classification(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str = "text",
    label_column: str | None = "label",
    max_length: int | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """
    Tokenize documents for classification (batched and cached by `datasets.map`).

    Returns a dataset with `input_ids`, `length` (for `SortedBatchSampler`) and, when `label_column` is given,
    `labels` (run `encode_labels` first so they are class ids). ULMFiT reads whole documents, so nothing is cut
    unless `max_length` is set (then the tokenizer's `truncation_side` decides which end goes).
    """
    _check_columns(dataset, [text_column] + ([label_column] if label_column is not None else []))
    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        input_columns=text_column,
        remove_columns=[column for column in dataset.column_names if column != label_column],
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        num_proc=num_proc,
        desc="Tokenizing",
    )
    if label_column is not None and label_column != "labels":
        tokenized = tokenized.rename_column(label_column, "labels")
    return tokenized


@dataclass
class ClassificationCollator:
    """
    Pad a list of tokenized examples into a batch: `input_ids`, `attention_mask` and (when present) `labels`.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): gives the pad id (`tokenizer.pad_token_id`).
        padding_side (`str`, *optional*): `"left"` (fastai pads classifier inputs first) or `"right"`; defaults to
            `tokenizer.padding_side`.
    """

    tokenizer: PreTrainedTokenizerBase
    padding_side: Literal["left", "right"] | None = None

    def __post_init__(self):
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                "The tokenizer has no pad token, so classification batches cannot be padded; set one, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token`."
            )
        self.padding_side = self.padding_side or self.tokenizer.padding_side
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {self.padding_side!r}.")

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(feature["input_ids"]) for feature in features]
        input_ids = torch.full((len(features), max(lengths)), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            columns = slice(input_ids.shape[1] - length, None) if self.padding_side == "left" else slice(0, length)
            input_ids[row, columns] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            attention_mask[row, columns] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "labels" in features[0]:
            labels = [feature["labels"] for feature in features]
            # Class ids for single-label classes; multi-hot rows (multi-label) and numbers (regression) stay floats.
            integral = isinstance(labels[0], (int, np.integer))
            batch["labels"] = torch.tensor(labels, dtype=torch.long if integral else torch.float32)
        return batch


class SortedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """
    Batches of examples of similar length, as fastai's `SortedDL` makes, so that little of each batch is padding.

    For training (`shuffle=True`) the examples are shuffled (seeded by `seed + epoch`), cut into chunks of
    `batch_size * chunk_batches` examples, each chunk is sorted by decreasing length and cut into batches, and the
    batches are shuffled, except that the first batch (which holds the longest example, so memory runs out at once if
    it is going to) and the last, possibly smaller, batch stay in place. For evaluation (`shuffle=False`) the examples
    are sorted by decreasing length. Every example appears exactly once per epoch (the last partial batch is dropped
    only with `drop_last`).

    Use it as `DataLoader(dataset, batch_sampler=SortedBatchSampler(dataset["length"], batch_size), collate_fn=...)`.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        chunk_batches: int = 50,
        drop_last: bool = False,
    ):
        if batch_size < 1 or chunk_batches < 1:
            raise ValueError(f"batch_size and chunk_batches must be positive; got {batch_size} and {chunk_batches}.")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.chunk_batches = chunk_batches
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.lengths) // self.batch_size
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        else:
            batches = self._shuffled_batches()
        for batch in batches[: len(self)]:
            yield batch.tolist()

    def _shuffled_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(self.lengths))
        if len(order) == 0:
            return []
        longest = np.flatnonzero(order == np.argmax(self.lengths))[0]
        order[[0, longest]] = order[[longest, 0]]
        chunk_size = self.batch_size * self.chunk_batches
        order = np.concatenate(
            [
                chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                for chunk in (order[i : i + chunk_size] for i in range(0, len(order), chunk_size))
            ]
        )
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if len(batches) <= 2:
            return batches
        middle = [batches[i] for i in rng.permutation(np.arange(1, len(batches) - 1))]
        return [batches[0], *middle, batches[-1]]
