"""Real text for the benchmarks, tokenized once by fastai (Tokenizer rules + spaCy + Numericalize) for both sides.

Both implementations get the very same token ids: WikiText-2 articles for the language model (`wiki.valid.tokens`
to train on, `wiki.test.tokens` to evaluate), IMDb reviews for the classifier. The vocabulary is fastai's
`make_vocab` over WikiText-2 and IMDb training reviews, cut or padded (with fastai's own `xxfake` filler) to exactly
the benchmarked size: the decoder's cost depends on its row count only.

Everything is cached (tokens, vocabularies, the shared initial weights), so a second run starts measuring at once.
"""

import gzip
import hashlib
import json
import os
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .settings import Settings

DEFAULT_DATA_DIR = Path("/work/shared/data")
BUNDLED_DATA_DIR = Path(__file__).resolve().parent.parent / "training" / "demo_data"
FILLER_TOKEN = "xxfake"  # fastai pads its vocabularies with this token; no text maps to it
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


@dataclass(frozen=True)
class DataFiles:
    """The four files the benchmarks read, in the shared data layout or the bundled subsets' layout."""

    lm_train: Path
    lm_valid: Path
    imdb_train: Path
    imdb_test: Path

    @classmethod
    def find(cls, data_dir: Path) -> "DataFiles":
        shared = cls(
            data_dir / "wikitext2" / "wiki.valid.tokens",
            data_dir / "wikitext2" / "wiki.test.tokens",
            data_dir / "imdb" / "train.jsonl.gz",
            data_dir / "imdb" / "test.jsonl.gz",
        )
        bundled = cls(
            data_dir / "wikitext2_valid.txt.gz",
            data_dir / "wikitext2_test.txt.gz",
            data_dir / "imdb_train.jsonl.gz",
            data_dir / "imdb_test.jsonl.gz",
        )
        for layout in (shared, bundled):
            if layout.exists():
                return layout
        raise FileNotFoundError(
            f"No benchmark data in {data_dir}: expected wikitext2/wiki.{{valid,test}}.tokens and "
            f"imdb/{{train,test}}.jsonl.gz, or the bundled subsets of {BUNDLED_DATA_DIR}."
        )

    def exists(self) -> bool:
        return all(path.is_file() for path in self.paths())

    def paths(self) -> list[Path]:
        return [self.lm_train, self.lm_valid, self.imdb_train, self.imdb_test]


def resolve_data_files(data_dir: Path | None) -> DataFiles:
    """The requested data, or the bundled subsets when the default shared folder is absent."""
    if data_dir is not None:
        return DataFiles.find(data_dir)
    try:
        return DataFiles.find(DEFAULT_DATA_DIR)
    except FileNotFoundError:
        return DataFiles.find(BUNDLED_DATA_DIR)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ulmfit_hf_benchmarks"


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------
def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_wikitext_articles(path: Path, max_lines: int | None = None) -> list[str]:
    """WikiText articles: a top-level heading (` = Title = `) starts a new one."""
    articles: list[list[str]] = []
    with _open_text(path) as f:
        for index, line in enumerate(f):
            if max_lines is not None and index >= max_lines:
                break
            line = line.rstrip("\n")
            if _ARTICLE_HEADING.match(line) or not articles:
                articles.append([])
            if line.strip():
                articles[-1].append(line.strip())
    return [" \n ".join(lines) for lines in articles if lines]


