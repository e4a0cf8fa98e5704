"""Tests for the data pipeline (`training/data/`, imported as `ulmfit.data`), on the real text bundled in
`training/demo_data/`."""

import gzip
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from modeling_awd_lstm.tokenization_awd_lstm import AwdLstmTokenizer
from ulmfit.data import (
    ClassificationCollator,
    DataSpec,
    DataValidationError,
    LanguageModelingStream,
    SortedBatchSampler,
    TokenizedCorpus,
    encode_labels,
    load_data,
    tokenize_for_classification,
    tokenize_for_lm,
    validate_dataset,
)

DEMO_DATA = Path(__file__).resolve().parent.parent / "training" / "demo_data"


def read_jsonl(name: str, limit: int) -> list[dict]:
    with gzip.open(DEMO_DATA / name, "rt", encoding="utf-8") as file:
        return [json.loads(line) for _, line in zip(range(limit), file)]


@pytest.fixture(scope="module")
def wikitext_lines() -> list[str]:
    with gzip.open(DEMO_DATA / "wikitext2_valid.txt.gz", "rt", encoding="utf-8") as file:
        return [line.strip() for line in file if line.strip()]


@pytest.fixture(scope="module")
def imdb_rows() -> list[dict]:
    return read_jsonl("imdb_train.jsonl.gz", 200)


