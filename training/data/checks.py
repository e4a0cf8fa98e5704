"""Checking and labels: `validate_dataset`, `encode_labels` and `encode_targets` fail early, with the offending rows
and labels named, instead of failing deep inside training; `join_text_fields` joins several text columns into one."""

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from modeling_awd_lstm.tokenization_awd_lstm import FLD

from .sources import DataSpec, DataValidationError

# How many offending rows or labels an error message lists before summarising the rest.
_MAX_LISTED = 5
# Rows per Arrow batch when scanning a whole dataset (validation, building the token array).
_SCAN_BATCH_SIZE = 10_000


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
