"""
Data pipeline for ULMFiT.

1. Reading: `load_data` turns a `DataSpec` (a Hub dataset, or local txt / csv / json / parquet files, a folder of
   text files, a folder per class like aclImdb, or TREC `.label` files) into a `datasets.Dataset`.
2. Checking: `validate_dataset` and `encode_labels` fail early, with the offending rows and labels named, instead of
   failing deep inside training.
3. Language modelling: `tokenize_for_lm` + `TokenizedCorpus` keep every token id in one memory-mapped array, and
   `LanguageModelingStream` reads it the way fastai's `LMDataLoader` does (one long stream cut into `batch_size`
   parallel rows, read `bptt` tokens at a time, so the recurrent state carries over from one batch to the next).
4. Classification: `tokenize_for_classification`, `ClassificationCollator` (padding) and `SortedBatchSampler`
   (fastai's `SortedDL`: batches of similar lengths, so padding stays small).
"""

import codecs
import dataclasses
import glob
import itertools
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets.arrow_writer import SchemaInferenceError
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from modeling_awd_lstm.tokenization_awd_lstm import FLD

from .tokenizer_training import PARALLEL_MIN_DOCUMENTS

logger = logging.get_logger(__name__)

# How many offending rows or labels an error message lists before summarising the rest.
_MAX_LISTED = 5
# Rows per Arrow batch when scanning a whole dataset (validation, building the token array).
_SCAN_BATCH_SIZE = 10_000


class DataValidationError(ValueError):
    """The data cannot be trained on as given; the message names the problem and how to fix it."""


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------

