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


def classification_compute_metrics() -> Callable[[EvalPrediction], dict[str, float]]:
    """
    Build a `compute_metrics` function for `transformers.Trainer` on a classification task.

    The returned function takes the trainer's `EvalPrediction` (logits of shape `(num_examples, num_labels)`
    and the label ids) and returns `{"accuracy", "f1" (macro), "error_rate"}`.
    """
    metrics = {name: load_metric(name) for name in CLASSIFICATION_METRICS}

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        # Models that return extra outputs hand the trainer a tuple whose first item is the logits.
        if isinstance(logits, tuple):
            logits = logits[0]
        predictions = np.asarray(logits).argmax(axis=-1)
        results = {}
        for metric in metrics.values():
            results.update(metric.compute(predictions=predictions, references=np.asarray(labels)))
        return results

    return compute_metrics
