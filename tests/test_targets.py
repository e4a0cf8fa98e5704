"""Multi-label and regression classifiers from a recipe, on real IMDb reviews and their real star ratings.

The multi-label set is built from the bundled reviews' own ratings (1-4 and 7-10 stars): each review is tagged
`positive` (7 stars or more), `enthusiastic` (9 or more) and `scathing` (2 or fewer), so a review has zero, one or two
tags. The regression set predicts the rating itself.
"""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from ulmfit.cli import main
from ulmfit.data import DataSpec, DataValidationError, encode_targets, load_data
from ulmfit.metrics import classification_compute_metrics

DEMO_DATA = Path(__file__).resolve().parent.parent / "training" / "demo_data"
TAGS = ["enthusiastic", "positive", "scathing"]


def tags(rating: int) -> list[str]:
    rules = (("positive", rating >= 7), ("enthusiastic", rating >= 9), ("scathing", rating <= 2))
    return [tag for tag, applies in rules if applies]


def reviews(split: str, limit: int) -> list[dict]:
    with gzip.open(DEMO_DATA / f"imdb_{split}.jsonl.gz", "rt", encoding="utf-8") as file:
        rows = [json.loads(line) for _, line in zip(range(limit), file)]
    return [{"text": row["text"], "tags": tags(row["rating"]), "rating": row["rating"]} for row in rows]


@pytest.fixture(scope="module")
def imdb_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("imdb_targets")
    files = {}
    for split, limit in (("train", 300), ("test", 60)):
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(row) + "\n" for row in reviews(split, limit)))
    return files


def recipe(tmp_path: Path, imdb_files: dict[str, Path], label_column: str, extra: str = "") -> str:
    path = tmp_path / f"{label_column}.yaml"
    path.write_text(f"""
name: targets
seed: 3
model: {{emb_size: 16, hidden_size: 32, num_layers: 2, bptt: 20, max_len: 60}}
tokenizer: {{kind: fastai, max_vocab: 3000, min_freq: 2}}
stages:
  pretrain:
    data: {{path: "{imdb_files['train']}", format: json, label_column: null}}
    training: {{max_steps: 2, per_device_train_batch_size: 8}}
  classifier:
    parent: pretrain
    data: {{path: "{imdb_files['train']}", format: json, label_column: {label_column}}}
    test_data: {{path: "{imdb_files['test']}", format: json, label_column: {label_column}}}
    max_tokens: 60
    compare_from_scratch: true
    compare_tfidf: true
    {extra}
    training: {{num_train_epochs: 1, learning_rate: 0.01, per_device_train_batch_size: 16}}
""")
    return str(path)


def test_lists_of_class_names_are_multi_hot_and_floats_or_declared_numbers_are_regression(imdb_files):
    dataset = load_data(DataSpec(path=str(imdb_files["train"]), format="json"))
    multi, label2id, _, problem = encode_targets(dataset, "tags")
    assert problem == "multi_label_classification" and list(label2id) == TAGS
    first = reviews("train", 1)[0]
    assert multi[0]["tags"] == [float(tag in first["tags"]) for tag in TAGS]
    ratings, label2id, _, problem = encode_targets(dataset, "rating", problem_type="regression")
    assert problem == "regression" and label2id == {"rating": 0} and ratings[0]["rating"] == float(first["rating"])
    assert encode_targets(dataset, "rating")[3] == "single_label_classification"  # integers are class ids
    with pytest.raises(DataValidationError, match=r"names \['enthusiastic'\] outside the label set"):
        encode_targets(dataset, "tags", label_names=["positive", "scathing"])
    with pytest.raises(DataValidationError, match="regression needs numbers"):
        encode_targets(dataset, "text", problem_type="regression")
    with pytest.raises(DataValidationError, match="multi-label classes are lists of class names"):
        encode_targets(dataset, "rating", problem_type="multi_label_classification")