@pytest.fixture(scope="module")
def tokenizer(wikitext_lines) -> PreTrainedTokenizerFast:
    """A real word-level tokenizer trained on bundled text, adding `xxbos` at the start of each document."""
    word_level = Tokenizer(models.WordLevel(unk_token="xxunk"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level.train_from_iterator(
        wikitext_lines, trainers.WordLevelTrainer(vocab_size=3000, special_tokens=["xxunk", "xxpad", "xxbos"])
    )
    word_level.post_processor = processors.TemplateProcessing(single="xxbos $A", special_tokens=[("xxbos", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="xxunk", pad_token="xxpad", bos_token="xxbos", padding_side="left"
    )


@pytest.fixture(scope="module")
def corpus(wikitext_lines, tokenizer, tmp_path_factory) -> TokenizedCorpus:
    dataset = datasets.Dataset.from_dict({"text": wikitext_lines[:600]})
    tokenized = tokenize_for_lm(dataset, tokenizer)
    return TokenizedCorpus.from_dataset(tokenized, vocab_size=len(tokenizer), cache_dir=tmp_path_factory.mktemp("lm"))


def joined_stream(corpus: TokenizedCorpus, order: np.ndarray) -> np.ndarray:
    return np.concatenate([corpus.document(i) for i in order]).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_text_file_gives_one_document_per_line(tmp_path, wikitext_lines, suffix):
    path = tmp_path / f"corpus{suffix}"
    content = "\n\n".join(wikitext_lines[:20]) + "\n"  # blank lines between documents, as in WikiText
    opener = gzip.open if suffix.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as file:
        file.write(content)

    dataset = load_data(DataSpec(path=str(path), text_column="document", cache_dir=str(tmp_path / "cache")))

    assert dataset.column_names == ["document"]
    assert dataset["document"] == wikitext_lines[:20]


def test_folder_of_text_files_gives_one_document_per_file(tmp_path, imdb_rows):
    folder = tmp_path / "reviews"
    folder.mkdir()
    for index, row in enumerate(imdb_rows[:4]):
        (folder / f"{index}.txt").write_text(row["text"], encoding="utf-8")
    with gzip.open(folder / "4.txt.gz", "wt", encoding="utf-8") as file:
        file.write(imdb_rows[4]["text"])

    dataset = load_data(DataSpec(path=str(folder), cache_dir=str(tmp_path / "cache")))

    assert sorted(dataset["text"]) == sorted(row["text"] for row in imdb_rows[:5])


def test_csv_with_custom_column_names(tmp_path, imdb_rows):
    import csv

    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["review", "sentiment"])
        writer.writerows((row["text"], ["neg", "pos"][row["label"]]) for row in imdb_rows[:10])
    spec = DataSpec(path=str(path), text_column="review", label_column="sentiment", cache_dir=str(tmp_path / "cache"))

    dataset = load_data(spec)
    validate_dataset(dataset, spec.text_column, spec.label_column)

    assert dataset["review"] == [row["text"] for row in imdb_rows[:10]]
    assert dataset["sentiment"] == [["neg", "pos"][row["label"]] for row in imdb_rows[:10]]


def test_bundled_jsonl_gz(tmp_path):
    dataset = load_data({"path": str(DEMO_DATA / "imdb_test.jsonl.gz"), "cache_dir": str(tmp_path / "cache")})

    assert len(dataset) == 1000
    assert set(dataset.column_names) == {"id", "text", "label", "rating"}
    assert dataset[0] == read_jsonl("imdb_test.jsonl.gz", 1)[0]


def test_parquet(tmp_path, imdb_rows):
    path = tmp_path / "reviews.parquet"
    datasets.Dataset.from_list(imdb_rows[:10]).to_parquet(path)

    dataset = load_data(DataSpec(path=str(path), cache_dir=str(tmp_path / "cache")))

    assert dataset["text"] == [row["text"] for row in imdb_rows[:10]]


def test_glob_of_files(tmp_path, imdb_rows):
    for part in range(2):
        with open(tmp_path / f"part{part}.jsonl", "w", encoding="utf-8") as file:
            file.writelines(json.dumps(row) + "\n" for row in imdb_rows[part * 5 : part * 5 + 5])

    dataset = load_data(DataSpec(path=str(tmp_path / "part*.jsonl"), cache_dir=str(tmp_path / "cache")))

    assert dataset["id"] == [row["id"] for row in imdb_rows[:10]]


def write_aclimdb(root: Path, rows: list[dict]) -> None:
    """An aclImdb-style tree: train/{neg,pos,unsup}/<id>_<rating>.txt."""
    for index, row in enumerate(rows):
        folder = root / "train" / ["neg", "pos", "unsup"][index % 3 if index % 3 == 2 else row["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index}_{row['rating']}.txt").write_text(row["text"], encoding="utf-8")


def test_class_folders_like_aclimdb(tmp_path, imdb_rows):
    write_aclimdb(tmp_path / "aclImdb", imdb_rows[:12])
    spec = DataSpec(path=str(tmp_path / "aclImdb"), split="train", label_names=["neg", "pos"], cache_dir=str(tmp_path))

    dataset = load_data(spec)

    expected = {row["text"]: row["label"] for index, row in enumerate(imdb_rows[:12]) if index % 3 != 2}
    assert dict(zip(dataset["text"], dataset["label"])) == expected
    assert dataset.features["label"].names == ["neg", "pos"]
    # Without a label set, every class folder is read, in sorted order.
    everything = load_data(DataSpec(path=str(tmp_path / "aclImdb" / "train"), cache_dir=str(tmp_path)))
    assert everything.features["label"].names == ["neg", "pos", "unsup"]
    assert len(everything) == 12


def test_class_folders_name_missing_split_and_class(tmp_path, imdb_rows):
    write_aclimdb(tmp_path / "aclImdb", imdb_rows[:6])

    with pytest.raises(FileNotFoundError, match=r"split='test'.*\['train'\]"):
        load_data(DataSpec(path=str(tmp_path / "aclImdb"), split="test"))
    with pytest.raises(FileNotFoundError, match=r"\['neutral'\].*\['neg', 'pos', 'unsup'\]"):
        load_data(DataSpec(path=str(tmp_path / "aclImdb" / "train"), label_names=["neg", "neutral"]))


def test_trec_latin1(tmp_path):
    dataset = load_data(DataSpec(path=str(DEMO_DATA / "trec_train_5500.label.gz"), cache_dir=str(tmp_path)))

    assert len(dataset) == 5452
    assert dataset[0] == {
        "text": "How did serfdom develop in and then leave Russia ?",
        "coarse_label": "DESC",
        "fine_label": "DESC:manner",
    }
    assert "Which city has the oldest relationship as a sister\u00f0city with Los Angeles ?" in dataset["text"]
    assert sorted(set(dataset["coarse_label"])) == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len(set(dataset["fine_label"])) == 50


def test_wrong_encoding_names_the_fix(tmp_path):
    spec = DataSpec(path=str(DEMO_DATA / "trec_TREC_10.label.gz"), encoding="utf-8", cache_dir=str(tmp_path))
    # TREC_10 is pure ASCII; the training file holds Latin-1 bytes that are not UTF-8.
    load_data(spec)
    spec.path = str(DEMO_DATA / "trec_train_5500.label.gz")
    with pytest.raises(DataValidationError, match="not valid utf-8 text.*set `encoding`"):
        load_data(spec)


def test_spec_errors():
    with pytest.raises(ValueError, match=r"Unknown data spec key\(s\) \['txt_column'\]"):
        DataSpec.from_dict({"path": "x.txt", "txt_column": "text"})
    with pytest.raises(ValueError, match="Unknown data format 'xml'"):
        DataSpec(path="x", format="xml")
    with pytest.raises(FileNotFoundError, match="No file or folder matches 'missing/corpus.txt'"):
        load_data("missing/corpus.txt")
    with pytest.raises(ValueError, match="split='test'.*is a file"):
        load_data(DataSpec(path=str(DEMO_DATA / "imdb_test.jsonl.gz"), split="test"))


# ---------------------------------------------------------------------------------------------------------------------
# Checking and labels
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_columns_are_named_with_the_existing_ones():
    dataset = datasets.Dataset.from_dict({"review": ["good"], "sentiment": ["pos"]})

    with pytest.raises(DataValidationError, match=r"no column 'text'; its columns are \['review', 'sentiment'\]"):
        validate_dataset(dataset, text_column="text")
    with pytest.raises(DataValidationError, match=r"no column 'label'; its columns are \['review', 'sentiment'\]"):
        validate_dataset(dataset, text_column="review", label_column="label")


def test_empty_and_missing_texts_are_listed_by_row(wikitext_lines):
    texts = wikitext_lines[:10]
    texts[2], texts[5], texts[8] = "", "   ", None
    dataset = datasets.Dataset.from_dict({"text": texts})

    with pytest.raises(DataValidationError, match=r"3 empty or missing text\(s\), at rows 2, 5, 8\."):
        validate_dataset(dataset)


def test_many_bad_rows_are_summarised():
    dataset = datasets.Dataset.from_dict({"text": ["a", ""] * 10})

    with pytest.raises(DataValidationError, match=r"10 empty or missing text\(s\), at rows 1, 3, 5, 7, 9 and 5 more"):
        validate_dataset(dataset)


def test_non_string_texts():
    dataset = datasets.Dataset.from_dict({"text": [1, 2, 3]})

    with pytest.raises(DataValidationError, match=r"'text' holds Value\('int64'\), not strings.*rows 0, 1, 2"):
        validate_dataset(dataset)


def test_labels_outside_the_label_set_are_named(imdb_rows):
    dataset = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": ["pos", "neg", "neutral", "pos"]})
    with pytest.raises(DataValidationError, match=r"label\(s\) \['neutral'\] outside the label set.*at rows 2\."):
        validate_dataset(dataset, label_column="label", label_names=["neg", "pos"])

    unlabeled = datasets.Dataset.from_list(read_jsonl("imdb_unsup.jsonl.gz", 3) + imdb_rows[:2])
    expected = r"label\(s\) \[-1\] outside the label set \['neg', 'pos'\].*at rows 0, 1, 2\."
    with pytest.raises(DataValidationError, match=expected):
        validate_dataset(unlabeled, label_column="label", label_names=["neg", "pos"])


def test_encode_labels_from_names_and_ids(imdb_rows):
    names = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": ["pos", "neg", "pos"]})
    encoded, label2id, id2label = encode_labels(names)
    assert label2id == {"neg": 0, "pos": 1} and id2label == {0: "neg", 1: "pos"}
    assert encoded["label"] == [1, 0, 1]
    assert encoded.features["label"].names == ["neg", "pos"]

    # A given label set fixes the id order.
    encoded, label2id, _ = encode_labels(names, label_names=["pos", "neg"])
    assert label2id == {"pos": 0, "neg": 1} and encoded["label"] == [0, 1, 0]

    # Integer ids stay ids and take their names from label_names.
    ids = datasets.Dataset.from_list(imdb_rows[:6])
    encoded, label2id, _ = encode_labels(ids, label_names=["neg", "pos"])
    assert encoded["label"] == [row["label"] for row in imdb_rows[:6]] and label2id == {"neg": 0, "pos": 1}

    # A ClassLabel column can be re-ordered by name.
    class_labels, _, _ = encode_labels(names)
    encoded, _, _ = encode_labels(class_labels, label_names=["pos", "neg"])
    assert encoded["label"] == [0, 1, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Language-model streams
# ---------------------------------------------------------------------------------------------------------------------


def test_corpus_is_a_memory_mapped_flat_array(corpus, wikitext_lines, tokenizer):
    assert isinstance(corpus.tokens, np.memmap)
    assert corpus.tokens.dtype == np.uint16
    assert Path(corpus.tokens.filename).stat().st_size >= corpus.num_tokens * 2
    assert corpus.num_documents == 600
    assert corpus.offsets.dtype == np.int64 and corpus.offsets[-1] == corpus.num_tokens
    for index in (0, 17, 599):
        assert corpus.document(index).tolist() == tokenizer(wikitext_lines[index])["input_ids"]


def test_a_backward_language_model_reads_each_document_reversed(wikitext_lines, tokenizer):
    dataset = datasets.Dataset.from_dict({"text": wikitext_lines[:5]})
    forward, backward = tokenize_for_lm(dataset, tokenizer), tokenize_for_lm(dataset, tokenizer, backwards=True)
    assert [ids[::-1] for ids in forward["input_ids"]] == backward["input_ids"]
    assert backward["input_ids"][0][-1] == tokenizer.bos_token_id  # xxbos last, as fastai's backwards=True


def test_a_reloaded_tokenizer_finds_the_cached_tokens(tmp_path, wikitext_lines):
    """A resumed stage reloads its tokenizer from a checkpoint: its tokens must come from the cache, not be redone."""
    from ulmfit.tokenizer_training import train_fastai_tokenizer

    dataset = datasets.Dataset.from_dict({"text": wikitext_lines[:50]})
    built = train_fastai_tokenizer(dataset, min_freq=1, show_progress=False)
    built.save_pretrained(tmp_path / "saved")
    reloaded = AwdLstmTokenizer.from_pretrained(tmp_path / "saved")
    other = train_fastai_tokenizer(dataset, min_freq=2, show_progress=False)

    first, again = tokenize_for_lm(dataset, built), tokenize_for_lm(dataset, reloaded)
    assert first._fingerprint == again._fingerprint
    assert tokenize_for_lm(dataset, other)._fingerprint != first._fingerprint
    assert tokenize_for_lm(dataset, built, backwards=True)._fingerprint != first._fingerprint


def test_tokenizing_in_several_processes_gives_the_same_ids(wikitext_lines):
    from ulmfit.tokenizer_training import train_fastai_tokenizer

    dataset = datasets.Dataset.from_dict({"text": wikitext_lines[:60]})
    words = train_fastai_tokenizer(dataset, min_freq=1, show_progress=False)
    one = tokenize_for_lm(dataset, words, num_proc=1)
    two = tokenize_for_lm(dataset, words, num_proc=2)
    assert two["input_ids"] == one["input_ids"]


def test_large_vocabularies_use_uint32_and_arrays_are_reused(tmp_path, wikitext_lines, tokenizer):
    dataset = datasets.Dataset.from_dict({"text": wikitext_lines[:50]})
    tokenized = tokenize_for_lm(dataset, tokenizer)

    wide = TokenizedCorpus.from_dataset(tokenized, vocab_size=70_000, cache_dir=tmp_path)
    again = TokenizedCorpus.from_dataset(tokenized, vocab_size=70_000, cache_dir=tmp_path)

    assert wide.tokens.dtype == np.uint32
    assert again.tokens.filename == wide.tokens.filename
    assert np.array_equal(np.asarray(wide.tokens), np.concatenate(tokenized["input_ids"]))


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path, wikitext_lines, tokenizer):
    tokenized = tokenize_for_lm(datasets.Dataset.from_dict({"text": wikitext_lines[:50]}), tokenizer)

    with pytest.raises(DataValidationError, match=r"Token ids must lie in 0\.\.99.*len\(tokenizer\)"):
        TokenizedCorpus.from_dataset(tokenized, vocab_size=100, cache_dir=tmp_path)


def test_in_memory_corpus_cleans_up_its_temporary_folder(wikitext_lines, tokenizer):
    tokenized = tokenize_for_lm(datasets.Dataset.from_dict({"text": wikitext_lines[:20]}), tokenizer)
    corpus = TokenizedCorpus.from_dataset(tokenized, vocab_size=len(tokenizer))
    folder = Path(corpus.tokens.filename).parent
    assert folder.is_dir()

    del corpus
    import gc

    gc.collect()
    assert not folder.exists()


def test_batches_equal_fastai_lmdataloader(corpus):
    from fastai.text.all import LMDataLoader

    documents = [torch.from_numpy(corpus.document(i).astype(np.int64)) for i in range(corpus.num_documents)]
    fastai_batches = list(LMDataLoader(documents, bs=8, seq_len=70, shuffle=False))
    stream = LanguageModelingStream(corpus, batch_size=8, bptt=70)

    ours = list(stream)

    assert len(ours) == len(stream) == len(fastai_batches)
    assert ours[-1]["input_ids"].shape[1] < 70  # the last batch is shorter, as in fastai
    for batch, (x, y) in zip(ours, fastai_batches):
        assert batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["input_ids"], torch.as_tensor(x))
        assert torch.equal(batch["shift_labels"], torch.as_tensor(y))


def test_last_token_is_kept_back_for_the_last_label():
    from fastai.text.all import LMDataLoader

    # 60 tokens in 4 rows: 15 per row would leave the last row no next token for its last label, so rows are 14.
    lengths = [7, 13, 20, 20]
    tokens = np.arange(sum(lengths), dtype=np.uint16)
    corpus = TokenizedCorpus(tokens, np.concatenate([[0], np.cumsum(lengths)]))
    documents = [torch.from_numpy(corpus.document(i).astype(np.int64)) for i in range(4)]

    batches = list(LanguageModelingStream(corpus, batch_size=4, bptt=5))

    fastai_batches = list(LMDataLoader(documents, bs=4, seq_len=5, shuffle=False))
    assert len(batches) == len(fastai_batches) == 3
    for batch, (x, y) in zip(batches, fastai_batches):
        assert torch.equal(batch["input_ids"], torch.as_tensor(x))
        assert torch.equal(batch["shift_labels"], torch.as_tensor(y))
    assert [batch["input_ids"].shape[1] for batch in batches] == [5, 5, 4]
    assert batches[-1]["shift_labels"][-1, -1] == 56


def test_each_row_continues_where_the_previous_batch_ended(corpus):
    stream = LanguageModelingStream(corpus, batch_size=4, bptt=50)
    batches = list(stream)

    for previous, current in zip(batches, batches[1:]):
        assert torch.equal(current["input_ids"][:, 0], previous["shift_labels"][:, -1])
    rows = torch.cat([batch["input_ids"] for batch in batches], dim=1).numpy()
    stream_tokens = joined_stream(corpus, np.arange(corpus.num_documents))
    for row in range(4):
        start = row * stream.row_length
        assert np.array_equal(rows[row], stream_tokens[start : start + stream.row_length])


def test_each_epoch_shuffles_documents_with_a_seed(corpus):
    from fastai.text.all import LMDataLoader

    stream = LanguageModelingStream(corpus, batch_size=4, bptt=60, shuffle=True, seed=3)
    first_order, first_batch = stream.document_order(), stream.batch(0)
    stream.set_epoch(1)
    second_order = stream.document_order()

    assert sorted(first_order.tolist()) == list(range(corpus.num_documents))
    assert not np.array_equal(first_order, second_order)
    assert not torch.equal(stream.batch(0)["input_ids"], first_batch["input_ids"])
    replay = LanguageModelingStream(corpus, batch_size=4, bptt=60, shuffle=True, seed=3)
    assert np.array_equal(replay.document_order(), first_order)
    other_seed = LanguageModelingStream(corpus, batch_size=4, bptt=60, shuffle=True, seed=4)
    assert not np.array_equal(other_seed.document_order(), first_order)

    # Shuffling reorders whole documents before they are joined, as fastai's LMDataLoader does.
    documents = [torch.from_numpy(corpus.document(i).astype(np.int64)) for i in second_order]
    for batch, (x, y) in zip(stream, LMDataLoader(documents, bs=4, seq_len=60, shuffle=False)):
        assert torch.equal(batch["input_ids"], torch.as_tensor(x))
        assert torch.equal(batch["shift_labels"], torch.as_tensor(y))


def test_variable_bptt_follows_awd_lstm(corpus):
    stream = LanguageModelingStream(corpus, batch_size=4, bptt=40, variable_bptt=True, min_seq_len=5, seed=1)
    batches = list(stream)
    seq_lens = stream.seq_lens

    assert len(batches) == len(stream) == len(seq_lens)
    assert [batch["input_ids"].shape[1] for batch in batches] == seq_lens.tolist()
    assert seq_lens.sum() == stream.row_length
    assert seq_lens[:-1].min() >= 5
    assert len(set(seq_lens.tolist())) > 5
    assert 35 < np.median(seq_lens) < 45
    assert (seq_lens[:-1] < 30).any()  # the bptt/2 draws
    for previous, current in zip(batches, batches[1:]):
        assert torch.equal(current["input_ids"][:, 0], previous["shift_labels"][:, -1])
    stream.set_epoch(1)
    assert not np.array_equal(stream.seq_lens[:20], seq_lens[:20])


def test_distributed_ranks_read_disjoint_blocks_of_one_stream(corpus):
    world_size, batch_size = 3, 2
    ranks = [
        LanguageModelingStream(corpus, batch_size, bptt=30, shuffle=True, rank=rank, world_size=world_size)
        for rank in range(world_size)
    ]
    single = LanguageModelingStream(corpus, batch_size * world_size, bptt=30, shuffle=True)

    assert len({len(stream) for stream in ranks}) == 1 and len(ranks[0]) == len(single)
    # Rank r reads rows r*B..(r+1)*B-1 of the one stream cut into W*B rows: its own block, disjoint from the others.
    for together, *per_rank in zip(single, *ranks):
        assert torch.equal(torch.cat([batch["input_ids"] for batch in per_rank]), together["input_ids"])
        assert torch.equal(torch.cat([batch["shift_labels"] for batch in per_rank]), together["shift_labels"])


def test_position_is_restored_for_resume(corpus):
    stream = LanguageModelingStream(corpus, batch_size=4, bptt=30, shuffle=True, variable_bptt=True)
    stream.set_epoch(2)
    iterator = iter(stream)
    for _ in range(3):
        next(iterator)
    state = stream.state_dict()
    expected = next(iterator)

    resumed = LanguageModelingStream(corpus, batch_size=4, bptt=30, shuffle=True, variable_bptt=True)
    resumed.load_state_dict(state)
    assert state == {"epoch": 2, "batch_index": 3}
    assert torch.equal(next(iter(resumed))["input_ids"], expected["input_ids"])
    assert len(list(resumed)) == len(stream) - 4


def test_dataloader_wrapping_keeps_whole_batches(corpus):
    stream = LanguageModelingStream(corpus, batch_size=4, bptt=30)
    loader = torch.utils.data.DataLoader(stream, batch_size=None)

    assert len(loader) == len(stream)
    assert torch.equal(next(iter(loader))["input_ids"], stream.batch(0)["input_ids"])


def test_corpus_too_small_for_one_batch(corpus):
    with pytest.raises(DataValidationError, match=r"need 1,050,001 tokens, but it has " + f"{corpus.num_tokens:,}"):
        LanguageModelingStream(corpus, batch_size=500, bptt=70, world_size=30)


# ---------------------------------------------------------------------------------------------------------------------
# Classification batches
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classification_dataset(imdb_rows, tokenizer) -> datasets.Dataset:
    encoded, _, _ = encode_labels(datasets.Dataset.from_list(imdb_rows), label_names=["neg", "pos"])
    return tokenize_for_classification(encoded, tokenizer)


def test_tokenize_for_classification(classification_dataset, imdb_rows, tokenizer):
    assert set(classification_dataset.column_names) == {"input_ids", "length", "labels"}
    assert classification_dataset[3]["input_ids"] == tokenizer(imdb_rows[3]["text"])["input_ids"]
    assert classification_dataset["labels"] == [row["label"] for row in imdb_rows]
    assert classification_dataset["length"] == [len(ids) for ids in classification_dataset["input_ids"]]

    truncated = tokenize_for_classification(datasets.Dataset.from_list(imdb_rows[:5]), tokenizer, max_length=20)
    assert max(truncated["length"]) == 20


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_collator_pads_and_masks(classification_dataset, tokenizer, padding_side):
    features = [classification_dataset[i] for i in range(3)]
    batch = ClassificationCollator(tokenizer, padding_side=padding_side)(features)

    longest = max(len(feature["input_ids"]) for feature in features)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, longest)
    assert batch["labels"].tolist() == [feature["labels"] for feature in features]
    for row, feature in enumerate(features):
        ids, mask = batch["input_ids"][row], batch["attention_mask"][row].bool()
        assert ids[mask].tolist() == feature["input_ids"]
        assert (ids[~mask] == tokenizer.pad_token_id).all()
        kept = torch.nonzero(mask).flatten()
        assert kept[-1] == longest - 1 if padding_side == "left" else kept[0] == 0


def test_collator_needs_a_pad_token():
    word_level = Tokenizer(models.WordLevel({"a": 0, "xxunk": 1}, unk_token="xxunk"))
    without_pad = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="xxunk")

    with pytest.raises(ValueError, match="no pad token"):
        ClassificationCollator(without_pad)


def padding(batches: list[list[int]], lengths: np.ndarray) -> int:
    return sum(int(lengths[batch].max()) * len(batch) - int(lengths[batch].sum()) for batch in batches)


def test_sorted_sampler_keeps_padding_small_and_uses_every_example_once(classification_dataset):
    lengths = np.array(classification_dataset["length"])
    sampler = SortedBatchSampler(lengths, batch_size=8, chunk_batches=5, seed=0)
    batches = list(sampler)

    assert len(batches) == len(sampler) == 25
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert int(np.argmax(lengths)) in batches[0]
    random_order = np.random.default_rng(0).permutation(len(lengths))
    random_batches = [random_order[i : i + 8].tolist() for i in range(0, len(lengths), 8)]
    assert padding(batches, lengths) < padding(random_batches, lengths) / 2

    # Batches are shuffled too, not served chunk by chunk from longest to shortest.
    batch_maxima = [int(lengths[batch].max()) for batch in batches]
    chunks = [batch_maxima[i : i + 5] for i in range(0, len(batch_maxima), 5)]
    assert not all(chunk == sorted(chunk, reverse=True) for chunk in chunks)

    sampler.set_epoch(1)
    assert list(sampler) != batches
    assert list(SortedBatchSampler(lengths, batch_size=8, chunk_batches=5, seed=0)) == batches


def test_sorted_sampler_for_evaluation_sorts_by_length(classification_dataset):
    lengths = np.array(classification_dataset["length"])
    batches = list(SortedBatchSampler(lengths, batch_size=16, shuffle=False))

    order = [i for batch in batches for i in batch]
    assert sorted(order) == list(range(len(lengths)))
    assert (np.diff(lengths[order]) <= 0).all()
    assert len(list(SortedBatchSampler(lengths, batch_size=16, shuffle=False, drop_last=True))) == 200 // 16


def test_sorted_sampler_feeds_a_dataloader(classification_dataset, tokenizer):
    sampler = SortedBatchSampler(classification_dataset["length"], batch_size=16)
    loader = torch.utils.data.DataLoader(
        classification_dataset, batch_sampler=sampler, collate_fn=ClassificationCollator(tokenizer)
    )

    batches = list(loader)
    assert sum(len(batch["labels"]) for batch in batches) == len(classification_dataset)
    assert batches[0]["input_ids"].shape[1] == max(classification_dataset["length"])
