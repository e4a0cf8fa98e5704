"""
Data pipeline for ULMFiT, one module per step:

1. `sources`: `load_data` turns a `DataSpec` (a Hub dataset, or local txt / csv / json / parquet files, a folder of
   text files, a folder per class like aclImdb, or TREC `.label` files) into a `datasets.Dataset`. Every reader of
   text goes through it: stages, `ulmfit predict`, tokenizer training, experiments.
2. `checks`: `validate_dataset`, `encode_labels` and `encode_targets` fail early, with the offending rows and labels
   named, instead of failing deep inside training.
3. `lm_streams`: `tokenize_for_lm` + `TokenizedCorpus` keep every token id in one memory-mapped array, and
   `LanguageModelingStream` reads it the way fastai's `LMDataLoader` does (one long stream cut into `batch_size`
   parallel rows, read `bptt` tokens at a time, so the recurrent state carries over from one batch to the next).
4. `classification`: `tokenize_for_classification`, `ClassificationCollator` (padding) and `SortedBatchSampler`
   (fastai's `SortedDL`: batches of similar lengths, so padding stays small).
"""

from .checks import (
    FIELD_SEPARATOR,
    MULTI_LABEL,
    PROBLEM_TYPES,
    REGRESSION,
    SINGLE_LABEL,
    encode_labels,
    encode_targets,
    infer_problem_type,
    join_fields,
    join_text_fields,
    validate_dataset,
)
from .classification import ClassificationCollator, SortedBatchSampler, tokenize_for_classification
from .lm_streams import LanguageModelingStream, TokenizedCorpus, tokenize_for_lm, tokenizer_fingerprint
from .sources import FORMATS, DataSpec, DataValidationError, load_data

__all__ = [
    "FIELD_SEPARATOR",
    "FORMATS",
    "MULTI_LABEL",
    "PROBLEM_TYPES",
    "REGRESSION",
    "SINGLE_LABEL",
    "ClassificationCollator",
    "DataSpec",
    "DataValidationError",
    "LanguageModelingStream",
    "SortedBatchSampler",
    "TokenizedCorpus",
    "encode_labels",
    "encode_targets",
    "infer_problem_type",
    "join_fields",
    "join_text_fields",
    "load_data",
    "tokenize_for_classification",
    "tokenize_for_lm",
    "tokenizer_fingerprint",
    "validate_dataset",
]