# File extension (after removing any compression suffix) -> format name.
_EXTENSION_FORMATS = {
    ".txt": "text",
    ".tokens": "text",
    ".raw": "text",
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".label": "trec",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
# Format name -> (`datasets` packaged builder, extra builder options).
_BUILDERS = {
    "text": ("text", {}),
    "csv": ("csv", {}),
    "tsv": ("csv", {"sep": "\t"}),
    "json": ("json", {}),
    "parquet": ("parquet", {}),
}
FORMATS = (*_BUILDERS, "trec", "folder", "class_folders")


@dataclass
class DataSpec:
    """
    Where a dataset comes from and which columns hold the text and the labels.

    Args:
        path (`str`):
            A Hub dataset id (`"stanfordnlp/imdb"`, `"Salesforce/wikitext"`), a local file, a glob of local files, or
            a local folder. Local files may be gzip'd (`.gz`) or otherwise compressed.
        name (`str`, *optional*):
            The Hub dataset configuration, e.g. `"wikitext-103-raw-v1"`.
        split (`str`, *optional*):
            For a Hub dataset, the split to load (`"train"`, `"train+unsupervised"`, `"test[:10%]"`); without it the
            whole `DatasetDict` is returned. For a local folder, a subfolder to read (`aclImdb` with `split="train"`
            reads `aclImdb/train`). Not allowed for a local file: point `path` at that split's file instead.
        format (`str`, *optional*):
            One of `text` (one document per line), `csv`, `tsv`, `json` (JSON or JSON Lines), `parquet`, `trec`
            (lines `COARSE:fine question`), `folder` (one document per `.txt` file) or `class_folders` (one subfolder
            of `.txt` files per class, like `aclImdb/train/{pos,neg}`). Inferred from the path when not given.
        text_column (`str` or `list[str]`, defaults to `"text"`):
            The column holding the documents. Readers that build their own columns (`folder`, `class_folders`,
            `trec`, and `text` files) name the text column this way. Several columns (`[title, description]`) are
            read as one text, joined as fastai joins them (`join_text_fields`), in the column named by `text_key`.
        label_column (`str`, *optional*, defaults to `"label"`):
            The column holding the labels; `class_folders` names its label column this way. TREC files give
            `coarse_label` (6 classes) and `fine_label` (50 classes), as the Hub's `CogComp/trec` does.
        label_names (`list[str]`, *optional*):
            The label set, in id order. With `class_folders` only these subfolders are read (so `aclImdb/train/unsup`
            is left out with `["neg", "pos"]`); otherwise it is checked by `validate_dataset` and `encode_labels`.
        encoding (`str`, *optional*):
            Text encoding of local text, csv and json files. Defaults to UTF-8, and to Latin-1 for TREC files.
        sample_by (`str`, *optional*):
            For `text` files: `"line"` (the default; blank lines are dropped), `"paragraph"` (blocks separated by
            blank lines) or `"document"` (the whole file).
        cache_dir (`str`, *optional*):
            Where `datasets` caches what it reads; defaults to the `datasets` cache.
        description (`str`, *optional*), license (`str`, *optional*):
            What the data is and its licence, for the model card of a stage trained on it.
    """

    path: str
    name: str | None = None
    split: str | None = None
    format: str | None = None
    text_column: str | list[str] = "text"
    label_column: str | None = "label"
    label_names: list[str] | None = None
    encoding: str | None = None
    sample_by: Literal["line", "paragraph", "document"] | None = None
    cache_dir: str | None = None
    description: str | None = None
    license: str | None = None

    def __post_init__(self):
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"Unknown data format {self.format!r}; choose one of {', '.join(FORMATS)}.")
        if isinstance(self.text_column, list):
            if not self.text_column or not all(isinstance(name, str) for name in self.text_column):
                raise ValueError(f"text_column must be a column name or a list of them; got {self.text_column!r}.")
            if self.format in ("text", "trec", "folder", "class_folders"):
                raise ValueError(
                    f"format={self.format!r} reads one text per document: several text columns need csv, tsv, json, "
                    "parquet or a Hub dataset."
                )
        if self.label_names is not None and (
            not isinstance(self.label_names, (list, tuple)) or not all(isinstance(n, str) for n in self.label_names)
        ):
            raise ValueError(
                f"label_names must be a list of class names, e.g. [neg, pos]; got {self.label_names!r}."
            )
        if self.sample_by is not None and self.sample_by not in ("line", "paragraph", "document"):
            raise ValueError(f"sample_by must be 'line', 'paragraph' or 'document', not {self.sample_by!r}.")

    @property
    def text_fields(self) -> list[str]:
        """The text columns, as a list."""
        return [self.text_column] if isinstance(self.text_column, str) else list(self.text_column)

    @property
    def text_key(self) -> str:
        """The column the text is read from once its fields are joined: the text column itself when there is one."""
        return "+".join(self.text_fields)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DataSpec":
        """Build a spec from a mapping (e.g. a YAML recipe's `data:` entry), rejecting unknown keys by name."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown data spec key(s) {unknown}; the keys are {sorted(known)}.")
        return cls(**values)


def load_data(spec: DataSpec | Mapping[str, Any] | str) -> datasets.Dataset | datasets.DatasetDict:
    """
    Read the dataset a `DataSpec` describes (a plain string is taken as `DataSpec(path=...)`).

    Returns a `datasets.Dataset`, or a `datasets.DatasetDict` for a Hub dataset loaded without `split`. Local sources
    always give one `Dataset`. The result is not validated: call `validate_dataset` before training on it.
    """
    if isinstance(spec, str):
        spec = DataSpec(path=spec)
    elif isinstance(spec, Mapping):
        spec = DataSpec.from_dict(spec)

    path = os.path.expanduser(spec.path)
    if os.path.isdir(path):
        return _read_folder(spec, path)
    if os.path.isfile(path) or glob.glob(path):
        return _read_files(spec, path)
    if _looks_like_local_path(path):
        raise FileNotFoundError(
            f"No file or folder matches {spec.path!r}; check the path (relative to {os.getcwd()})."
        )
    if spec.format is not None:
        raise ValueError(
            f"format={spec.format!r} applies to local files, but {spec.path!r} does not exist locally and is read "
            "as a Hub dataset id; fix the path or drop `format`."
        )
    return datasets.load_dataset(spec.path, spec.name, split=spec.split, cache_dir=spec.cache_dir)


def _looks_like_local_path(path: str) -> bool:
    return path.startswith((".", "/", "~")) or _infer_file_format(path) is not None


def _infer_file_format(path: str) -> str | None:
    name = path.lower()
    if _is_compressed(name):
        name = os.path.splitext(name)[0]
    return _EXTENSION_FORMATS.get(os.path.splitext(name)[1])


def _read_files(spec: DataSpec, path: str) -> datasets.Dataset:
    if spec.split is not None:
        raise ValueError(
            f"split={spec.split!r} selects a split of a Hub dataset or a subfolder of a local folder, but "
            f"{spec.path!r} is a file: point `path` at the file holding that split and drop `split`."
        )
    data_format = spec.format or _infer_file_format(path)
    if data_format is None:
        raise ValueError(
            f"Cannot tell the format of {spec.path!r} from its extension; set `format` to one of {', '.join(FORMATS)}."
        )
    if data_format in ("folder", "class_folders"):
        raise ValueError(f"format={data_format!r} needs a folder, but {spec.path!r} is a file.")
    if data_format == "trec":
        return _read_trec(spec, path)

    builder, options = _BUILDERS[data_format]
    if builder != "parquet":
        options = {**options, "encoding": spec.encoding or "utf-8"}
    if builder == "text":
        options["sample_by"] = spec.sample_by or "line"
    dataset = _load_local(builder, path, spec, **options)
    if builder == "text":
        dataset = _name_text_column(dataset, spec.text_column)
        if options["sample_by"] == "line":
            # A blank line separates documents; it is not a document itself.
            dataset = dataset.filter(_has_text, input_columns=spec.text_column, batched=True)
    return dataset


def _load_local(builder: str, path: str | list[str], spec: DataSpec, **options) -> datasets.Dataset:
    """`datasets.load_dataset` on local files, turning a decoding failure into an error that names the fix."""
    if isinstance(path, str):
        files = [path] if os.path.isfile(path) else sorted(glob.glob(path))
    else:
        files = path
    encoding = options.get("encoding")
    if encoding is not None and codecs.lookup(encoding).name != "utf-8" and any(map(_is_compressed, files)):
        # `datasets` decompresses on the fly as UTF-8 whatever the encoding; decompress (cached) first instead.
        download_config = datasets.DownloadConfig(cache_dir=spec.cache_dir)
        files = [str(file) for file in datasets.DownloadManager(download_config=download_config).extract(files)]
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=spec.cache_dir, **options)
    except Exception as error:
        cause = error
        while cause is not None and not isinstance(cause, (UnicodeDecodeError, pa.ArrowInvalid, SchemaInferenceError)):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, SchemaInferenceError) or "corresponds to no data" in str(error):
            raise DataValidationError(
                f"{spec.path!r} holds no data (an empty file, or a header alone): give it some text."
            ) from error
        if isinstance(cause, UnicodeDecodeError):
            raise DataValidationError(
                f"{spec.path!r} is not valid {encoding} text ({cause}); set `encoding` in the data spec to the files' "
                "encoding (e.g. 'latin-1')."
            ) from error
        if isinstance(cause, pa.ArrowInvalid):
            raise DataValidationError(
                f"{spec.path!r} could not be read as {builder}: {cause}. Fix or remove that row."
            ) from error
        raise


def _is_compressed(path: str) -> bool:
    return path.lower().endswith(_COMPRESSION_SUFFIXES)


def _name_text_column(dataset: datasets.Dataset, text_column: str) -> datasets.Dataset:
    # The `text` builder always calls its column "text".
    return dataset if text_column == "text" else dataset.rename_column("text", text_column)


def _has_text(texts: list[str]) -> list[bool]:
    return [bool(text.strip()) for text in texts]


def _read_trec(spec: DataSpec, path: str) -> datasets.Dataset:
    lines = _load_local("text", path, spec, encoding=spec.encoding or "latin-1")
    lines = lines.filter(_has_text, input_columns="text", batched=True)
    return lines.map(
        _parse_trec_lines,
        batched=True,
        input_columns="text",
        remove_columns=["text"],
        fn_kwargs={"text_column": spec.text_column, "path": spec.path},
    )


def _parse_trec_lines(lines: list[str], text_column: str, path: str) -> dict[str, list[str]]:
    texts, coarse, fine = [], [], []
    for line in lines:
        label, _, question = line.strip().partition(" ")
        if ":" not in label or not question:
            raise DataValidationError(
                f"{path!r} has a line that is not `COARSE:fine question`: {line!r}; is it a TREC file (format='trec')?"
            )
        texts.append(question)
        coarse.append(label.split(":", 1)[0])
        fine.append(label)
    return {text_column: texts, "coarse_label": coarse, "fine_label": fine}


def _read_folder(spec: DataSpec, path: str) -> datasets.Dataset:
    if spec.split is not None:
        split_path = os.path.join(path, spec.split)
        if not os.path.isdir(split_path):
            subfolders = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
            raise FileNotFoundError(
                f"split={spec.split!r} names a subfolder of {spec.path!r}, but there is none; its subfolders are "
                f"{subfolders}."
            )
        path = split_path

    class_folders = {
        entry.name: files
        for entry in sorted(os.scandir(path), key=lambda entry: entry.name)
        if entry.is_dir() and (files := _text_files(entry.path))
    }
    data_format = spec.format or ("class_folders" if class_folders else "folder")
    if data_format == "folder":
        files = _text_files(path)
        if not files:
            raise FileNotFoundError(f"{path!r} holds no .txt files (nor subfolders of them) to read.")
        return _read_documents(spec, files)
    if data_format != "class_folders":
        raise ValueError(
            f"{spec.path!r} is a folder; format must be 'folder' or 'class_folders', not {data_format!r}."
        )
    if spec.label_column is None:
        raise ValueError("format='class_folders' gives each document a label; set `label_column` to name it.")

    class_names = list(spec.label_names) if spec.label_names is not None else list(class_folders)
    missing = [name for name in class_names if name not in class_folders]
    if missing:
        raise FileNotFoundError(
            f"No folder of .txt files for class(es) {missing} in {path!r}; the class folders are "
            f"{list(class_folders)}."
        )
    label_feature = datasets.ClassLabel(names=class_names)
    parts = []
    for label_id, class_name in enumerate(class_names):
        documents = _read_documents(spec, class_folders[class_name])
        parts.append(documents.add_column(spec.label_column, [label_id] * len(documents), feature=label_feature))
    return datasets.concatenate_datasets(parts)


def _text_files(folder: str) -> list[str]:
    pattern = os.path.join(glob.escape(folder), "*.txt")
    return sorted(glob.glob(pattern) + glob.glob(pattern + ".gz"))


def _read_documents(spec: DataSpec, files: list[str]) -> datasets.Dataset:
    """One document per file."""
    dataset = _load_local("text", files, spec, encoding=spec.encoding or "utf-8", sample_by="document")
    return _name_text_column(dataset, spec.text_column)


# --------------------------------------------------------------------------------------------------------------------
# Checking and labels
# --------------------------------------------------------------------------------------------------------------------


def validate_dataset(
    dataset: datasets.Dataset,
    text_column: str | Sequence[str] = "text",
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    problem_type: str | None = None,
) -> None:
    """
    Check, before any training, that `dataset` can be trained on; raise `DataValidationError` naming the problem.

    Checks that the text column or columns (and the label column, when given) exist, that every text is a non-empty
    string, and that every label belongs to the label set (`label_names`, or the ids `0..n-1` for integer labels).
    """
    if len(dataset) == 0:
        raise DataValidationError("The dataset has no rows (an empty file, or a header alone): give it some text.")
    text_columns = [text_column] if isinstance(text_column, str) else list(text_column)
    _check_columns(dataset, text_columns + ([label_column] if label_column is not None else []))
    for column in text_columns:
        _check_texts(dataset, column)
    if label_column is not None:
        encode_targets(dataset, label_column, label_names, problem_type, check_only=True)


FIELD_SEPARATOR = "\n"  # between the fields of a text for subword tokenizers, which have no field marker


def join_fields(fields: Sequence[str], fastai_markers: bool) -> str:
    """One text from several fields. For fastai's tokenizer as `Tokenizer.from_df(text_cols=[...])` joins them, each
    field after its marker and number (`xxfld 1 <title> xxfld 2 <description>`); for others, one per line."""
    if not fastai_markers:
        return FIELD_SEPARATOR.join(fields)
    return " ".join(f"{FLD} {number} {field}" for number, field in enumerate(fields, 1))


def join_text_fields(dataset: datasets.Dataset, spec: DataSpec, fastai_markers: bool) -> datasets.Dataset:
    """`dataset` with the text of `spec`'s text columns joined (`join_fields`) into the column `spec.text_key`; a
    single text column is left as it is."""
    if isinstance(spec.text_column, str):
        return dataset
    columns = spec.text_fields
    _check_columns(dataset, columns)
    return dataset.map(
        lambda batch: {spec.text_key: [join_fields(row, fastai_markers) for row in zip(*(batch[c] for c in columns))]},
        batched=True, desc=f"Joining {', '.join(columns)}",
    )


def _check_columns(dataset: datasets.Dataset, columns: list[str]) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise DataValidationError(
            f"The dataset has no column {', '.join(map(repr, missing))}; its columns are {dataset.column_names}. "
            "Set text_column / label_column in the data spec to the right names."
        )


def _check_texts(dataset: datasets.Dataset, text_column: str) -> None:
    feature = dataset.features[text_column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataValidationError(
            f"Column {text_column!r} holds {feature}, not strings, in every row (rows "
            f"{_list_rows(range(len(dataset)))}); point text_column at the column holding the raw text."
        )
    bad_rows, num_bad = [], 0
    column = dataset.select_columns([text_column]).with_format("arrow")
    for start, batch in _iter_batches(column):
        texts = batch.column(text_column)
        bad = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0), True)
        indices = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
        num_bad += len(indices)
        bad_rows.extend((start + indices[: _MAX_LISTED - len(bad_rows)]).tolist())
    if num_bad:
        raise DataValidationError(
            f"Column {text_column!r} has {num_bad} empty or missing text(s), at rows {_list_rows(bad_rows, num_bad)}. "
            "Drop them first, e.g. `dataset.filter(lambda text: bool(text and text.strip()), "
            f"input_columns={text_column!r})`."
        )


def _iter_batches(dataset: datasets.Dataset) -> Iterator[tuple[int, pa.Table]]:
    """Arrow batches of a dataset in `arrow` format, with the row index each batch starts at."""
    start = 0
    for batch in dataset.iter(batch_size=_SCAN_BATCH_SIZE):
        yield start, batch
        start += batch.num_rows


def _list_rows(rows: Sequence[int], total: int | None = None) -> str:
    """The first few row indices, e.g. "2, 7, 9, 11, 15 and 40 more"."""
    listed = list(itertools.islice(rows, _MAX_LISTED))
    total = len(rows) if total is None else total
    text = ", ".join(str(row) for row in listed)
    return text + (f" and {total - len(listed)} more" if total > len(listed) else "")


def _label_mapping(
    dataset: datasets.Dataset, label_column: str, label_names: Sequence[str] | None
) -> tuple[list[str], dict[Any, int]]:
    """
    The label set and how each raw label value maps to its id; raise if some label is not in the set.

    Raw values are names (strings), ids (integers) or `ClassLabel` ids (mapped through the feature's names).
    """
    _check_columns(dataset, [label_column])
    feature = dataset.features[label_column]
    values = dataset.unique(label_column)
    if isinstance(feature, datasets.ClassLabel):
        names = list(label_names) if label_names is not None else feature.names
        known = {name: index for index, name in enumerate(names)}
        mapping = {i: known[name] for i, name in enumerate(feature.names) if name in known}
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        names = list(label_names) if label_names is not None else sorted(v for v in values if v is not None)
        mapping = {name: index for index, name in enumerate(names)}
    elif isinstance(feature, datasets.Value) and "int" in feature.dtype:
        # Integer labels are ids already; without names the set is 0..max.
        ids = [v for v in values if v is not None]
        names = list(label_names) if label_names is not None else [str(i) for i in range(max(ids, default=-1) + 1)]
        mapping = {i: i for i in range(len(names))}
    else:
        raise DataValidationError(
            f"Label column {label_column!r} holds {feature}; labels must be class names (strings) or ids (integers)."
        )

    unknown = [value for value in values if value not in mapping]
    if unknown:
        unknown_rows = _rows_with_values(dataset, label_column, unknown)
        if isinstance(feature, datasets.ClassLabel):
            unknown = [feature.names[v] if 0 <= v < feature.num_classes else v for v in unknown]
        label_set = f"the label set {names} (ids 0..{len(names) - 1})" if names else "any label set (there is none)"
        raise DataValidationError(
            f"Label column {label_column!r} has label(s) {sorted(unknown, key=str)} outside {label_set}, at rows "
            f"{_list_rows(unknown_rows)}. Drop those rows (unlabeled rows are often marked -1) or set label_names to "
            "the full label set."
        )
    return names, mapping


def _rows_with_values(dataset: datasets.Dataset, column: str, values: list[Any]) -> list[int]:
    rows = []
    value_set = set(values)
    for start, batch in _iter_batches(dataset.select_columns([column]).with_format("arrow")):
        rows.extend(start + i for i, value in enumerate(batch.column(column).to_pylist()) if value in value_set)
    return rows


def encode_labels(
    dataset: datasets.Dataset, label_column: str = "label", label_names: Sequence[str] | None = None
) -> tuple[datasets.Dataset, dict[str, int], dict[int, str]]:
    """
    Turn the label column into class ids (a `ClassLabel` column), from label names or ids.

    Args:
        dataset: the dataset to encode.
        label_column: the column holding the labels (names, integer ids or a `ClassLabel`).
        label_names: the label set in id order. Defaults to the `ClassLabel` names, the sorted label names, or
            `"0".."n-1"` for integer ids.

    Returns:
        `(dataset, label2id, id2label)`, ready for `AwdLstmConfig(label2id=..., id2label=...)`.
    """
    names, mapping = _label_mapping(dataset, label_column, label_names)
    features = dataset.features.copy()
    features[label_column] = datasets.ClassLabel(names=names)
    if features != dataset.features:
        dataset = dataset.map(
            _map_labels,
            batched=True,
            input_columns=label_column,
            fn_kwargs={"label_column": label_column, "mapping": mapping},
            features=features,
        )
    label2id = {name: index for index, name in enumerate(names)}
    return dataset, label2id, {index: name for name, index in label2id.items()}


def _map_labels(labels: list[Any], label_column: str, mapping: dict[Any, int]) -> dict[str, list[int]]:
    return {label_column: [mapping[label] for label in labels]}


SINGLE_LABEL, MULTI_LABEL, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
PROBLEM_TYPES = (SINGLE_LABEL, MULTI_LABEL, REGRESSION)


def infer_problem_type(dataset: datasets.Dataset, label_column: str) -> str:
    """What a label column asks for, in transformers' `problem_type` names: lists of class names are multi-label,
    floats are regression, and class names or integer ids are single-label classes."""
    _check_columns(dataset, [label_column])
    feature = dataset.features[label_column]
    if not isinstance(feature, (datasets.Value, datasets.ClassLabel, datasets.List, datasets.Sequence)):
        raise DataValidationError(
            f"Label column {label_column!r} mixes kinds of labels ({feature}): give every row a class name, every row "
            "a list of class names (multi-label), or every row a number (regression)."
        )
    if isinstance(feature, (datasets.List, datasets.Sequence)):
        return MULTI_LABEL
    if isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
        return REGRESSION
    return SINGLE_LABEL


def encode_targets(
    dataset: datasets.Dataset,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    problem_type: str | None = None,
    check_only: bool = False,
) -> tuple[datasets.Dataset, dict[str, int], dict[int, str], str]:
    """
    The label column as the classifier's targets, for any `problem_type` (inferred from the column when None):
    class ids for single-label classes (`encode_labels`), multi-hot floats over `label_names` (default: every class
    named, sorted) for multi-label lists, floats for regression.

    Returns `(dataset, label2id, id2label, problem_type)`; with `check_only` the dataset is checked, not converted.
    """
    problem_type = problem_type or infer_problem_type(dataset, label_column)
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"Unknown problem_type {problem_type!r}; choose one of {', '.join(PROBLEM_TYPES)}.")
    if problem_type == SINGLE_LABEL:
        if check_only:
            _label_mapping(dataset, label_column, label_names)
            return dataset, {}, {}, problem_type
        return (*encode_labels(dataset, label_column, label_names), problem_type)
    if problem_type == REGRESSION:
        names = [label_column]
        feature = dataset.features[label_column]
        if not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint", "float"))):
            raise DataValidationError(f"Label column {label_column!r} holds {feature}; regression needs numbers.")
        values = np.asarray([np.nan if v is None else v for v in dataset[label_column]], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise DataValidationError(
                f"Label column {label_column!r} has missing or infinite values at rows {_list_rows(bad)}: drop or fill "
                "those rows."
            )
        if not check_only:
            dataset = dataset.cast_column(label_column, datasets.Value("float32"))
    else:
        feature = dataset.features[label_column]
        if not isinstance(feature, (datasets.List, datasets.Sequence)) or feature.feature != datasets.Value("string"):
            raise DataValidationError(
                f"Label column {label_column!r} holds {feature}; multi-label classes are lists of class names."
            )
        present = sorted({name for row in dataset[label_column] for name in (row or [])})
        names = list(label_names) if label_names is not None else present
        unknown = sorted(set(present) - set(names))
        if unknown:
            raise DataValidationError(
                f"Label column {label_column!r} names {unknown} outside the label set {names}: add them to "
                "label_names, or drop them from the data."
            )
        if not check_only:
            index = {name: i for i, name in enumerate(names)}

            def multi_hot(rows: list[list[str] | None]) -> dict[str, list[list[float]]]:
                hot = np.zeros((len(rows), len(names)), dtype=np.float32)
                for row, labels in enumerate(rows):
                    hot[row, [index[name] for name in labels or []]] = 1.0
                return {label_column: hot.tolist()}

            features = dataset.features.copy()
            features[label_column] = datasets.List(datasets.Value("float32"))
            dataset = dataset.map(multi_hot, batched=True, input_columns=label_column, features=features)
    label2id = {name: i for i, name in enumerate(names)}
    return dataset, label2id, {i: name for name, i in label2id.items()}, problem_type


# --------------------------------------------------------------------------------------------------------------------
# Language-model streams
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Classification batches
# --------------------------------------------------------------------------------------------------------------------


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
