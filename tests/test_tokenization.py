"""Tokenizers: fastai parity of AwdLstmTokenizer on real text, decoding, saving/loading, and subword tokenizers."""

import gzip
import json
import os
import pickle
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from modeling_awd_lstm.tokenization_awd_lstm import FASTAI_SPECIAL_TOKENS, AwdLstmTokenizer
from ulmfit.tokenizer_training import iter_texts, make_vocab, train_fastai_tokenizer, train_subword_tokenizer

DEMO_DATA = Path(__file__).resolve().parents[1] / "training" / "demo_data"


def imdb_reviews(n: int) -> list[str]:
    with gzip.open(DEMO_DATA / "imdb_train.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def trec_questions(n: int) -> list[str]:
    with gzip.open(DEMO_DATA / "trec_train_5500.label.gz", "rt", encoding="latin-1") as f:
        return [line.rstrip("\n").split(" ", 1)[1] for _, line in zip(range(n), f)]


def alice_paragraphs(n: int) -> list[str]:
    with gzip.open(DEMO_DATA / "gutenberg_carroll-alice.txt.gz", "rt", encoding="utf-8") as f:
        return [p for p in f.read().split("\n\n") if p.strip()][:n]


def wikitext_lines(n: int) -> list[str]:
    with gzip.open(DEMO_DATA / "wikitext2_valid.txt.gz", "rt", encoding="utf-8") as f:
        return [line for line in f.read().split("\n") if line.strip()][:n]


def role_ids(tokenizer) -> tuple[int, int, int, int]:
    return tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    # IMDb reviews (HTML, repetitions, capitals), TREC questions (Latin-1, with a "ð"), Gutenberg prose (line breaks,
    # quotes), WikiText (<unk>, @-@): every fastai rule fires somewhere in these 400 documents.
    texts = imdb_reviews(150) + trec_questions(150) + alice_paragraphs(60) + wikitext_lines(40)
    assert any("ð" in t for t in texts) and any("<unk>" in t for t in texts) and any("<br />" in t for t in texts)
    return texts


@pytest.fixture(scope="module")
def word_tokenizer(corpus) -> AwdLstmTokenizer:
    return train_fastai_tokenizer(corpus + list(DECODED), min_freq=1, show_progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Parity with fastai 2.8
# ---------------------------------------------------------------------------------------------------------------


def fastai_datasets(texts: list[str], min_freq: int, max_vocab: int):
    """What a fastai user builds for ULMFiT: `TextBlock.from_df` (Tokenizer + Numericalize) in a DataBlock."""
    import pandas as pd
    from fastai.text.all import ColReader, DataBlock, TextBlock

    block = TextBlock.from_df("text", is_lm=True, min_freq=min_freq, max_vocab=max_vocab, n_workers=0)
    all_in_train = lambda items: (list(range(len(items))), [])  # noqa: E731  keeps fastai's items in corpus order
    dblock = DataBlock(blocks=block, get_x=ColReader("text"), splitter=all_in_train)
    return dblock.datasets(pd.DataFrame({"text": texts}))


@pytest.mark.parametrize("min_freq, max_vocab", [(3, 60000), (1, 500)])
def test_vocab_tokens_and_ids_equal_fastai(corpus, min_freq, max_vocab):
    dsets = fastai_datasets(corpus, min_freq=min_freq, max_vocab=max_vocab)
    tokenizer = train_fastai_tokenizer(corpus, min_freq=min_freq, max_vocab=max_vocab, show_progress=False)

    # Same vocabulary, order and "xxfake" padding included (max_vocab=500 also checks fastai's tie order).
    assert tokenizer.itos == list(dsets.vocab)
    assert len(tokenizer) == tokenizer.vocab_size == len(dsets.vocab)
    assert tokenizer.itos[: len(FASTAI_SPECIAL_TOKENS)] == FASTAI_SPECIAL_TOKENS
    assert role_ids(tokenizer) == (0, 1, 2, 3)

    fastai_tokens = [list(tokens) for tokens in dsets.items["text"]]
    fastai_ids = [dsets.train[i][0].tolist() for i in range(len(corpus))]
    assert [["xxbos", *tokenizer.tokenize(text)] for text in corpus] == fastai_tokens
    assert tokenizer(corpus)["input_ids"] == fastai_ids
    assert any(0 in ids for ids in fastai_ids)  # unknown words occur, and map to xxunk as in fastai


def test_make_vocab_equals_fastai_make_vocab(corpus, word_tokenizer):
    from fastai.text.all import make_vocab as fastai_make_vocab

    counter = Counter(token for text in corpus for token in ["xxbos", *word_tokenizer.tokenize(text)])
    for min_freq, max_vocab in [(3, 60000), (2, 100), (1, 8 * 40)]:  # 8*40: fastai still appends 8 "xxfake"
        assert make_vocab(counter, min_freq, max_vocab) == fastai_make_vocab(counter, min_freq, max_vocab)
    assert make_vocab(counter, 1, 8 * 40)[-8:] == ["xxfake"] * 8


def test_special_tokens_in_text_and_padding_slots_behave_as_in_fastai(word_tokenizer):
    # The whole text goes through the rules: literal special tokens stay whole, "<unk>" becomes xxunk, and spaces
    # inside a token become "▁" (fastai's `replace_space`, applied when it builds its training data).
    assert word_tokenizer.tokenize("Some <unk> xxbos words") == ["xxmaj", "some", "xxunk", "xxbos", "words"]
    assert word_tokenizer.tokenize("a \n b") == ["a", "\n▁", "b"]
    # "xxfake" fills the vocabulary to a multiple of 8 but is no token: like fastai's Numericalize, it reads as xxunk.
    fake_ids = [i for i, t in enumerate(word_tokenizer.itos) if t == "xxfake"]
    assert fake_ids and word_tokenizer.convert_tokens_to_ids("xxfake") == word_tokenizer.unk_token_id
    assert word_tokenizer.convert_ids_to_tokens(fake_ids[0]) == "xxfake"


# ---------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------

# text -> what decode(encode(text)) gives a reader ("..." is "…" after fastai's fix_html)
DECODED = {
    "Hello World! It's GREAT, isn't it?": "Hello World! It's GREAT, isn't it?",
    "Noooo... I can't believe it!!! A waste of $10.": "Noooo… I can't believe it!!! A waste of $10.",
    'It was very very very good (7/10), a "must-see" well-known film.': (
        'It was very very very good (7/10), a "must-see" well-known film.'
    ),
    "A great cast.<br /><br />I loved it. THE END": "A great cast.\n\nI loved it. THE END",
    "She said: 'gonna cannot dont' #1 & more": "She said: 'gonna cannot dont' #1 & more",
}


@pytest.mark.parametrize("text", list(DECODED))
def test_decode_undoes_the_rules(word_tokenizer, text):
    ids = word_tokenizer(text)["input_ids"]
    assert word_tokenizer.unk_token_id not in ids
    assert word_tokenizer.decode(ids, skip_special_tokens=True) == DECODED[text]
    assert word_tokenizer.decode(ids) == "xxbos " + DECODED[text]


def test_decode_reproduces_real_documents(word_tokenizer):
    review = imdb_reviews(66)[65]  # paragraphs, brackets, capitals, "10-year", "don't"
    paragraph = alice_paragraphs(26)[25]  # single-quoted speech, line breaks, "ONE"
    for text in (review, paragraph):
        ids = word_tokenizer(text)["input_ids"]
        assert word_tokenizer.decode(ids, skip_special_tokens=True) == text.replace("<br />", "\n")


def test_markers_are_decoded_not_shown(word_tokenizer):
    tokens = ["xxmaj", "hello", "xxup", "world", "n", "xxrep", "4", "o", "xxwrep", "3", "xxup", "very", "good"]
    ids = word_tokenizer.convert_tokens_to_ids(tokens)
    assert word_tokenizer.decode(ids) == " Hello WORLD noooo VERY VERY VERY good"  # no xxbos: continues a text
    assert word_tokenizer.decode(word_tokenizer.convert_tokens_to_ids(["good", "xxmaj"])) == " good"  # dangling marker


def test_decoded_continuation_is_spaced_for_text_generation(word_tokenizer):
    """The text-generation pipeline returns prompt + decode(new tokens): the continuation brings its own space."""
    tok = word_tokenizer

    def continuation(text: str) -> str:  # what a model that generated these tokens gets decoded
        return tok.decode(tok(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True)

    assert "The movie was" + continuation("great, wasn't it?") == "The movie was great, wasn't it?"
    assert "It's GREAT" + continuation(", isn't it?") == "It's GREAT, isn't it?"
    assert "I ca" + tok.decode(tok.convert_tokens_to_ids(["n't", "believe", "it"])) == "I can't believe it"
    # The same holds when decoding a generated sequence in two parts, as the pipeline does.
    ids = tok("Hello World! It's GREAT, isn't it?")["input_ids"]
    for k in range(2, len(ids)):
        if tok.convert_ids_to_tokens(ids[k - 1]) not in ("xxmaj", "xxup"):
            prompt = tok.decode(ids[:k], skip_special_tokens=True)
            assert prompt + tok.decode(ids[k:], skip_special_tokens=True) == "Hello World! It's GREAT, isn't it?"


# ---------------------------------------------------------------------------------------------------------------
# The transformers tokenizer API
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_padding_truncation_and_masks(word_tokenizer, padding_side):
    texts = ["Hello World!", "It was very very very good (7/10).", "A great cast."]
    single = [word_tokenizer(t)["input_ids"] for t in texts]
    batch = word_tokenizer(texts, padding=True, padding_side=padding_side, return_tensors="pt")
    longest = max(map(len, single))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, longest)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert word_tokenizer.pad_token_id == 1
    for ids, row, mask in zip(single, batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        n_pads = longest - len(ids)
        if padding_side == "right":
            assert row == ids + [1] * n_pads and mask == [1] * len(ids) + [0] * n_pads
        else:
            assert row == [1] * n_pads + ids and mask == [0] * n_pads + [1] * len(ids)

    truncated = word_tokenizer(texts, max_length=4, truncation=True)["input_ids"]
    assert truncated == [ids[:4] for ids in single]  # xxbos stays in front
    assert word_tokenizer(texts[0], add_special_tokens=False)["input_ids"] == single[0][1:]


def test_pickles_and_maps_over_a_dataset(word_tokenizer, corpus):
    from datasets import Dataset

    restored = pickle.loads(pickle.dumps(word_tokenizer))
    assert restored(corpus[:5])["input_ids"] == word_tokenizer(corpus[:5])["input_ids"]
    mapped = Dataset.from_dict({"text": corpus[:20]}).map(lambda b: word_tokenizer(b["text"]), batched=True)
    assert mapped["input_ids"] == word_tokenizer(corpus[:20])["input_ids"]


def test_added_tokens_take_the_padding_slots(corpus):
    tokenizer = train_fastai_tokenizer(corpus[:50], show_progress=False)
    first_slot = tokenizer.itos.index("xxfake")
    assert tokenizer.add_tokens(["<mask>"]) == 1
    assert tokenizer.convert_tokens_to_ids("<mask>") == first_slot
    assert len(tokenizer) == len(tokenizer.itos)
    assert "<mask>" in tokenizer.tokenize("a <mask> here")


def test_save_and_load(word_tokenizer, corpus, tmp_path):
    word_tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")) == word_tokenizer.itos
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_awd_lstm.AwdLstmTokenizer"
    assert (tmp_path / "tokenization_awd_lstm.py").is_file()

    loaded = AwdLstmTokenizer.from_pretrained(tmp_path)
    assert loaded.itos == word_tokenizer.itos
    assert loaded(corpus)["input_ids"] == word_tokenizer(corpus)["input_ids"]
    ids = loaded(corpus[0])["input_ids"]
    assert loaded.decode(ids) == word_tokenizer.decode(ids)


# ---------------------------------------------------------------------------------------------------------------
# Subword tokenizers, and loading without this package
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def subword_tokenizers() -> dict:
    texts = imdb_reviews(100)
    return {
        model: train_subword_tokenizer(texts, vocab_size=500, model=model, show_progress=False)
        for model in ("unigram", "bpe")
    }


@pytest.mark.parametrize("model", ["unigram", "bpe"])
def test_subword_tokenizer(subword_tokenizers, model):
    tokenizer, texts = subword_tokenizers[model], imdb_reviews(100)
    assert len(tokenizer) == 500
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(4)] == ["xxunk", "xxpad", "xxbos", "xxeos"]
    assert role_ids(tokenizer) == (0, 1, 2, 3)

    ids = tokenizer(texts)["input_ids"]
    assert all(row[0] == tokenizer.bos_token_id for row in ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == [unicodedata.normalize("NFKC", t) for t in texts]

    # Continuations decode with their leading space, as the text-generation pipeline needs.
    new_ids = tokenizer(" was great, wasn't it?", add_special_tokens=False)["input_ids"]
    assert "The movie" + tokenizer.decode(new_ids, skip_special_tokens=True) == "The movie was great, wasn't it?"
    assert tokenizer.decode(tokenizer(", really", add_special_tokens=False)["input_ids"]) == ", really"

    batch = tokenizer(["Great.", "A long and boring film."], padding=True, padding_side="left")
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id and batch["attention_mask"][0][0] == 0
    assert set(batch) == {"input_ids", "attention_mask"}


def run_isolated(code: str, cwd: Path) -> dict:
    """Run `code` in a fresh `python -I` with this project's packages made unimportable; return its JSON output."""
    blocker = "import sys\nfor name in ('modeling_awd_lstm', 'ulmfit'):\n    sys.modules[name] = None\n"
    env = {**os.environ, "HF_MODULES_CACHE": str(cwd / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", blocker + code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


LOAD_AND_ENCODE = """
import json
from transformers import AutoTokenizer
texts, out = json.loads({texts!r}), {{}}
for name, trust_remote_code in [("word", True), ("unigram", False), ("bpe", False)]:
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    ids = tokenizer(texts)["input_ids"]
    out[name] = {{"class": type(tokenizer).__module__ + "." + type(tokenizer).__name__, "ids": ids,
                 "decoded": tokenizer.decode(ids, skip_special_tokens=True)}}
print(json.dumps(out))
"""


def test_saved_tokenizers_load_without_this_package(word_tokenizer, subword_tokenizers, corpus, tmp_path):
    """The word tokenizer loads from its own copied code (trust_remote_code); subword ones need no code at all."""
    tokenizers = {"word": word_tokenizer, **subword_tokenizers}
    for name, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(tmp_path / name)
    for name in subword_tokenizers:
        assert {p.name for p in (tmp_path / name).iterdir()} == {"tokenizer.json", "tokenizer_config.json"}

    texts = corpus[::20]
    out = run_isolated(LOAD_AND_ENCODE.format(texts=json.dumps(texts)), cwd=tmp_path)
    assert out["word"]["class"].startswith("transformers_modules.")
    assert out["word"]["class"].endswith(".tokenization_awd_lstm.AwdLstmTokenizer")
    fast_backend = "transformers.tokenization_utils_tokenizers.TokenizersBackend"
    assert out["unigram"]["class"] == out["bpe"]["class"] == fast_backend
    for name, tokenizer in tokenizers.items():
        ids = tokenizer(texts)["input_ids"]
        assert out[name]["ids"] == ids
        assert out[name]["decoded"] == tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------
# Corpus sources and errors
# ---------------------------------------------------------------------------------------------------------------


def test_sources_dataset_files_and_lists_give_the_same_vocab(tmp_path):
    from datasets import Dataset

    questions = trec_questions(300)
    plain, packed = tmp_path / "questions.txt", tmp_path / "questions.txt.gz"
    plain.write_text("\n".join(questions[:150]) + "\n\n", encoding="latin-1")  # a blank line is no document
    with gzip.open(packed, "wt", encoding="latin-1") as f:
        f.write("\n".join(questions[150:]))

    from_list = train_fastai_tokenizer(questions, min_freq=2, show_progress=False)
    from_files = train_fastai_tokenizer([plain, packed], min_freq=2, encoding="latin-1", show_progress=False)
    dataset = Dataset.from_dict({"question": questions, "label": list(range(300))})
    from_dataset = train_fastai_tokenizer(dataset, min_freq=2, text_column="question", show_progress=False)
    assert from_list.itos == from_files.itos == from_dataset.itos
    assert list(iter_texts(str(plain), encoding="latin-1", show_progress=False)) == questions[:150]


def test_counting_in_several_processes_gives_the_same_vocabulary(corpus):
    """Chunks are counted in parallel and merged in order: frequency ties, and so the vocabulary, are unchanged."""
    one = train_fastai_tokenizer(corpus, min_freq=1, show_progress=False, num_proc=1)
    two = train_fastai_tokenizer(corpus, min_freq=1, show_progress=False, num_proc=2)
    assert len(corpus) > 200  # more than one chunk
    assert two.itos == one.itos


def test_clear_errors(tmp_path):
    from datasets import Dataset, DatasetDict

    with pytest.raises(ValueError, match="empty"):
        train_fastai_tokenizer([], show_progress=False)
    with pytest.raises(TypeError, match="item 2"):
        train_fastai_tokenizer(["a text", "another", None], show_progress=False)
    with pytest.raises(TypeError, match="row 1 of column 'text'"):
        train_subword_tokenizer(Dataset.from_dict({"text": ["fine", None]}), vocab_size=50, show_progress=False)
    with pytest.raises(KeyError, match="columns: \\['review'\\]"):
        train_fastai_tokenizer(Dataset.from_dict({"review": ["a"]}), show_progress=False)
    with pytest.raises(TypeError, match="dataset\\['train'\\]"):
        train_fastai_tokenizer(DatasetDict({"train": Dataset.from_dict({"text": ["a"]})}), show_progress=False)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_fastai_tokenizer(tmp_path / "missing.txt", show_progress=False)
    with pytest.raises(ValueError, match="'unigram' or 'bpe'"):
        train_subword_tokenizer(["text"], model="wordpiece", show_progress=False)
    with pytest.raises(ValueError, match="lacks the special tokens"):
        AwdLstmTokenizer(vocab=["the", "a"])
    with pytest.raises(ValueError, match="vocab_file"):
        AwdLstmTokenizer()
