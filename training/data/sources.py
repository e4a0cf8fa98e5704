"""Reading: `load_data` turns a `DataSpec` (a Hub dataset, or local txt / csv / json / parquet files, a folder of
text files, a folder per class like aclImdb, or TREC `.label` files) into a `datasets.Dataset`."""

import codecs
import dataclasses
import glob
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import datasets
import pyarrow as pa
from datasets.arrow_writer import SchemaInferenceError


class DataValidationError(ValueError):
    """The data cannot be trained on as given; the message names the problem and how to fix it."""


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