def test_labels_mixing_kinds_are_named(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a good film", "label": "pos"}\n{"text": "a bad film", "label": ["neg"]}\n')
    with pytest.raises(DataValidationError, match="Label column 'label' mixes kinds of labels"):
        encode_targets(load_data(DataSpec(path=str(mixed))), "label")


def test_multi_label_and_regression_metrics():
    logits = np.array([[2.0, -1.0, 0.5], [-3.0, 1.0, -0.2]])  # predicted: {0, 2}, {1}
    labels = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    multi = classification_compute_metrics("multi_label_classification")(EvalPrediction(logits, labels))
    assert multi["accuracy"] == pytest.approx(5 / 6) and multi["subset_accuracy"] == 0.5
    from fastai.metrics import accuracy_multi

    assert multi["accuracy"] == pytest.approx(float(accuracy_multi(torch.tensor(logits), torch.tensor(labels))))
    assert multi["f1_micro"] == pytest.approx(2 * 2 / (2 * 2 + 1))  # tp 2, fp 1, fn 0
    predicted, ratings = np.array([[7.0], [2.0]]), np.array([9.0, 1.0])
    regression = classification_compute_metrics("regression")(EvalPrediction(predicted, ratings))
    assert regression == {"mse": pytest.approx(2.5), "mae": pytest.approx(1.5)}


def test_a_multi_label_classifier_from_a_recipe_reports_f1_and_predicts_label_sets(imdb_files, tmp_path):
    # Every labelled review trains (eval_fraction 0: no evaluation split), and the twin at its own rate.
    extra = "eval_fraction: 0.0\n    from_scratch_training: {learning_rate: 0.002}"
    path = recipe(tmp_path, imdb_files, "tags", extra=extra)
    assert main(["run", path, "--output-dir", str(tmp_path / "runs")]) == 0
    folder = tmp_path / "runs" / "classifier"
    record = json.loads((folder / "ulmfit_stage.json").read_text())
    assert set(record["metrics"]) == {"test_accuracy", "test_f1_micro", "test_f1_macro", "test_subset_accuracy"}
    assert "from_scratch_test_f1_micro" in record["baselines"] and "tfidf_test_accuracy" not in record["baselines"]
    # The twin trained at its own rate, and the card says so.
    assert (record["hyperparameters"]["learning_rate"], record["hyperparameters"]["from_scratch_learning_rate"]) == (
        0.01, 0.002)
    assert "from_scratch_learning_rate" in (folder / "README.md").read_text()
    assert json.loads((folder / "config.json").read_text())["problem_type"] == "multi_label_classification"

    texts = tmp_path / "texts.txt"
    texts.write_text("A wonderful, moving film.\nThe worst film I have seen.\n")
    assert main(["predict", str(folder), str(texts), "--output", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for row in rows:
        assert set(row["probabilities"]) == set(TAGS) and "label" not in row
        assert row["labels"] == [tag for tag, p in row["probabilities"].items() if p >= 0.5]


def test_a_regression_from_a_recipe_reports_errors_and_predicts_values(imdb_files, tmp_path):
    path = recipe(tmp_path, imdb_files, "rating", extra="problem_type: regression")
    assert main(["run", path, "--output-dir", str(tmp_path / "runs")]) == 0
    folder = tmp_path / "runs" / "classifier"
    record = json.loads((folder / "ulmfit_stage.json").read_text())
    assert set(record["metrics"]) == {"test_mse", "test_mae"} and record["metrics"]["test_mse"] > 0
    assert set(record["baselines"]) == {"from_scratch_test_mse", "from_scratch_test_mae"}

    texts = tmp_path / "texts.txt"
    texts.write_text("A wonderful, moving film.\n")
    assert main(["predict", str(folder), str(texts), "--output", str(tmp_path / "out.jsonl")]) == 0
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert set(row) == {"text", "value"} and isinstance(row["value"], float)
