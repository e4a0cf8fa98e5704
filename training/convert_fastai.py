"""Convert fastai 2.x ULMFiT models (AWD_LSTM language models and text classifiers) to transformers folders.

Three kinds of source are accepted:

1. weights saved by `learn.save(...)` (a dict with "model" and "opt"), by `torch.save(learn.model.state_dict())`, or
   the pretrained WikiText-103 `.pth`, together with the vocabulary (a pickled list of tokens, e.g. `itos_wt103.pkl`)
   and, for a classifier, the label names;
2. an exported `Learner` (`learn.export()`), which carries its vocabulary, labels and dropouts;
3. a live `Learner`, in the fastai session that trained it ([`fastai_learner_to_transformers`]).

Sizes are read from the weights. The result computes exactly what fastai computes (see `modeling_awd_lstm.py`), and
the tokenizer ([`AwdLstmTokenizer`]) gives fastai's token ids.

The other way, [`to_fastai_state_dict`] gives a model's weights with fastai's keys and [`save_fastai_pretrained`]
writes a stage folder as the weights and vocabulary pair that fastai's `load_pretrained` starts from.

Pickles can run code when opened. Weights are read with `torch.load(weights_only=True)` (the few plain-data classes of
fastai's optimizer state are read as inert data), vocabularies with an unpickler that builds nothing but lists of
strings, and an exported `Learner`, which is a pickle of arbitrary objects, is opened only when the caller says that
they trust the file (`trust_pickle=True`).
"""

import copy
import hashlib
import io
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from modeling_awd_lstm.configuration_awd_lstm import AwdLstmConfig
from modeling_awd_lstm.modeling_awd_lstm import (
    AwdLstmForCausalLM,
    AwdLstmForSequenceClassification,
    AwdLstmPreTrainedModel,
)
from modeling_awd_lstm.tokenization_awd_lstm import (
    BOS,
    EOS,
    PAD,
    PRE_RULES,
    VOCAB_FILES_NAMES,
    AwdLstmTokenizer,
    lowercase,
)

logger = logging.get_logger(__name__)


class FastaiConversionError(ValueError):
    """The file or object cannot be converted as given; the message names the problem and how to fix it."""


# ----------------------------------------------------------------------------------------------------------------------
# State dict keys
# ----------------------------------------------------------------------------------------------------------------------
_ENCODER_KEYS = [
    (r"encoder\.weight", "model.embed_tokens.weight"),
    (r"rnns\.(\d+)\.weight_hh_l0_raw", r"model.layers.\1.lstm.weight_hh_l0"),
    (r"rnns\.(\d+)\.module\.(weight_ih_l0|bias_ih_l0|bias_hh_l0)", r"model.layers.\1.lstm.\2"),
]
# Older fastai checkpoints (such as the WikiText-103 `.pth`) also store the weight-dropped copy of the
# hidden-to-hidden matrix; the `_raw` one is the trained weight.
_LEGACY_DROPPED_KEY = re.compile(r"rnns\.(\d+)\.module\.weight_hh_l0")

# Keys of fastai models this package has no equivalent for, and what they are.
_UNSUPPORTED_ARCHITECTURES = [
    (re.compile(r"rnns\.\d+\.layers\.\d+\.linear\."), "a QRNN (fastai's `AWD_QRNN` / `AWD_LSTM(qrnn=True)`)"),
    (re.compile(r"\.mhra\.|\.pos_enc\.|^0\.(module\.)?[uv]$"), "a Transformer or Transformer-XL (fastai v1)"),
    (re.compile(r"_reverse(_raw)?$"), "a bidirectional AWD-LSTM (`bidir=True`)"),
]


