"""Macro-averaged F1: the unweighted mean of the per-class F1 scores."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Macro F1 averages the F1 score of every class with equal weight, so rare classes count as much as
frequent ones. Per class, F1 = 2 * TP / (2 * TP + FP + FN). As in scikit-learn's
`f1_score(average="macro")`, the classes are those that appear in the references or the predictions
(unless `labels` is given), and a class with no true or predicted example scores 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids.
    labels (`list[int]`, *optional*): the classes to average over; defaults to every class seen in
        `references` or `predictions`.
Returns:
    f1 (`float`): between 0.0 and 1.0.
Examples:
    >>> f1 = evaluate.load("training/metrics/f1")
    >>> f1.compute(predictions=[0, 0, 1, 1], references=[0, 1, 1, 1])
    {'f1': 0.7333333333333334}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, labels=None) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.size == 0:
            raise ValueError("f1 needs at least one prediction; got none.")
        classes = np.union1d(predictions, references) if labels is None else np.asarray(labels)
        scores = []
        for label in classes:
            true_positives = np.sum((predictions == label) & (references == label))
            predicted, actual = np.sum(predictions == label), np.sum(references == label)
            denominator = predicted + actual  # = 2 * TP + FP + FN
            scores.append(2 * true_positives / denominator if denominator else 0.0)
        return {"f1": float(np.mean(scores))}
