"""Tests for the project's `evaluate` metric modules (`training/metrics/`) and the Trainer `compute_metrics`."""

import math

import evaluate
import numpy as np
import pytest
from transformers import EvalPrediction

from ulmfit.metrics import METRICS_DIR, classification_compute_metrics, load_metric

REFERENCES = [0, 0, 1, 1, 2, 2]
PREDICTIONS = [0, 1, 1, 1, 2, 0]


def test_each_metric_is_an_evaluate_module_loadable_by_path():
    for name in ("accuracy", "f1", "error_rate", "perplexity"):
        assert isinstance(evaluate.load(str(METRICS_DIR / name)), evaluate.Metric)


def test_accuracy_and_error_rate():
    assert load_metric("accuracy").compute(predictions=PREDICTIONS, references=REFERENCES) == {"accuracy": 4 / 6}
    assert load_metric("error_rate").compute(predictions=PREDICTIONS, references=REFERENCES) == {"error_rate": 2 / 6}


def test_macro_f1():
    f1 = load_metric("f1")
    # Per class 2*TP / (predicted + actual): class 0: 2/4, class 1: 4/5, class 2: 2/3.
    result = f1.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert result["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # A class that is only predicted counts, with F1 0; so does one listed in `labels` and never seen.
    assert f1.compute(predictions=[0, 3], references=[0, 0])["f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert f1.compute(predictions=[0, 1], references=[0, 1], labels=[0, 1, 2])["f1"] == pytest.approx(2 / 3)
    # Macro, not micro: the rare class weighs as much as the frequent one.
    assert f1.compute(predictions=[0] * 10, references=[0] * 9 + [1])["f1"] == pytest.approx((18 / 19) / 2)


def test_perplexity_from_mean_cross_entropy():
    perplexity = load_metric("perplexity")

    assert perplexity.compute(loss=[math.log(50.0)]) == {"perplexity": pytest.approx(50.0), "loss": math.log(50.0)}
    weighted = perplexity.compute(loss=[4.0, 5.0], num_tokens=[30, 10])
    assert weighted == {"perplexity": pytest.approx(math.exp(4.25)), "loss": pytest.approx(4.25)}
    perplexity.add_batch(loss=[4.0])
    perplexity.add_batch(loss=[5.0])
    assert perplexity.compute()["loss"] == pytest.approx(4.5)
    with pytest.raises(ValueError, match="one count per loss"):
        perplexity.compute(loss=[4.0, 5.0], num_tokens=[30])


def test_metrics_refuse_empty_inputs():
    with pytest.raises(ValueError, match="at least one prediction"):
        load_metric("accuracy").compute(predictions=[], references=[])


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="Unknown metric 'bleu'; choose one of accuracy, f1, error_rate, perplexity"):
        load_metric("bleu")


def test_classification_compute_metrics_for_trainer():
    compute_metrics = classification_compute_metrics()
    logits = np.eye(3)[PREDICTIONS] * 2.0 - 1.0

    results = compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array(REFERENCES)))

    assert results == {
        "accuracy": pytest.approx(4 / 6),
        "f1": pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3),
        "error_rate": pytest.approx(2 / 6),
    }
    # Models returning extra outputs give the trainer a tuple whose first item is the logits.
    from_tuple = compute_metrics(EvalPrediction(predictions=(logits, np.zeros(6)), label_ids=np.array(REFERENCES)))
    assert from_tuple == results
