"""Perplexity of a language model, from its mean cross-entropy loss."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Perplexity is exp(mean cross-entropy), the cross-entropy being measured in nats per predicted token.
Give one loss per evaluation batch; with `num_tokens` the batch losses are averaged weighted by the
number of tokens each batch predicted (needed when batches differ in length, as the last batch of a
language-model stream does), otherwise they are averaged equally.
"""

_KWARGS_DESCRIPTION = """
Args:
    loss (`list[float]`): mean cross-entropy loss (natural log) of each batch.
    num_tokens (`list[int]`, *optional*): number of tokens each batch predicted, one per loss (given to
        `compute`, also when the losses were collected with `add_batch`).
Returns:
    perplexity (`float`): exp of the mean loss.
    loss (`float`): the mean loss.
Examples:
    >>> perplexity = evaluate.load("training/metrics/perplexity")
    >>> perplexity.compute(loss=[4.0, 5.0], num_tokens=[30, 10])
    {'perplexity': 70.105..., 'loss': 4.25}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"loss": datasets.Value("float64")}),
        )

    def _compute(self, loss, num_tokens=None) -> dict[str, float]:
        loss = np.asarray(loss, dtype=np.float64)
        if loss.size == 0:
            raise ValueError("perplexity needs at least one loss value; got none.")
        weights = None if num_tokens is None else np.asarray(num_tokens, dtype=np.float64)
        if weights is not None and weights.shape != loss.shape:
            raise ValueError(f"num_tokens needs one count per loss: got {weights.size} counts for {loss.size} losses.")
        if weights is not None and weights.sum() <= 0:
            raise ValueError(f"num_tokens must add up to a positive count; got {weights.tolist()}.")
        mean_loss = float(np.average(loss, weights=weights))
        return {"perplexity": float(np.exp(mean_loss)), "loss": mean_loss}
