"""Tiny ULMFiT pieces on the bundled IMDb reviews, shared by the trainer tests and the multi-process scripts."""

import sys
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TESTS_DIR = Path(__file__).resolve().parent.parent
if str(TESTS_DIR) not in sys.path:  # scripts run by `accelerate launch` start in this folder
    sys.path.insert(0, str(TESTS_DIR))

from conftest import read_imdb  # noqa: E402
from modeling_awd_lstm import AwdLstmConfig  # noqa: E402
from ulmfit.data import TokenizedCorpus, tokenize_for_classification, tokenize_for_lm  # noqa: E402

# fastai's first special tokens, so the config's pad (1), bos (2) and eos (3) ids hold.
SPECIAL_TOKENS = ["xxunk", "xxpad", "xxbos", "xxeos"]
TINY = dict(emb_size=16, hidden_size=24, num_layers=3)


def word_tokenizer(texts: list[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer trained on `texts`; every document starts with xxbos, as in fastai."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="xxunk"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("<br />", " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="xxbos $A", special_tokens=[("xxbos", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="xxunk", pad_token="xxpad", bos_token="xxbos", eos_token="xxeos",
        padding_side="left",
    )


def imdb_texts(split: str, limit: int | None = None) -> list[str]:
    return [row["text"] for row in read_imdb(split, limit)]


def lm_corpus(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> TokenizedCorpus:
    tokenized = tokenize_for_lm(datasets.Dataset.from_dict({"text": texts}), tokenizer)
    return TokenizedCorpus.from_dataset(tokenized, vocab_size=len(tokenizer))


def classification_dataset(tokenizer, split: str, limit: int | None = None, max_length: int | None = None):
    rows = read_imdb(split, limit)
    dataset = datasets.Dataset.from_dict({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]})
    return tokenize_for_classification(dataset, tokenizer, max_length=max_length)


def tiny_config(tokenizer, **kwargs) -> AwdLstmConfig:
    return AwdLstmConfig(vocab_size=len(tokenizer), **{**TINY, **kwargs})


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from a second thread; on a loaded machine its synchronisation costs seconds a step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
