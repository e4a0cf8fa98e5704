"""A forward and a backward classifier as one, as the paper's best results are: the mean of their probabilities.

A backward classifier comes from a recipe with `model.backwards: true` (every stage reads its text from the end); its
stage 1 must be a backward language model too.
"""

from pathlib import Path

from transformers import AutoConfig, Pipeline, PretrainedConfig, pipeline


def check_ensemble(forward: PretrainedConfig, backward: PretrainedConfig, names: tuple[str, str]) -> None:
    """A forward classifier first, a backward one second, with the same classes; else one line naming the fix."""
    if forward.backwards:
        raise ValueError(
            f"{names[0]} reads text backwards: give it as the backward classifier, and a forward one first."
        )
    if not backward.backwards:
        raise ValueError(
            f"{names[1]} reads text forwards: the backward classifier is one trained with `model.backwards: true`."
        )
    if forward.id2label != backward.id2label:
        raise ValueError(
            f"The two classifiers have different classes: {names[0]} {list(forward.id2label.values())}, "
            f"{names[1]} {list(backward.id2label.values())}."
        )


def mean_probabilities(scores: list[list[dict]]) -> dict[str, float]:
    """The mean, label by label, of several classifiers' `pipeline(..., top_k=None)` scores for one text."""
    labels = [entry["label"] for entry in scores[0]]
    return {
        label: sum(entry["score"] for one in scores for entry in one if entry["label"] == label) / len(scores)
        for label in labels
    }


def ensemble_classifiers(forward: str | Path, backward: str | Path) -> list[Pipeline]:
    """Text-classification pipelines (all scores) of a forward and a backward classifier, checked to pair up."""
    check_ensemble(AutoConfig.from_pretrained(forward, trust_remote_code=True),
                   AutoConfig.from_pretrained(backward, trust_remote_code=True), (str(forward), str(backward)))
    return [pipeline("text-classification", model=str(model), trust_remote_code=True, top_k=None)
            for model in (forward, backward)]


def predict_ensemble(texts: list[str], classifiers: list[Pipeline], batch_size: int = 32) -> list[dict[str, float]]:
    """Each text's probabilities, averaged over `classifiers` (e.g. `ensemble_classifiers(forward, backward)`)."""
    outputs = [classify(texts, batch_size=batch_size, truncation=False) for classify in classifiers]
    return [mean_probabilities(list(scores)) for scores in zip(*outputs)]


__all__ = ["check_ensemble", "ensemble_classifiers", "mean_probabilities", "predict_ensemble"]
