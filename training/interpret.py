"""Which tokens a classifier's prediction rests on: fastai's intrinsic attention, and a page that shows it.

The importance of each token is fastai v1's `TextClassificationInterpretation.intrinsic_attention` (the sequential
Jacobian): the gradient of the predicted class's probability with respect to the token's embedding, its absolute
values summed over the embedding and divided by the largest, so the most important token weighs 1. Tokens that the
classifier does not pool over (those before its last `max_len`) weigh 0.
"""

import html
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from modeling_awd_lstm import AwdLstmForSequenceClassification


@dataclass
class Explanation:
    """A prediction and the weight of each of its tokens (1 for the most important)."""

    text: str
    label: str
    score: float
    tokens: list[str]
    importance: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def explain(
    model: AwdLstmForSequenceClassification,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    label: str | int | None = None,
) -> Explanation:
    """The importance of each token of `text` for the class `label` (a name or an id; the predicted class if None):
    its probability's gradient (a multi-label class's own sigmoid; a regression's predicted value)."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    embed, embeddings = model.get_input_embeddings(), []

    def embed_keeping_gradient(module, args, kwargs):
        # Each chunk goes in as its embeddings (the model's `inputs_embeds`), whose gradient is kept.
        chunk = embed(kwargs.pop("input_ids"))
        if chunk.requires_grad:  # chunks the classifier reads without a graph have no gradient
            chunk.retain_grad()
        embeddings.append(chunk)
        return args, {**kwargs, "inputs_embeds": chunk}

    was_training = model.training
    model.eval()  # dropout off, as fastai's `_eval_dropouts`
    hook = model.base_model.register_forward_pre_hook(embed_keeping_gradient, with_kwargs=True)
    try:
        with torch.enable_grad():
            probabilities = _scores(model(ids).logits.float()[0], model.config.problem_type)
            class_id = _class_id(model, label, probabilities)
            model.zero_grad()
            probabilities[class_id].backward()
    finally:
        hook.remove()
        model.zero_grad()
        model.train(was_training)
    # The classifier embeds its input in chunks of `bptt` tokens; their gradients line up with the tokens in order.
    gradient = torch.cat([chunk.grad if chunk.grad is not None else torch.zeros_like(chunk) for chunk in embeddings], 1)
    weights = gradient[0].float().abs().sum(dim=-1)
    weights = weights / weights.max() if weights.max() > 0 else weights
    return Explanation(
        text=text,
        label=model.config.id2label[class_id],
        score=float(probabilities[class_id].detach()),
        tokens=tokenizer.convert_ids_to_tokens(ids[0].tolist()),
        importance=[round(float(w), 6) for w in weights],
    )


def _scores(logits: torch.Tensor, problem_type: str | None) -> torch.Tensor:
    """What the classifier predicts per class: softmax probabilities, a sigmoid per class (multi-label) or the value
    itself (regression)."""
    if problem_type == "regression":
        return logits
    return logits.sigmoid() if problem_type == "multi_label_classification" else logits.softmax(dim=-1)


def _class_id(model, label: str | int | None, probabilities: torch.Tensor) -> int:
    if label is None:
        return int(probabilities.argmax())
    if isinstance(label, int):
        if not 0 <= label < len(probabilities):
            raise ValueError(f"Class id {label} is out of range: the classifier has {len(probabilities)} classes.")
        return label
    if label not in model.config.label2id:
        raise ValueError(f"Unknown class {label!r}; the classifier's classes are {list(model.config.label2id)}.")
    return int(model.config.label2id[label])


def explanations_html(explanations: list[Explanation], title: str = "Token importance") -> str:
    """A page with each text's tokens shaded by importance (darker weighs more), its label and score, and each
    token's weight on hover."""
    rows = []
    for explanation in explanations:
        spans = "".join(
            f'<span title="{weight:.3f}" style="background-color: rgba(220, 50, 32, {weight:.3f})">'
            f"{html.escape(token)}</span> "
            for token, weight in zip(explanation.tokens, explanation.importance)
        )
        rows.append(
            f"<p><b>{html.escape(explanation.label)}</b> ({explanation.score:.3f})</p>"
            f'<p style="line-height: 1.9">{spans}</p><hr>'
        )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>'
        f'<body style="font-family: sans-serif; max-width: 60em">\n<h1>{html.escape(title)}</h1>\n'
        + "\n".join(rows)
        + "\n</body></html>\n"
    )


def write_explanations_html(explanations: list[Explanation], path: str | Path, title: str = "Token importance") -> Path:
    path = Path(path)
    path.write_text(explanations_html(explanations, title), encoding="utf-8")
    return path


__all__ = ["Explanation", "explain", "explanations_html", "write_explanations_html"]