def read_imdb(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with _open_text(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# fastai tokenization
# ----------------------------------------------------------------------------------------------------------------------
def fastai_tokenize(texts: list[str], n_workers: int) -> list[list[str]]:
    """fastai's default text processing (rules, spaCy, post-rules), in parallel as its `Tokenizer.from_df` does."""
    from fastai.text.all import WordTokenizer, defaults, parallel_tokenize

    tokens: list[list[str] | None] = [None] * len(texts)
    for index, toks in parallel_tokenize(texts, WordTokenizer(), rules=defaults.text_proc_rules, n_workers=n_workers):
        tokens[index] = list(toks)
    return tokens  # type: ignore[return-value]


def build_vocab(counts: Counter, size: int, min_freq: int) -> tuple[list[str], int]:
    """fastai's `make_vocab` (special tokens first, then by frequency), cut or padded with filler to exactly `size`.
    Returns the vocabulary and how many of its entries are real tokens."""
    from fastai.text.all import make_vocab

    vocab = [token for token in make_vocab(counts, min_freq=min_freq, max_vocab=size) if token != FILLER_TOKEN]
    vocab = vocab[:size]
    real = len(vocab)
    return vocab + [FILLER_TOKEN] * (size - real), real


def numericalize(docs: list[list[str]], vocab: list[str]) -> list[torch.Tensor]:
    """fastai's `Numericalize`: unknown tokens map to id 0 (`xxunk`), filler entries are never produced."""
    stoi = {token: index for index, token in enumerate(vocab) if token != FILLER_TOKEN}
    return [torch.tensor([stoi.get(token, 0) for token in doc], dtype=torch.long) for doc in docs]


def _find_prompt(texts: list[str], n_tokens: int) -> str:
    """The shortest start of a real review whose fastai tokenization (with `xxbos`) has exactly `n_tokens` tokens."""
    from fastai.text.all import Tokenizer, WordTokenizer

    tokenizer = Tokenizer(WordTokenizer())
    for text in texts:
        words = text.split()
        for count in range(1, len(words) + 1):
            candidate = " ".join(words[:count])
            length = len(tokenizer(candidate))
            if length == n_tokens:
                return candidate
            if length > n_tokens:
                break
    raise ValueError(f"No review starts with a {n_tokens}-token prefix.")


# ----------------------------------------------------------------------------------------------------------------------
# Preparation (parent process) and loading (workers)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """Paths of the prepared data and of the shared initial weights (fastai state dicts)."""

    data: Path
    lm_init: dict[int, Path]
    clas_init: Path

    def to_dict(self) -> dict:
        return {"data": str(self.data), "lm_init": {str(k): str(v) for k, v in self.lm_init.items()},
                "clas_init": str(self.clas_init)}

    @classmethod
    def from_dict(cls, d: dict) -> "Prepared":
        return cls(Path(d["data"]), {int(k): Path(v) for k, v in d["lm_init"].items()}, Path(d["clas_init"]))


def _cache_key(settings: Settings, files: DataFiles) -> str:
    stats = [(str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)) for p in files.paths()]
    relevant = {
        "files": stats,
        "model": settings.to_dict()["model"],
        "vocabs": sorted(_lm_vocabs(settings) | {settings.clas_vocab}),
        **{name: getattr(settings, name) for name in (
            "seed", "quick", "clas_train_batch_size", "clas_warmup_batches", "clas_timed_batches", "infer_docs",
            "prompt_tokens", "vocab_imdb_docs", "min_freq", "clas_bptt", "clas_max_len",
        )},
        "version": 1,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _lm_vocabs(settings: Settings) -> set[int]:
    return set(settings.lm_vocab_sizes) | {settings.quality_vocab, settings.gen_vocab}


def prepare(settings: Settings, files: DataFiles, cache_dir: Path, log=print) -> Prepared:
    """Tokenize, build the vocabularies and the shared initial weights, once; later runs reuse the cache."""
    folder = cache_dir / _cache_key(settings, files)
    lm_vocabs = sorted(_lm_vocabs(settings))
    prepared = Prepared(
        folder / "data.pt",
        {size: folder / f"lm_init_{size}.pt" for size in lm_vocabs},
        folder / f"clas_init_{settings.clas_vocab}.pt",
    )
    if prepared.data.is_file() and prepared.clas_init.is_file() and all(p.is_file() for p in prepared.lm_init.values()):
        log(f"data and initial weights: cached in {folder}")
        return prepared
    folder.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    n_workers = 0 if settings.quick else max(1, os.cpu_count() or 1)  # 0: in this process (no start-up cost)
    rng = random.Random(settings.seed)
    max_lines = 400 if settings.quick else None

    log("tokenizing with fastai (first run only) ...")
    lm_train_tokens = fastai_tokenize(read_wikitext_articles(files.lm_train, max_lines), n_workers)
    lm_valid_tokens = fastai_tokenize(read_wikitext_articles(files.lm_valid, max_lines), n_workers)
    imdb_train = read_imdb(files.imdb_train)
    imdb_test = read_imdb(files.imdb_test)
    vocab_rows = (
        imdb_train if settings.vocab_imdb_docs >= len(imdb_train) else rng.sample(imdb_train, settings.vocab_imdb_docs)
    )
    n_clas_train = settings.clas_train_batch_size * (settings.clas_warmup_batches + settings.clas_timed_batches)
    clas_train_rows = rng.sample(imdb_train, n_clas_train)
    test_rows = rng.sample(imdb_test, min(settings.infer_docs, len(imdb_test)))
    vocab_tokens = fastai_tokenize([row["text"] for row in vocab_rows], n_workers)
    clas_train_tokens = fastai_tokenize([row["text"] for row in clas_train_rows], n_workers)
    test_tokens = fastai_tokenize([row["text"] for row in test_rows], n_workers)

    counts = Counter(
        token for docs in (lm_train_tokens, lm_valid_tokens, vocab_tokens) for doc in docs for token in doc
    )
    vocabs, real_entries = {}, {}
    for size in sorted(set(lm_vocabs) | {settings.clas_vocab}):
        vocabs[size], real_entries[size] = build_vocab(counts, size, settings.min_freq)

    prompt_text = _find_prompt([row["text"] for row in test_rows], settings.prompt_tokens)
    from fastai.text.all import Tokenizer, WordTokenizer

    prompt_tokens = Tokenizer(WordTokenizer())(prompt_text)
    data = {
        "vocabs": vocabs,
        "real_vocab_entries": real_entries,
        "lm": {
            size: {"train_docs": numericalize(lm_train_tokens, vocabs[size]),
                   "valid_docs": numericalize(lm_valid_tokens, vocabs[size])}
            for size in lm_vocabs
        },
        "clas_train": {
            "ids": numericalize(clas_train_tokens, vocabs[settings.clas_vocab]),
            "labels": torch.tensor([row["label"] for row in clas_train_rows]),
        },
        "clas_test": {
            "ids": numericalize(test_tokens, vocabs[settings.clas_vocab]),
            "labels": torch.tensor([row["label"] for row in test_rows]),
            "texts": [row["text"] for row in test_rows],
        },
        "prompt": {"text": prompt_text, "ids": numericalize([list(prompt_tokens)], vocabs[settings.gen_vocab])[0]},
        "stats": {
            "lm_train_tokens": sum(len(d) for d in lm_train_tokens),
            "lm_valid_tokens": sum(len(d) for d in lm_valid_tokens),
            "vocab_source_docs": {"wikitext2_articles": len(lm_train_tokens) + len(lm_valid_tokens),
                                  "imdb_train_reviews": len(vocab_rows)},
            "distinct_tokens": len(counts),
            "real_vocab_entries": real_entries,
            "clas_train_docs": len(clas_train_rows),
            "clas_train_tokens": sum(len(d) for d in clas_train_tokens),
            "infer_docs": len(test_rows),
            "infer_tokens": sum(len(d) for d in test_tokens),
            "files": [str(p) for p in files.paths()],
        },
    }
    _save_initial_weights(settings, prepared, vocabs)
    torch.save(data, prepared.data)
    return prepared


def _save_initial_weights(settings: Settings, prepared: Prepared, vocabs: dict[int, list[str]]) -> None:
    """fastai's own initialization, seeded; both sides start from these weights (ours through the converter)."""
    from fastai.text.all import (
        AWD_LSTM,
        awd_lstm_clas_config,
        awd_lstm_lm_config,
        get_language_model,
        get_text_classifier,
    )

    size = settings.model
    shape = dict(emb_sz=size.emb_size, n_hid=size.hidden_size, n_layers=size.num_layers)
    for vocab_size, path in prepared.lm_init.items():
        torch.manual_seed(settings.seed)
        model = get_language_model(AWD_LSTM, vocab_size, config={**awd_lstm_lm_config, **shape})
        torch.save(model.state_dict(), path)
    torch.manual_seed(settings.seed)
    model = get_text_classifier(
        AWD_LSTM, settings.clas_vocab, 2, seq_len=settings.clas_bptt, config={**awd_lstm_clas_config, **shape},
        drop_mult=0.5, max_len=settings.clas_max_len,
    )
    torch.save(model.state_dict(), prepared.clas_init)


def load_data(prepared: Prepared) -> dict:
    return torch.load(prepared.data, weights_only=False)


# ----------------------------------------------------------------------------------------------------------------------
# Batching shared by both sides
# ----------------------------------------------------------------------------------------------------------------------
def lm_stream(docs: list[torch.Tensor], n_tokens: int) -> list[torch.Tensor]:
    """The documents cut so that they hold exactly `n_tokens` tokens in all (the last one shortened)."""
    out, total = [], 0
    for doc in docs:
        if total >= n_tokens:
            break
        take = doc[: n_tokens - total]
        out.append(take)
        total += len(take)
    if total < n_tokens:
        raise ValueError(f"The language-model text has {total} tokens, fewer than the {n_tokens} needed.")
    return out


def lm_batches(
    docs: list[torch.Tensor], batch_size: int, bptt: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """fastai's `LMDataLoader` layout (no shuffling): the text is one stream cut into `batch_size` rows read side by
    side, `bptt` tokens at a time; targets are the inputs shifted by one token."""
    row_len = n_batches * bptt
    stream = torch.cat(lm_stream(docs, batch_size * row_len + 1))
    rows = torch.stack([stream[r * row_len : (r + 1) * row_len + 1] for r in range(batch_size)])
    return [(rows[:, i * bptt : (i + 1) * bptt], rows[:, i * bptt + 1 : (i + 1) * bptt + 1]) for i in range(n_batches)]


def sorted_batches(lengths: list[int], batch_size: int, shuffle_seed: int | None) -> list[list[int]]:
    """Length-sorted batches (longest first). With a seed, the batches between the first and the last are shuffled:
    fastai's `SortedDL` training order when the data fits in one of its 50-batch sorting windows."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle_seed is not None and len(batches) > 2:
        middle = batches[1:-1]
        random.Random(shuffle_seed).shuffle(middle)
        batches = [batches[0], *middle, batches[-1]]
    return batches
