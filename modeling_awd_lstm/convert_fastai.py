"""Map fastai 2.8 AWD-LSTM weights onto this package's models."""

import re

import torch

_ENCODER_KEYS = [
    (r"encoder\.weight", "model.embed_tokens.weight"),
    (r"rnns\.(\d+)\.weight_hh_l0_raw", r"model.layers.\1.lstm.weight_hh_l0"),
    (r"rnns\.(\d+)\.module\.(weight_ih_l0|bias_ih_l0|bias_hh_l0)", r"model.layers.\1.lstm.\2"),
]
_HEAD_PARTS = {"0": 0, "2": 2}  # fastai `LinBnDrop` children: 0 BatchNorm1d, 1 Dropout, 2 Linear


def convert_fastai_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Rename a fastai `get_language_model` or `get_text_classifier` state dict (AWD_LSTM) to this package's keys.

    Returns the new state dict and the kind of model it holds: "lm" or "classifier".
    """
    if any(key.startswith("0.module.") for key in state_dict):
        kind, encoder_prefix = "classifier", "0.module."
    elif any(key.startswith("0.rnns.") for key in state_dict):
        kind, encoder_prefix = "lm", "0."
    else:
        raise ValueError(
            "This is not a fastai AWD-LSTM state dict: expected keys like '0.encoder.weight' and "
            "'0.rnns.0.weight_hh_l0_raw' (language model) or '0.module.rnns.0...' (classifier)."
        )
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = _convert_key(key, encoder_prefix)
        if new_key is not None:
            converted[new_key] = tensor
    return converted, kind


def _convert_key(key: str, encoder_prefix: str) -> str | None:
    if key.startswith(encoder_prefix):
        inner = key[len(encoder_prefix):]
        if inner.startswith("encoder_dp."):
            return None  # the same tensor as `encoder.weight`
        for pattern, target in _ENCODER_KEYS:
            if re.fullmatch(pattern, inner):
                return re.sub(pattern, target, inner)
        raise KeyError(f"Unexpected fastai AWD-LSTM key {key!r}.")
    if key.startswith("1.decoder."):
        return "lm_head." + key[len("1.decoder."):]
    match = re.fullmatch(r"1\.layers\.(\d+)\.(\d+)\.(.+)", key)
    if match and match.group(2) in _HEAD_PARTS:
        block, part, name = int(match.group(1)), match.group(2), match.group(3)
        # Our head is one flat Sequential: [BatchNorm1d, Dropout, Linear, ReLU] per block.
        return f"classifier.layers.{4 * block + _HEAD_PARTS[part]}.{name}"
    raise KeyError(f"Unexpected fastai AWD-LSTM key {key!r}.")


__all__ = ["convert_fastai_state_dict"]
