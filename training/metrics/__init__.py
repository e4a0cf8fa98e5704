"""Evaluation metrics for ULMFiT, shipped as `evaluate` modules so they load without the Hub.

Each metric lives in its own folder (`accuracy/`, `f1/`, `error_rate/`, `perplexity/`) as a regular
`evaluate.Metric` script; `evaluate.load("<path to the folder>")` works as well as `load_metric(name)`.
"""

from collections.abc import Callable
from pathlib import Path

import evaluate
import numpy as np
from transformers import EvalPrediction

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE_METRICS = ("accuracy", "f1", "error_rate", "perplexity")
CLASSIFICATION_METRICS = ("accuracy", "f1", "error_rate")


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load one of the project's metrics by name (`"accuracy"`, `"f1"`, `"error_rate"` or `"perplexity"`)."""
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"Unknown metric {name!r}; choose one of {', '.join(AVAILABLE_METRICS)}.")
    return evaluate.load(str(METRICS_DIR / name), **kwargs)


# What a classifier stage reports for each `problem_type` (and its from-scratch twin, as baselines).
HEADLINE_METRICS = {
    "single_label_classification": ("accuracy", "f1", "error_rate"),
    "multi_label_classification": ("accuracy", "f1_micro", "f1_macro", "subset_accuracy"),
    "regression": ("mse", "mae"),
}
MULTI_LABEL_THRESHOLD = 0.5  # a class is predicted when its sigmoid reaches this (fastai's `accuracy_multi`)


def classification_compute_metrics(
    problem_type: str = "single_label_classification", threshold: float = MULTI_LABEL_THRESHOLD
) -> Callable[[EvalPrediction], dict[str, float]]:
    """
    Build a `compute_metrics` function for `transformers.Trainer` on a classification task.

    The returned function takes the trainer's `EvalPrediction` (logits of shape `(num_examples, num_labels)` and the
    targets) and returns, for single-label classes, `{"accuracy", "f1" (macro), "error_rate"}`; for multi-label
    classes (a sigmoid per class, predicted at `threshold`), fastai's `accuracy_multi` (every class decision counted)
    as `accuracy`, F1 micro and macro, and `subset_accuracy` (every class of a document right); for regression, the
    mean squared and absolute errors.
    """
    if problem_type not in HEADLINE_METRICS:
        raise ValueError(f"Unknown problem_type {problem_type!r}; choose one of {', '.join(HEADLINE_METRICS)}.")
    metrics = {name: load_metric(name) for name in CLASSIFICATION_METRICS}

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits, labels = eval_pred.predictions, np.asarray(eval_pred.label_ids)
        # Models that return extra outputs hand the trainer a tuple whose first item is the logits.
        if isinstance(logits, tuple):
            logits = logits[0]
        logits = np.asarray(logits, dtype=np.float64)
        if problem_type == "regression":
            errors = logits.reshape(-1) - labels.reshape(-1)
            return {"mse": float(np.mean(errors**2)), "mae": float(np.mean(np.abs(errors)))}
        if problem_type == "multi_label_classification":
            from sklearn.metrics import f1_score

            predicted, truth = (1 / (1 + np.exp(-logits)) >= threshold), labels >= 0.5
            return {
                "accuracy": float((predicted == truth).mean()),
                "f1_micro": float(f1_score(truth, predicted, average="micro", zero_division=0)),
                "f1_macro": float(f1_score(truth, predicted, average="macro", zero_division=0)),
                "subset_accuracy": float((predicted == truth).all(axis=1).mean()),
            }
        predictions = logits.argmax(axis=-1)
        results = {}
        for metric in metrics.values():
            results.update(metric.compute(predictions=predictions, references=labels))
        return results

    return compute_metrics
