"""AWD-LSTM configuration: every hyper-parameter of fastai 2.8's `AWD_LSTM`, language-model defaults."""

from typing import ClassVar

from transformers import PreTrainedConfig

# fastai's `awd_lstm_lm_config` and `awd_lstm_clas_config` dropouts; `drop_mult` scales all five.
LM_DROPOUTS = {"output_p": 0.1, "hidden_p": 0.15, "input_p": 0.25, "embed_p": 0.02, "weight_p": 0.2}
CLASSIFIER_DROPOUTS = {"output_p": 0.4, "hidden_p": 0.3, "input_p": 0.4, "embed_p": 0.05, "weight_p": 0.5}


class AwdLstmConfig(PreTrainedConfig):
    r"""
    Configuration of an AWD-LSTM (Merity et al. 2017) as used by ULMFiT (Howard & Ruder 2018). The defaults are
    fastai's language model (`awd_lstm_lm_config`); use [`AwdLstmConfig.dropouts`] for the classifier's.

    Args:
        vocab_size (`int`): size of the vocabulary.
        emb_size (`int`): embedding size, also the output size of the last LSTM so the decoder can be tied.
        hidden_size (`int`): hidden size of every LSTM but the last.
        num_layers (`int`): number of stacked LSTMs.
        output_p (`float`): locked dropout on the last LSTM's output (LM decoder input, classifier head input).
        hidden_p (`float`): locked dropout between LSTM layers.
        input_p (`float`): locked dropout on the embedded input.
        embed_p (`float`): dropout of whole embedding rows (a word is dropped everywhere in the batch).
        weight_p (`float`): DropConnect on each LSTM's hidden-to-hidden matrix.
        tie_word_embeddings (`bool`): the decoder shares the embedding matrix.
        output_bias (`bool`): the decoder has a bias.
        init_range (`float`): embedding and decoder weights start uniform in `[-init_range, init_range]`.
        ar_alpha (`float`): activation regularization (AR) on the dropped last-layer output, added to the training loss.
        tar_beta (`float`): temporal activation regularization (TAR) on the raw last-layer output.
        classifier_hidden_sizes (`list[int]`): hidden sizes of the classification head (fastai's `lin_ftrs`).
        classifier_dropouts (`list[float]`, *optional*): dropout before each linear layer of the head (fastai's
            `ps`); defaults to `[output_p] + [0.1] * len(classifier_hidden_sizes)`, as fastai.
        bptt (`int`): BPT3C chunk length: the classifier reads a document `bptt` tokens at a time.
        max_len (`int`): the classifier pools over (about) the last `max_len` tokens of a document.
        backwards (`bool`): the model reads text reversed (for forward + backward ensembles). Its language model is
            trained on reversed documents (`ulmfit.data.tokenize_for_lm(backwards=True)`, the recipes do it);
            the classifier reverses each document itself, so it takes text in reading order.
    """

    model_type: ClassVar[str] = "awd_lstm"
    attribute_map: ClassVar[dict[str, str]] = {"num_hidden_layers": "num_layers"}

    vocab_size: int = 60000
    emb_size: int = 400
    hidden_size: int = 1152
    num_layers: int = 3
    output_p: float = LM_DROPOUTS["output_p"]
    hidden_p: float = LM_DROPOUTS["hidden_p"]
    input_p: float = LM_DROPOUTS["input_p"]
    embed_p: float = LM_DROPOUTS["embed_p"]
    weight_p: float = LM_DROPOUTS["weight_p"]
    tie_word_embeddings: bool = True
    output_bias: bool = True
    init_range: float = 0.1
    ar_alpha: float = 2.0
    tar_beta: float = 1.0
    classifier_hidden_sizes: list[int] | tuple[int, ...] = (50,)
    classifier_dropouts: list[float] | tuple[float, ...] | None = None
    bptt: int = 72
    max_len: int = 72 * 20
    backwards: bool = False
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | None = 3
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        self.classifier_hidden_sizes = list(self.classifier_hidden_sizes)
        if self.classifier_dropouts is not None:
            self.classifier_dropouts = list(self.classifier_dropouts)
        super().__post_init__(**kwargs)
        self._check_values()

    @property
    def head_dropouts(self) -> list[float]:
        """Dropout before each linear layer of the classification head (fastai: `[output_p] + [0.1, ...]`)."""
        if self.classifier_dropouts is not None:
            return list(self.classifier_dropouts)
        return [self.output_p] + [0.1] * len(self.classifier_hidden_sizes)

    def _check_values(self):
        for name in ("vocab_size", "emb_size", "hidden_size", "num_layers", "bptt", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AwdLstmConfig: `{name}` must be a positive integer, got {value!r}.")
        dropouts = {name: getattr(self, name) for name in LM_DROPOUTS}
        dropouts.update({f"classifier_dropouts[{i}]": p for i, p in enumerate(self.head_dropouts)})
        for name, value in dropouts.items():
            if not 0.0 <= value < 1.0:
                raise ValueError(f"AwdLstmConfig: dropout `{name}` must be in [0, 1), got {value!r}.")
        if any(not isinstance(size, int) or size < 1 for size in self.classifier_hidden_sizes):
            raise ValueError(
                "AwdLstmConfig: `classifier_hidden_sizes` must be positive integers, got "
                f"{self.classifier_hidden_sizes}."
            )
        if len(self.head_dropouts) != len(self.classifier_hidden_sizes) + 1:
            raise ValueError(
                "AwdLstmConfig: `classifier_dropouts` needs one value per linear layer of the head "
                f"({len(self.classifier_hidden_sizes) + 1}), got {self.classifier_dropouts}."
            )
        if self.ar_alpha < 0 or self.tar_beta < 0:
            raise ValueError(
                f"AwdLstmConfig: `ar_alpha` and `tar_beta` must be >= 0, got {self.ar_alpha}, {self.tar_beta}."
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"AwdLstmConfig: `{name}`={value} is outside the vocabulary (size {self.vocab_size}). "
                    "Set it to a token id of the tokenizer, or None."
                )

    @staticmethod
    def dropouts(kind: str = "lm", drop_mult: float = 1.0) -> dict[str, float]:
        """fastai's dropouts for `kind` ("lm" or "classifier") scaled by `drop_mult`, as config keyword arguments.

        The classifier's head dropouts follow its `output_p`, as in fastai's `get_text_classifier`:
        `AwdLstmForSequenceClassification.from_pretrained(lm_dir, **AwdLstmConfig.dropouts("classifier", 0.5))`.
        """
        table = {"lm": LM_DROPOUTS, "classifier": CLASSIFIER_DROPOUTS}
        if kind not in table:
            raise ValueError(f"Unknown dropout preset {kind!r}: use 'lm' or 'classifier'.")
        values = {name: p * drop_mult for name, p in table[kind].items()}
        if kind == "classifier":
            values["classifier_dropouts"] = None  # the head follows the new output_p
        return values


# Each file the Hub receives registers its own classes for `auto_map` (the tokenizer and model files likewise).
AwdLstmConfig.register_for_auto_class()

__all__ = ["AwdLstmConfig", "LM_DROPOUTS", "CLASSIFIER_DROPOUTS"]
