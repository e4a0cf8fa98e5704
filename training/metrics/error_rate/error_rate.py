"""Error rate: the fraction of predictions that differ from their reference label (1 - accuracy)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Error rate is the proportion of wrong predictions among all predictions, 1 - accuracy. The ULMFiT paper
(Howard & Ruder, 2018) reports its classification results as error rates.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids.
Returns:
    error_rate (`float`): between 0.0 and 1.0.
Examples:
    >>> error_rate = evaluate.load("training/metrics/error_rate")
    >>> error_rate.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'error_rate': 0.25}
"""

_CITATION = """
@inproceedings{howard-ruder-2018-universal,
    title = "Universal Language Model Fine-tuning for Text Classification",
    author = "Howard, Jeremy and Ruder, Sebastian",
    booktitle = "Proceedings of ACL 2018",
    year = "2018",
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ErrorRate(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.size == 0:
            raise ValueError("error_rate needs at least one prediction; got none.")
        return {"error_rate": float(np.mean(predictions != references))}
