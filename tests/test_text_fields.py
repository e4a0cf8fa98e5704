"""Several text fields read as one text, as fastai's `Tokenizer.from_df(text_cols=[...])` reads them: the same field
markers, vocabulary and ids, in training and in `ulmfit predict`; errors that name the column."""

import gzip
import json
from pathlib import Path

import pytest

from ulmfit.cli import main, read_texts
from ulmfit.data import DataSpec, join_fields, join_text_fields, load_data
from ulmfit.stages import has_field_markers
from ulmfit.tokenizer_training import train_fastai_tokenizer, train_subword_tokenizer

DEMO_DATA = Path(__file__).resolve().parent.parent / "training" / "demo_data"


@pytest.fixture(scope="module")
def articles() -> list[dict]:
    """WikiText-2's validation articles as (title, first paragraph): real text in two fields."""
    with gzip.open(DEMO_DATA / "wikitext2_valid.txt.gz", "rt", encoding="utf-8") as file:
        lines = [line.strip() for line in file if line.strip()]
    rows, title = [], None
    for line in lines:
        if line.startswith("= ") and not line.startswith("= ="):
            title = line.strip("= ").strip()
        elif title is not None and not line.startswith("="):
            rows.append({"title": title, "body": line})
            title = None
    assert len(rows) > 50
    return rows


@pytest.fixture
def articles_file(articles, tmp_path) -> Path:
    path = tmp_path / "articles.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in articles))
    return path


def test_joined_fields_give_fastais_vocabulary_and_ids(articles, articles_file):
    import pandas as pd
    from fastai.text.all import ColReader, DataBlock, TextBlock

    block = TextBlock.from_df(["title", "body"], is_lm=True, min_freq=2, n_workers=0)
    all_in_train = lambda items: (list(range(len(items))), [])  # noqa: E731
    fastai = DataBlock(blocks=block, get_x=ColReader("text"), splitter=all_in_train).datasets(pd.DataFrame(articles))

    spec = DataSpec(path=str(articles_file), text_column=["title", "body"])
    dataset = join_text_fields(load_data(spec), spec, fastai_markers=True)
    tokenizer = train_fastai_tokenizer(dataset, min_freq=2, text_column=spec.text_key, show_progress=False)

    assert spec.text_key == "title+body" and dataset[0]["title+body"].startswith("xxfld 1 ")
    assert tokenizer.itos == list(fastai.vocab)
    assert tokenizer(list(dataset[spec.text_key]))["input_ids"] == [
        fastai.train[i][0].tolist() for i in range(len(articles))
    ]
    assert fastai.train[0][0][:3].tolist() == tokenizer.convert_tokens_to_ids(["xxbos", "xxfld", "1"])


def test_subword_tokenizers_read_fields_one_per_line(articles):
    fields = [articles[0]["title"], articles[0]["body"]]
    assert join_fields(fields, fastai_markers=False) == f"{fields[0]}\n{fields[1]}"
    subword = train_subword_tokenizer([row["body"] for row in articles], vocab_size=300)
    fastai_words = train_fastai_tokenizer([row["body"] for row in articles], show_progress=False)
    assert (has_field_markers(fastai_words), has_field_markers(subword)) == (True, False)


def test_a_stage_and_predict_read_several_columns(articles, articles_file, tmp_path, capsys):
    recipe = tmp_path / "fields.yaml"
    recipe.write_text(f"""
name: fields
seed: 1
model: {{emb_size: 16, hidden_size: 32, num_layers: 2, bptt: 20, max_len: 60}}
tokenizer: {{kind: fastai, max_vocab: 2000, min_freq: 1}}
stages:
  pretrain:
    data: {{path: "{articles_file}", format: json, text_column: [title, body]}}
    training: {{max_steps: 2, per_device_train_batch_size: 4}}
""")
    assert main(["pretrain", str(recipe), "--output-dir", str(tmp_path / "runs")]) == 0
    vocab = json.loads((tmp_path / "runs" / "pretrain" / "vocab.json").read_text())
    assert "xxfld" in vocab and vocab.index("xxfld") == 4  # a special token, counted where fastai counts it

    csv_file = tmp_path / "articles.csv"
    csv_file.write_text("title,body\n" + "".join(f'"{r["title"]}","{r["body"][:80]}"\n' for r in articles[:3]))
    texts = read_texts(str(csv_file), ["title", "body"])
    assert texts[0] == f"xxfld 1 {articles[0]['title']} xxfld 2 {articles[0]['body'][:80]}"
    with pytest.raises(ValueError, match="has no column 'summary'"):
        read_texts(str(csv_file), ["title", "summary"])


def test_bad_text_column_lists_are_named(articles_file, tmp_path, capsys):
    with pytest.raises(ValueError, match="several text columns need csv, tsv, json, parquet"):
        DataSpec(path="notes.txt", format="text", text_column=["a", "b"])
    with pytest.raises(ValueError, match="a column name or a list of them"):
        DataSpec(path=str(articles_file), text_column=["title", 3])
    spec = DataSpec(path=str(articles_file), text_column=["title", "summary"])
    with pytest.raises(ValueError, match="no column 'summary'"):
        join_text_fields(load_data(spec), spec, fastai_markers=True)