def convert_fastai_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Rename a fastai `get_language_model` or `get_text_classifier` state dict (AWD_LSTM) to this package's keys.

    Returns the new state dict and the kind of model it holds: "lm" or "classifier".
    """
    keys = list(state_dict)
    for pattern, name in _UNSUPPORTED_ARCHITECTURES:
        if any(pattern.search(key) for key in keys):
            raise FastaiConversionError(
                f"This checkpoint holds {name}, which this package does not implement: only fastai's AWD_LSTM "
                "language models and text classifiers can be converted."
            )
    if any(key.startswith("0.module.") for key in keys):
        kind, encoder_prefix = "classifier", "0.module."
    elif any(key.startswith("0.rnns.") for key in keys):
        kind, encoder_prefix = "lm", "0."
    elif any(key.startswith("rnns.") for key in keys):
        raise FastaiConversionError(
            "This is an AWD-LSTM encoder alone (`learn.save_encoder`), without the language model's decoder or the "
            "classifier's head. Convert the whole model instead: `learn.save(name)` or "
            "`torch.save(learn.model.state_dict(), path)`."
        )
    else:
        raise FastaiConversionError(
            "This is not a fastai AWD-LSTM state dict: expected keys like '0.encoder.weight' and "
            "'0.rnns.0.weight_hh_l0_raw' (language model) or '0.module.rnns.0...' (classifier), "
            f"got {keys[:5]}{' ...' if len(keys) > 5 else ''}."
        )
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = _convert_key(key, encoder_prefix, state_dict)
        if new_key is not None:
            converted[new_key] = tensor
    return converted, kind


def _convert_key(key: str, encoder_prefix: str, state_dict: dict[str, torch.Tensor]) -> str | None:
    if key.startswith(encoder_prefix):
        inner = key[len(encoder_prefix):]
        if inner.startswith("encoder_dp."):
            return None  # the same tensor as `encoder.weight`
        legacy = _LEGACY_DROPPED_KEY.fullmatch(inner)
        if legacy:
            if f"{encoder_prefix}rnns.{legacy.group(1)}.weight_hh_l0_raw" in state_dict:
                return None
            return f"model.layers.{legacy.group(1)}.lstm.weight_hh_l0"
        for pattern, target in _ENCODER_KEYS:
            if re.fullmatch(pattern, inner):
                return re.sub(pattern, target, inner)
        raise FastaiConversionError(_unexpected_key_message(key))
    if key.startswith("1.decoder."):
        return "lm_head." + key[len("1.decoder."):]
    match = re.fullmatch(r"1\.layers\.(\d+)\.(\d+)\.(.+)", key)
    if match:
        block, part, name = int(match.group(1)), match.group(2), match.group(3)
        # fastai's `LinBnDrop` is [BatchNorm1d, Dropout, Linear], without the Dropout when p=0: the BatchNorm is
        # child 0 and the Linear is the other child with weights. Our head is one flat Sequential,
        # [BatchNorm1d, Dropout, Linear, ReLU] per block.
        return f"classifier.layers.{4 * block + (0 if part == '0' else 2)}.{name}"
    raise FastaiConversionError(_unexpected_key_message(key))


def _unexpected_key_message(key: str) -> str:
    return (
        f"Unexpected key {key!r} for a fastai 2.x AWD_LSTM language model or text classifier. The model was built "
        "differently (a custom head or encoder, a fastai v1 classifier head with biases); only models made by "
        "`language_model_learner` / `text_classifier_learner` (or `get_language_model` / `get_text_classifier`) "
        "with AWD_LSTM can be converted."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Reading files safely
# ----------------------------------------------------------------------------------------------------------------------
class _FastaiListData:
    """Inert stand-in for fastcore's `L`, which fastai's optimizer state (`learn.save(..., with_opt=True)`) holds.

    Only its data is kept (the optimizer state is never used here); no fastcore code runs.
    """


def _numpy_data_globals() -> list:
    # Optimizer hyper-parameters become numpy scalars when the learning rates are a `slice` (discriminative rates).
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    rebuilders = [
        (function, f"{module}.multiarray.{function.__name__}")
        for function in (multiarray.scalar, multiarray._reconstruct)
        for module in ("numpy._core", "numpy.core")
    ]
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return rebuilders + [np.ndarray, np.dtype, *dtype_classes]


def _weights_only_globals() -> list:
    return [(_FastaiListData, "fastcore.foundation.L"), *_numpy_data_globals()]


def _load_weights(path: Path) -> Any:
    """`torch.load(weights_only=True)`; raises `pickle.UnpicklingError` when the file holds anything else."""
    with torch.serialization.safe_globals(_weights_only_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _unsafe_globals(path: Path) -> list[str]:
    """Python objects that a `torch.save` file would build beyond plain data (read without running anything)."""
    if not zipfile.is_zipfile(path):
        return []
    with torch.serialization.safe_globals(_weights_only_globals()):
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)


def read_fastai_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """Open a fastai weights file (returns its state dict) or exported `Learner` (returns the `Learner`).

    Weights are read with `torch.load(weights_only=True)`. An exported `Learner` (`learn.export()`) is a pickle that
    runs code stored in the file when opened: it is opened with fastai's `load_learner` only if `trust_pickle=True`.
    """
    path = Path(path)
    if not path.is_file():
        raise FastaiConversionError(f"No such file: {path}.")
    not_a_checkpoint = (
        f"{path} is not a fastai checkpoint: pass the `.pth` written by `learn.save` or "
        "`torch.save(learn.model.state_dict())` (with its vocabulary), or the `.pkl` written by `learn.export()`."
    )
    try:
        checkpoint = _load_weights(path)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path)
        if not any(name.startswith("fastai.") for name in unsafe):
            found = f"it refers to {unsafe[:5]}" if unsafe else str(error).splitlines()[0]
            raise FastaiConversionError(f"{not_a_checkpoint} (Read as weights only: {found}.)") from None
        if not trust_pickle:
            raise FastaiConversionError(
                f"{path} is an exported fastai Learner (`learn.export()`). Opening it runs Python code stored in the "
                "file, which could do anything on this machine. If you trust where it comes from, convert it with "
                "`trust_pickle=True` (command line: `--trust-remote-pickle`). Otherwise, in the fastai session that "
                "made it, save the weights and vocabulary instead: `learn.save(name)` and "
                "`pickle.dump(list(learn.dls.vocab), f)` (for a classifier `learn.dls.vocab[0]` and label names)."
            ) from None
        return _load_learner(path)
    except (RuntimeError, EOFError, ValueError) as error:
        raise FastaiConversionError(f"{not_a_checkpoint} ({error.__class__.__name__}: {error})") from None
    if isinstance(checkpoint, dict) and set(checkpoint) == {"model", "opt"}:
        checkpoint = checkpoint["model"]  # `learn.save(..., with_opt=True)`
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise FastaiConversionError(
            f"{path} does not hold a state dict (a dict of tensors) but a {type(checkpoint).__name__}: pass the file "
            "written by `learn.save` or `torch.save(learn.model.state_dict())`."
        )
    return checkpoint


def _load_learner(path: Path) -> Any:
    try:
        from fastai.learner import load_learner
    except ImportError as error:
        raise FastaiConversionError(
            "Opening an exported Learner needs fastai (`pip install --no-deps fastai==2.8.12` and its text "
            "dependencies), with the same custom functions the Learner was exported with."
        ) from error
    with warnings.catch_warnings():
        # fastai's warning that pickles can run code: the caller has said that they trust this one.
        warnings.filterwarnings("ignore", message="load_learner` uses Python's insecure pickle")
        return load_learner(path, cpu=True)


class _TokenListUnpickler(pickle.Unpickler):
    """Builds lists and tuples of strings only: a pickle that asks for any other object (a function to call, a class
    to build) is refused before anything runs."""

    _ALLOWED = {("builtins", "list"), ("builtins", "str"), ("builtins", "tuple")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load `{module}.{name}`")


def load_fastai_vocab(path: str | os.PathLike) -> list[str]:
    """The vocabulary (tokens in id order) from a pickled list (`itos.pkl`, `pickle.dump(learn.dls.vocab, f)`) or a
    JSON list. Pickles are read by an unpickler that builds nothing but lists of strings."""
    path = Path(path)
    if not path.is_file():
        raise FastaiConversionError(f"No such vocabulary file: {path}.")
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            vocab = json.loads(data)
        except json.JSONDecodeError as error:
            raise FastaiConversionError(f"{path} is not valid JSON ({error}): expected a list of tokens.") from None
    else:
        try:
            vocab = _TokenListUnpickler(io.BytesIO(data)).load()
        except pickle.UnpicklingError as error:
            raise FastaiConversionError(
                f"{path} is not a plain pickled list of tokens ({error}); only such lists are read, since other "
                "pickles can run code. In fastai, save the vocabulary with `pickle.dump(list(learn.dls.vocab), f)` "
                "(for a classifier: `list(learn.dls.vocab[0])`), or pass a JSON list."
            ) from None
        except Exception as error:
            raise FastaiConversionError(f"{path} is not a pickle: {error.__class__.__name__}: {error}.") from None
    if not isinstance(vocab, (list, tuple)) or not all(isinstance(token, str) for token in vocab):
        raise FastaiConversionError(
            f"{path} must hold a list of tokens (strings) in id order, got a {type(vocab).__name__}"
            f"{' with non-string entries' if isinstance(vocab, (list, tuple)) else ''}."
        )
    return list(vocab)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Building the model
# ----------------------------------------------------------------------------------------------------------------------
# fastai's `max_len=None` (pool over the whole document) as a config value.
_NO_MAX_LEN = 2**31 - 1
# Learner defaults: `language_model_learner(drop_mult=1.)`, `text_classifier_learner(drop_mult=0.5)`.
_DEFAULT_DROP_MULT = {"lm": 1.0, "classifier": 0.5}
_INFERRED = ("vocab_size", "emb_size", "hidden_size", "num_layers", "num_labels", "classifier_hidden_sizes")


def _require(state_dict: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise FastaiConversionError(
            f"The checkpoint is incomplete: it has no `{key}` weights. Save the whole model again with `learn.save` "
            "or `torch.save(learn.model.state_dict())`."
        )
    return state_dict[key]


def _count_blocks(state_dict: dict[str, torch.Tensor], pattern: str, block_size: int = 1) -> int:
    """How many numbered blocks (layers) the keys matching `pattern` (one group: the index) name; at least one."""
    indices = [int(m.group(1)) for m in map(re.compile(pattern).match, state_dict) if m]
    return 1 + max(indices, default=0) // block_size


def _sizes_from_weights(state_dict: dict[str, torch.Tensor], kind: str) -> dict[str, Any]:
    """Config sizes read from a converted state dict."""
    vocab_size, emb_size = _require(state_dict, "model.embed_tokens.weight").shape
    num_layers = _count_blocks(state_dict, r"model\.layers\.(\d+)\.")
    widths = [_require(state_dict, f"model.layers.{i}.lstm.weight_hh_l0").shape[1] for i in range(num_layers)]
    hidden_size = widths[0] if num_layers > 1 else emb_size
    if widths[-1] != emb_size or any(width != hidden_size for width in widths[:-1]):
        raise FastaiConversionError(
            f"Unsupported AWD-LSTM layout: LSTM sizes {widths} with embedding size {emb_size}; fastai's AWD_LSTM has "
            "`n_hid` units in every layer but the last, which has `emb_sz`."
        )
    sizes = dict(vocab_size=vocab_size, emb_size=emb_size, hidden_size=hidden_size, num_layers=num_layers)
    if kind == "lm":
        decoder = _require(state_dict, "lm_head.weight")
        sizes["tie_word_embeddings"] = bool(torch.equal(decoder, state_dict["model.embed_tokens.weight"]))
        sizes["output_bias"] = "lm_head.bias" in state_dict
    else:
        # The head is [BatchNorm1d, Dropout, Linear, ReLU] per block: each block's Linear is its child 2.
        num_blocks = _count_blocks(state_dict, r"classifier\.layers\.(\d+)\.", block_size=4)
        outputs = [_require(state_dict, f"classifier.layers.{4 * b + 2}.weight").shape[0] for b in range(num_blocks)]
        sizes["classifier_hidden_sizes"], sizes["num_labels"] = outputs[:-1], outputs[-1]
    return sizes


def fastai_weights_to_transformers(
    state_dict: dict[str, torch.Tensor],
    vocab: Sequence[str],
    labels: Sequence[str] | None = None,
    *,
    lang: str = "en",
    drop_mult: float | None = None,
    **config_kwargs: Any,
) -> tuple[AwdLstmPreTrainedModel, AwdLstmTokenizer]:
    """The model and tokenizer of a fastai AWD_LSTM state dict and its vocabulary.

    Args:
        state_dict: fastai keys (`learn.model.state_dict()`, `learn.save`'s "model" entry, the WikiText-103 `.pth`).
        vocab: the tokens in id order, as the model was trained with (`learn.dls.vocab`, `itos_wt103.pkl`).
        labels: class names in the order of the classifier's outputs (`learn.dls.vocab[1]`); `LABEL_i` when absent.
        lang: spaCy language of the tokenizer, as fastai's `SpacyTokenizer(lang)`.
        drop_mult: scales fastai's default dropouts, which the state dict does not record; defaults to the learner's
            default (1.0 for a language model, 0.5 for a classifier).
        config_kwargs: other [`AwdLstmConfig`] values the weights do not tell (`bptt`, `max_len`, `backwards`,
            `ar_alpha`, `tar_beta`, dropouts).
    """
    inferred = sorted(set(config_kwargs) & set(_INFERRED))
    if inferred:
        raise FastaiConversionError(f"{inferred} are read from the weights; leave them out.")
    converted, kind = convert_fastai_state_dict(state_dict)
    sizes = _sizes_from_weights(converted, kind)
    if len(vocab) != sizes["vocab_size"]:
        raise FastaiConversionError(
            f"The vocabulary has {len(vocab)} tokens but the model's embedding has {sizes['vocab_size']} rows: pass "
            "the vocabulary the model was trained with (`learn.dls.vocab`, for a classifier `learn.dls.vocab[0]`; "
            "`itos_wt103.pkl` for the WikiText-103 model)."
        )
    if kind == "lm" and labels is not None:
        raise FastaiConversionError("`labels` are for a classifier, but this checkpoint is a language model.")
    if labels is not None:
        if len(labels) != sizes["num_labels"]:
            raise FastaiConversionError(
                f"{len(labels)} labels ({list(labels)}) for a classifier with {sizes['num_labels']} outputs: pass one "
                "name per output, in the order of `learn.dls.vocab[1]`."
            )
        config_kwargs["id2label"] = {i: str(label) for i, label in enumerate(labels)}
        config_kwargs["label2id"] = {str(label): i for i, label in enumerate(labels)}

    tokenizer = AwdLstmTokenizer(vocab=list(vocab), lang=lang)
    dropouts = AwdLstmConfig.dropouts(kind, _DEFAULT_DROP_MULT[kind] if drop_mult is None else drop_mult)
    config = AwdLstmConfig(
        **sizes,
        **{**dropouts, **config_kwargs},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model_class = AwdLstmForCausalLM if kind == "lm" else AwdLstmForSequenceClassification
    model = model_class(config)
    result = model.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise FastaiConversionError(
            f"The checkpoint does not fit a {sizes['num_layers']}-layer AWD-LSTM {kind}: missing "
            f"{result.missing_keys}, unexpected {result.unexpected_keys}. Save the whole model again with "
            "`learn.save` or `torch.save(learn.model.state_dict())`."
        )
    return model.eval(), tokenizer


def fastai_learner_to_transformers(learn: Any) -> tuple[AwdLstmPreTrainedModel, AwdLstmTokenizer]:
    """The model and tokenizer of a fastai AWD_LSTM `Learner` (trained in this session, or from `load_learner`):
    vocabulary, labels, dropouts, AR/TAR, BPT3C lengths, direction and spaCy language come from the learner."""
    from fastai.text.models.core import LinearDecoder, PoolingLinearClassifier, SentenceEncoder

    model, vocab = learn.model, learn.dls.vocab
    encoder, head = model[0], model[1]
    # A classifier's `dls.vocab` is [text vocabulary, label vocabulary].
    is_pair = len(vocab) == 2 and not isinstance(vocab[0], str)
    text_vocab, label_vocab = (vocab[0], vocab[1]) if is_pair else (vocab, None)
    awd_lstm = encoder.module if isinstance(encoder, SentenceEncoder) else encoder
    if type(awd_lstm).__name__ != "AWD_LSTM" or not isinstance(head, (LinearDecoder, PoolingLinearClassifier)):
        raise FastaiConversionError(
            f"Unsupported fastai model {type(awd_lstm).__name__} + {type(head).__name__}: only AWD_LSTM language "
            "models (LinearDecoder) and classifiers (PoolingLinearClassifier) can be converted."
        )
    config: dict[str, Any] = dict(
        input_p=awd_lstm.input_dp.p,
        hidden_p=awd_lstm.hidden_dps[0].p,
        embed_p=awd_lstm.encoder_dp.embed_p,
        weight_p=awd_lstm.rnns[0].weight_p,
    )
    regularizer = next((cb for cb in learn.cbs if type(cb).__name__ == "RNNRegularizer"), None)
    if regularizer is not None:
        config.update(ar_alpha=regularizer.alpha, tar_beta=regularizer.beta)
    labels = None
    if isinstance(head, LinearDecoder):
        config["output_p"] = head.output_dp.p
    else:
        if any(type(layer).__name__ == "SigmoidRange" for layer in head.layers):
            raise FastaiConversionError(
                "This classifier has a `y_range` (SigmoidRange) output, which this package does not implement."
            )
        # Each block is fastai's `LinBnDrop`, which leaves its Dropout out when p=0.
        head_dropouts = [next((m.p for m in block if isinstance(m, torch.nn.Dropout)), 0.0) for block in head.layers]
        config.update(output_p=head_dropouts[0], classifier_dropouts=head_dropouts, bptt=encoder.bptt)
        config["max_len"] = encoder.max_len if encoder.max_len is not None else _NO_MAX_LEN
        labels = [str(label) for label in label_vocab] if label_vocab is not None else None
        if "MultiCategorize" in _label_transform_names(learn):
            config["problem_type"] = "multi_label_classification"
        elif labels is None:
            config["problem_type"] = "regression"
    text_transforms = _text_transforms(learn)
    config["backwards"] = any(getattr(tfm, "name", None) == "reverse_text" for tfm in text_transforms)
    return fastai_weights_to_transformers(
        model.state_dict(), list(text_vocab), labels, lang=_spacy_language(text_transforms), **config
    )


def _text_transforms(learn: Any) -> list:
    try:
        return list(learn.dls.train_ds.tls[0].tfms.fs)
    except (AttributeError, IndexError):
        return []


def _label_transform_names(learn: Any) -> list[str]:
    try:
        return [type(tfm).__name__ for tfm in learn.dls.train_ds.tls[1].tfms.fs]
    except (AttributeError, IndexError):
        return []


def _spacy_language(text_transforms: list) -> str:
    """The spaCy language of fastai's default tokenizer; warns when the learner tokenized another way."""
    tokenize = next((tfm for tfm in text_transforms if type(tfm).__name__ == "Tokenizer"), None)
    rules = [getattr(rule, "__name__", None) for rule in getattr(tokenize, "rules", [])]
    default_rules = [rule.__name__ for rule in PRE_RULES] + [lowercase.__name__]
    word_tokenizer = getattr(tokenize, "tok", None)
    if type(word_tokenizer).__name__ != "SpacyTokenizer" or rules != default_rules:
        logger.warning(
            "The learner does not use fastai's default text processing (spaCy words and default rules), which "
            "AwdLstmTokenizer reproduces: the converted tokenizer's ids may differ from the learner's."
        )
        return "en"
    return word_tokenizer.pipe.__self__.lang


# ----------------------------------------------------------------------------------------------------------------------
# Files in, folder out
# ----------------------------------------------------------------------------------------------------------------------
def convert_fastai(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    vocab: str | os.PathLike | Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    *,
    trust_pickle: bool = False,
    lang: str | None = None,
    drop_mult: float | None = None,
    **config_kwargs: Any,
) -> Path:
    """Write a transformers folder (config, safetensors weights, tokenizer, model card) from a fastai ULMFiT model.

    Args:
        checkpoint: weights (`learn.save`, `torch.save(learn.model.state_dict())`, WikiText-103 `.pth`) or an
            exported Learner (`learn.export()`, opened only with `trust_pickle=True`).
        output_dir: the folder to write; `from_pretrained(output_dir)` loads it.
        vocab: for weights, the vocabulary: a pickled list of tokens, a JSON list, or the list itself.
        labels: for classifier weights, the class names in output order.
        trust_pickle: open an exported Learner, which runs code stored in the file. Only for files you trust.
        lang, drop_mult, config_kwargs: see [`fastai_weights_to_transformers`] (weights only; a Learner has them;
            `lang` defaults to "en").

    Returns the output folder.
    """
    checkpoint = Path(checkpoint)
    source = read_fastai_checkpoint(checkpoint, trust_pickle=trust_pickle)
    sources = {"checkpoint": checkpoint}
    if isinstance(source, dict):
        if vocab is None:
            raise FastaiConversionError(
                f"{checkpoint} holds weights only: pass the vocabulary it was trained with (`vocab=`, command line "
                "`--vocab`): a pickled list of tokens such as `itos_wt103.pkl`, or `learn.dls.vocab` saved with "
                "`pickle.dump(list(learn.dls.vocab), f)`."
            )
        if isinstance(vocab, (str, os.PathLike)):
            sources["vocabulary"] = Path(vocab)
            vocab = load_fastai_vocab(vocab)
        model, tokenizer = fastai_weights_to_transformers(
            source, vocab, labels, lang=lang or "en", drop_mult=drop_mult, **config_kwargs
        )
        fastai_version = None
    else:
        settings = (("vocab", vocab), ("labels", labels), ("lang", lang), ("drop_mult", drop_mult))
        given = [name for name, value in settings if value is not None]
        if given or config_kwargs:
            raise FastaiConversionError(
                f"An exported Learner carries its own vocabulary, labels and settings: leave out "
                f"{given + sorted(config_kwargs)}."
            )
        import fastai

        model, tokenizer = fastai_learner_to_transformers(source)
        fastai_version = fastai.__version__

    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    card = _model_card(model, {name: (path.name, _sha256(path)) for name, path in sources.items()}, fastai_version)
    (output_dir / "README.md").write_text(card, encoding="utf-8")
    return output_dir


def _model_card(model: AwdLstmPreTrainedModel, sources: dict[str, tuple[str, str]], fastai_version: str | None) -> str:
    config = model.config
    is_lm = isinstance(model, AwdLstmForCausalLM)
    task = "language model" if is_lm else "text classifier"
    rows = [f"| {name} | `{file}` | `{digest}` |" for name, (file, digest) in sources.items()]
    if fastai_version is not None:
        origin = f"an exported fastai Learner, opened with fastai {fastai_version}"
        settings = "Dropouts, AR/TAR and BPT3C lengths are the learner's."
    else:
        origin = "fastai weights (the file does not record the fastai version)"
        settings = "The weights do not record dropouts: they are fastai's defaults, which matter only for training."
    sizes = (
        f"vocabulary {config.vocab_size}, embedding {config.emb_size}, {config.num_layers} LSTM layers "
        f"of {config.hidden_size} units"
    )
    if not is_lm:
        sizes += f", labels {list(config.id2label.values())}"
    auto_class = "AutoModelForCausalLM" if is_lm else "AutoModelForSequenceClassification"
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'text-generation' if is_lm else 'text-classification'}",
        "tags:",
        "- ulmfit",
        "- awd-lstm",
        "- fastai",
        "---",
        "",
        f"# AWD-LSTM {task} (ULMFiT), converted from fastai",
        "",
        f"Converted from {origin}. It computes what the fastai model computes, and the tokenizer gives fastai's "
        "token ids (fastai's default rules and spaCy words).",
        "",
        "| source | file | sha256 |",
        "|---|---|---|",
        *rows,
        "",
        f"Sizes: {sizes}. {'Reads text backwards. ' if config.backwards else ''}{settings}",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {auto_class}",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        f'model = {auto_class}.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        "```",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# This package to fastai
# ----------------------------------------------------------------------------------------------------------------------
def to_fastai_state_dict(
    model: AwdLstmForCausalLM | AwdLstmForSequenceClassification, legacy_dropped_weights: bool = False
) -> dict[str, torch.Tensor]:
    """The model's weights with fastai 2.8's keys, in the order of fastai's own state dict: the inverse of
    [`convert_fastai_state_dict`].

    A language model gives the state dict of `get_language_model(AWD_LSTM, ...)` (`SequentialRNN(AWD_LSTM,
    LinearDecoder)`: embedding, its `EmbeddingDropout` copy, each LSTM's `weight_hh_l0_raw` and `module.*` weights,
    the decoder and its bias); a classifier that of `get_text_classifier` (`SequentialRNN(SentenceEncoder(AWD_LSTM),
    PoolingLinearClassifier)`). Either loads into the fastai model with `load_state_dict(strict=True)`, and the order
    matters too: fastai's `load_pretrained` copies weights by position, whatever their names.

    Args:
        model: the model to export. Settings that are not weights (dropouts, `bptt`, `max_len`, `backwards`) are the
            fastai learner's to set.
        legacy_dropped_weights: also write `module.weight_hh_l0`, the weight-dropped copy of each hidden-to-hidden
            matrix that older fastai checkpoints (the WikiText-103 `.pth`) hold; fastai 2.8's `load_pretrained`
            drops it, but its `load_state_dict(strict=True)` refuses it.
    """
    if isinstance(model, AwdLstmForCausalLM):
        prefix = "0."
    elif isinstance(model, AwdLstmForSequenceClassification):
        prefix = "0.module."
    else:
        raise FastaiConversionError(
            f"Only AwdLstmForCausalLM and AwdLstmForSequenceClassification have a fastai equivalent; got "
            f"{type(model).__name__}."
        )
    ours = {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}
    embedding = ours["model.embed_tokens.weight"]
    state_dict = {f"{prefix}encoder.weight": embedding, f"{prefix}encoder_dp.emb.weight": embedding.clone()}
    for index in range(model.config.num_layers):
        lstm = f"model.layers.{index}.lstm."
        rnn = f"{prefix}rnns.{index}."
        state_dict[f"{rnn}weight_hh_l0_raw"] = ours[f"{lstm}weight_hh_l0"]
        state_dict[f"{rnn}module.weight_ih_l0"] = ours[f"{lstm}weight_ih_l0"]
        if legacy_dropped_weights:
            state_dict[f"{rnn}module.weight_hh_l0"] = ours[f"{lstm}weight_hh_l0"].clone()
        for name in ("bias_ih_l0", "bias_hh_l0"):
            state_dict[f"{rnn}module.{name}"] = ours[f"{lstm}{name}"]
    if isinstance(model, AwdLstmForCausalLM):
        state_dict["1.decoder.weight"] = ours["lm_head.weight"]
        if "lm_head.bias" in ours:
            state_dict["1.decoder.bias"] = ours["lm_head.bias"]
        return state_dict
    # Our head is [BatchNorm1d, Dropout, Linear, ReLU] per block; fastai's `LinBnDrop` is [BatchNorm1d, Dropout,
    # Linear], without the Dropout when its p is 0, so the Linear is child 2 or child 1.
    for block, p in enumerate(model.config.head_dropouts):
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            state_dict[f"1.layers.{block}.0.{name}"] = ours[f"classifier.layers.{4 * block}.{name}"]
        state_dict[f"1.layers.{block}.{2 if p > 0 else 1}.weight"] = ours[f"classifier.layers.{4 * block + 2}.weight"]
    return state_dict


def save_fastai_pretrained(
    folder: str | os.PathLike,
    output_dir: str | os.PathLike,
    name: str = "lm",
    legacy_dropped_weights: bool = False,
) -> tuple[Path, Path]:
    """Write a stage folder of this package as fastai's pretrained pair: `{name}.pth` (`{"model": state_dict}`, as
    `learn.save` writes it) and `{name}.pkl` (the vocabulary, a pickled list of tokens).

    A language model's pair is what fastai starts ULMFiT's LM fine-tuning from, moving the embeddings to the new
    corpus' vocabulary with `match_embeds`:

        learn = language_model_learner(dls, AWD_LSTM, config={**awd_lstm_lm_config, "emb_sz": ..., "n_hid": ...,
                                       "n_layers": ...}, pretrained=False)
        learn.load_pretrained(weights, vocab)  # or pretrained_fnames=[name, name], the files in learn.path/model_dir

    A model that reads text backwards (`config.backwards`) must go to a learner built with `backwards=True`.

    Returns the paths of the weights and of the vocabulary.
    """
    folder, output_dir = Path(folder), Path(output_dir)
    config = AwdLstmConfig.from_pretrained(folder)
    architectures = config.architectures or []
    if "AwdLstmForSequenceClassification" in architectures:
        model = AwdLstmForSequenceClassification.from_pretrained(folder)
    elif "AwdLstmForCausalLM" in architectures:
        model = AwdLstmForCausalLM.from_pretrained(folder)
    else:
        raise FastaiConversionError(
            f"{folder} holds {architectures or 'no model class'}: save an AwdLstmForCausalLM or "
            "AwdLstmForSequenceClassification there (a stage folder of this package)."
        )
    if not (folder / VOCAB_FILES_NAMES["vocab_file"]).is_file():
        raise FastaiConversionError(
            f"{folder} has no {VOCAB_FILES_NAMES['vocab_file']}: fastai models read fastai's word-level tokens, so "
            "only a model with an AwdLstmTokenizer (not a subword tokenizer) can be exported."
        )
    vocab = AwdLstmTokenizer.from_pretrained(folder).itos
    if len(vocab) != config.vocab_size:
        raise FastaiConversionError(
            f"{folder}: the tokenizer has {len(vocab)} tokens but the model {config.vocab_size} embedding rows."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    weights_path, vocab_path = output_dir / f"{name}.pth", output_dir / f"{name}.pkl"
    torch.save({"model": to_fastai_state_dict(model, legacy_dropped_weights)}, weights_path)
    with open(vocab_path, "wb") as f:
        pickle.dump(list(vocab), f)
    return weights_path, vocab_path


# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary transfer
# ----------------------------------------------------------------------------------------------------------------------
_VOCABULARY_ROWS = ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias")


def transfer_vocab(
    model_or_state_dict: AwdLstmPreTrainedModel | dict[str, torch.Tensor],
    old_vocab: Sequence[str],
    new_vocab: Sequence[str],
) -> AwdLstmPreTrainedModel | dict[str, torch.Tensor]:
    """Move a pretrained model to another vocabulary, as fastai's `match_embeds` (ULMFiT fine-tuning on a new corpus).

    A token of `new_vocab` found in `old_vocab` keeps its rows (embedding, decoder weight, decoder bias); a new token
    gets the mean row of each. Each matrix is taken from itself, which is fastai's result for a tied decoder.

    Accepts a model (returns a new one of the same class, with `vocab_size` and special token ids of `new_vocab`) or a
    state dict with this package's keys (returns a new state dict; `convert_fastai_state_dict` renames fastai's).
    """
    if isinstance(model_or_state_dict, AwdLstmPreTrainedModel):
        model = model_or_state_dict
        state_dict = _transfer_rows(model.state_dict(), old_vocab, new_vocab)
        config = copy.deepcopy(model.config)
        config.vocab_size = len(new_vocab)
        o2i = {token: i for i, token in enumerate(new_vocab)}
        for name, token in (("pad_token_id", PAD), ("bos_token_id", BOS), ("eos_token_id", EOS)):
            setattr(config, name, o2i.get(token))
        new_model = type(model)(config)
        new_model.load_state_dict(state_dict)
        return new_model.to(device=model.device, dtype=model.dtype).train(model.training)
    return _transfer_rows(model_or_state_dict, old_vocab, new_vocab)


def _transfer_rows(
    state_dict: dict[str, torch.Tensor], old_vocab: Sequence[str], new_vocab: Sequence[str]
) -> dict[str, torch.Tensor]:
    embedding = _require(state_dict, "model.embed_tokens.weight")
    if len(old_vocab) != embedding.size(0):
        raise FastaiConversionError(
            f"`old_vocab` has {len(old_vocab)} tokens but the embedding has {embedding.size(0)} rows: pass the "
            "vocabulary the model was trained with."
        )
    # As fastai: a token listed twice (the "xxfake" padding of fastai vocabularies) maps to its last row.
    old_o2i = {token: i for i, token in enumerate(old_vocab)}
    old_ids = torch.tensor([old_o2i.get(token, -1) for token in new_vocab], dtype=torch.long)
    known = old_ids >= 0
    result = dict(state_dict)
    for key in _VOCABULARY_ROWS:
        if key in state_dict:
            rows = state_dict[key]
            known_rows = known.view(-1, *([1] * (rows.dim() - 1)))
            result[key] = torch.where(known_rows, rows[old_ids.clamp_min(0)], rows.mean(0))
    return result


__all__ = [
    "FastaiConversionError",
    "convert_fastai",
    "convert_fastai_state_dict",
    "fastai_learner_to_transformers",
    "fastai_weights_to_transformers",
    "load_fastai_vocab",
    "read_fastai_checkpoint",
    "save_fastai_pretrained",
    "to_fastai_state_dict",
    "transfer_vocab",
]
