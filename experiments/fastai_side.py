"""fastai 2.8's side of the comparison, as a fastai user writes ULMFiT: `DataBlock`s with `TextBlock.from_df`,
`language_model_learner` + `load_pretrained` + `fine_tune`, then `text_classifier_learner` + `load_encoder` + `fit`.

Where fastai's defaults differ from what our trainer does, fastai is given ours, so that both run one recipe:
stage 3's schedule (`GradualUnfreezing` + `stlr_scheduler`), Adam's settings, no weight decay on LSTM biases, and
no AR/TAR on the classifier (our classifier has none). Everything else is fastai's own.
"""

import math
import pickle
import time
import warnings
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from fastai.text.all import (
    AWD_LSTM,
    Adam,
    Callback,
    CancelValidException,
    CategoryBlock,
    ColReader,
    ColSplitter,
    DataBlock,
    ParamScheduler,
    TensorText,
    TextBlock,
    Transform,
    awd_lstm_clas_config,
    awd_lstm_lm_config,
    language_model_learner,
    set_seed,
    text_classifier_learner,
)

from benchmarks.fastai_side import CpuBf16Autocast
from modeling_awd_lstm import AwdLstmConfig, AwdLstmTokenizer
from ulmfit.convert_fastai import fastai_learner_to_transformers, save_fastai_pretrained
from ulmfit.optim import discriminative_learning_rates
from ulmfit.schedules import slanted_triangular

from .ours import LOGGING_STEPS, evaluate_lm, lm_corpus
from .settings import TEXT_LEARNER_MOMS, TaskSettings

warnings.filterwarnings("ignore", module="fastai")
PAD = 1
VOCAB_FILE = "vocab.pkl"
ENCODER = "encoder"


# ----------------------------------------------------------------------------------------------------------------------
# Callbacks and transforms
# ----------------------------------------------------------------------------------------------------------------------
class GradualUnfreezing(Callback):
    """ULMFiT's gradual unfreezing: the top layer group alone in the first epoch, one more group each epoch after,
    through `Learner.freeze_to` (which clears Adam's state at each step, as our trainer's unfreezing does)."""

    def before_epoch(self):
        groups = len(self.opt.param_lists)
        if self.epoch < groups:  # once every group trains, nothing changes (and nothing clears)
            self.learn.freeze_to(-(self.epoch + 1))


def stlr_scheduler(num_groups: int, lr: float, factor: float, total_steps: int, cut_frac: float, ratio: float
                   ) -> ParamScheduler:
    """STLR (eq. 3) over the whole run for every layer group at its discriminative rate, lowest group first: fastai's
    `slice(lr / factor**(n-1), lr)`, times the slanted triangular multiplier of the step."""
    rates = discriminative_learning_rates(lr, num_groups, factor)

    def lr_at(pct: float) -> list[float]:
        step = round(pct * total_steps)  # fastai's pct_train is step / total_steps, accumulated in floats
        return [rate * slanted_triangular(step, total_steps, cut_frac, ratio) for rate in rates]

    return ParamScheduler({"lr": lr_at})


class _SkipValidation(Callback):
    """No evaluation while the classifier trains (ours evaluates once at the end too)."""

    def before_validate(self):
        raise CancelValidException()


class _TrainingRecord(Callback):
    """Training tokens (not padding) and each batch's loss, AR/TAR included (`loss_grad`: what our trainer logs)."""

    def __init__(self):
        self.tokens, self.losses = 0, []

    def after_batch(self):
        if self.training:
            self.tokens += int((self.learn.xb[0] != PAD).sum())
            self.losses.append(float(self.learn.loss_grad))

    def curve(self) -> list[list[float]]:
        """Mean losses over windows as long as our trainer's logging interval."""
        window = max(1, math.ceil(len(self.losses) * LOGGING_STEPS))
        return [[end, round(sum(self.losses[end - window:end]) / window, 5)]
                for end in range(window, len(self.losses) + 1, window)]


class KeepLastTokens(Transform):
    """xxbos and the last `n - 1` tokens of a longer document: our tokenizer's left truncation to `n` tokens."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def encodes(self, x: TensorText):
        return x if len(x) <= self.n else TensorText(torch.cat([x[:1], x[len(x) - self.n + 1:]]))


def _precision_cbs(precision: str) -> list[Callback]:
    return [CpuBf16Autocast()] if precision == "bf16" else []


def _no_weight_decay_on_lstm_biases(learn) -> None:
    """fastai's `wd_bn_bias=False` spares only `.bias` attributes and norm layers, so it decays the LSTMs' biases;
    our optimizer decays no bias at all."""
    for name, parameter in learn.model.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("bias"):
            learn.opt.state[parameter]["do_wd"] = False


def _sizes(config: AwdLstmConfig) -> dict:
    return dict(emb_sz=config.emb_size, n_hid=config.hidden_size, n_layers=config.num_layers)


def _check_tokens(dataset, texts: list[str], vocab: list[str], count: int = 8) -> None:
    """fastai's ids for the first documents are our tokenizer's."""
    tokenizer = AwdLstmTokenizer(vocab=vocab)
    for index in range(min(count, len(texts))):
        fastai_ids, ours = dataset[index][0].tolist(), tokenizer(texts[index]).input_ids
        if fastai_ids != ours:
            raise AssertionError(f"fastai and AwdLstmTokenizer tokenize document {index} differently:\n"
                                 f"  fastai {fastai_ids[:30]}\n  ours   {ours[:30]}")


# ----------------------------------------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------------------------------------
def finetune_lm(lm_texts: list[str], lm_is_valid: list[bool], settings: TaskSettings, parent: Path, folder: Path,
                expected_vocab: list[str] | None = None, keep_vocab: bool = False) -> dict:
    """`learn.fine_tune(lm_epochs, lm_lr)` from the stage-1 folder `parent`, exported as fastai's pretrained pair and
    loaded with `load_pretrained` (`match_embeds` to the vocabulary fastai builds from `lm_texts`, or with `keep_vocab`
    to the parent's own). `expected_vocab` (our stage-2 vocabulary) must be that vocabulary. Writes the encoder and
    vocabulary to `folder`. `stage_seconds` is the stage as a fastai user runs it: from the exported pair to the saved
    encoder."""
    started = time.time()
    set_seed(0)
    config = AwdLstmConfig.from_pretrained(parent)
    if config.backwards:
        raise ValueError(f"{parent} reads text backwards; the fastai side runs forward models only.")
    weights, vocab_file = save_fastai_pretrained(parent, folder / "stage1")
    exported = time.time()
    frame = pd.DataFrame({"text": lm_texts, "is_valid": lm_is_valid})
    vocabulary = dict(vocab=AwdLstmTokenizer.from_pretrained(parent).itos) if keep_vocab else dict(
        min_freq=settings.min_freq, max_vocab=settings.max_vocab)
    block = DataBlock(
        blocks=TextBlock.from_df("text", is_lm=True, seq_len=config.bptt, n_workers=0, **vocabulary),
        get_x=ColReader("text"), splitter=ColSplitter("is_valid"),
    )
    dls = block.dataloaders(frame, bs=settings.lm_batch_size)
    vocab = list(dls.vocab)
    if expected_vocab is not None and vocab != list(expected_vocab):
        first = next((i for i, (a, b) in enumerate(zip(vocab, expected_vocab)) if a != b),
                     min(len(vocab), len(expected_vocab)))
        raise AssertionError(
            f"fastai built another stage-2 vocabulary than ours: {len(vocab)} vs {len(expected_vocab)} tokens, first "
            f"difference at id {first} ({vocab[first:first + 3]} vs {list(expected_vocab[first:first + 3])})."
        )
    train_texts = [text for text, valid in zip(lm_texts, lm_is_valid) if not valid]
    _check_tokens(dls.train_ds, train_texts, vocab)

    lm_config = {**awd_lstm_lm_config, **_sizes(config), "tie_weights": config.tie_word_embeddings,
                 "out_bias": config.output_bias}
    learn = language_model_learner(
        dls, AWD_LSTM, config=lm_config, drop_mult=settings.lm_drop_mult, pretrained=False, alpha=config.ar_alpha,
        beta=config.tar_beta, moms=TEXT_LEARNER_MOMS, path=folder, model_dir=".",
        cbs=_precision_cbs(settings.precision),
    )
    learn.load_pretrained(weights, vocab_file)
    _no_weight_decay_on_lstm_biases(learn)
    record = _TrainingRecord()
    train_started = time.time()
    with learn.no_logging():
        learn.fine_tune(settings.lm_epochs, settings.lm_lr, cbs=[record])
    train_seconds = time.time() - train_started
    own_valid_loss = learn.recorder.values[-1][1]

    learn.save_encoder(ENCODER)
    with open(folder / VOCAB_FILE, "wb") as f:
        pickle.dump(vocab, f)
    stage_seconds = time.time() - exported
    model, _ = fastai_learner_to_transformers(learn)
    valid_texts = [text for text, valid in zip(lm_texts, lm_is_valid) if valid]
    valid = lm_corpus(valid_texts, AwdLstmTokenizer(vocab=vocab))
    perplexity = evaluate_lm(model, valid, settings.lm_batch_size, config.bptt, folder)
    return {
        "valid_perplexity": perplexity,
        "valid_perplexity_own": math.exp(own_valid_loss),
        "seconds": time.time() - started,
        "stage_seconds": stage_seconds,
        "train_seconds": train_seconds,
        "tokens_per_second": record.tokens / max(train_seconds, 1e-9),
        "train_tokens": int(sum(dls.train.lens)),
        "vocab_size": len(vocab),
        "epochs": settings.lm_total_epochs,
        "schedule": f"fine_tune({settings.lm_epochs}, {settings.lm_lr})",
        "backwards": False,
        "curve": record.curve(),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Stage 3
# ----------------------------------------------------------------------------------------------------------------------
def train_classifier(
    stage2: Path,
    stage1: Path,
    train: tuple[list[str], list[str]],
    test: tuple[list[str], list[str]],
    label_names: list[str],
    settings: TaskSettings,
    seed: int,
    ar_tar: bool = False,
) -> dict:
    """`text_classifier_learner` + `load_encoder` (the encoder of `stage2`) + ONE `fit` with the paper's recipe:
    gradual unfreezing, discriminative rates, STLR over the whole run, Adam as our trainer sets it. The test
    documents are the validation set (read by fastai's own pipeline), predicted once training ends. `ar_tar` keeps
    fastai's AR/TAR (2, 1) on the classifier's encoder outputs, which ours does not have."""
    started = time.time()
    set_seed(seed)
    config = AwdLstmConfig.from_pretrained(stage1)
    with open(stage2 / VOCAB_FILE, "rb") as f:
        vocab = pickle.load(f)
    frame = pd.DataFrame({
        "text": list(train[0]) + list(test[0]), "label": list(train[1]) + list(test[1]),
        "is_valid": [False] * len(train[0]) + [True] * len(test[0]),
    })
    block = DataBlock(
        blocks=(TextBlock.from_df("text", vocab=vocab, seq_len=config.bptt, n_workers=0),
                CategoryBlock(vocab=label_names)),
        get_x=ColReader("text"), get_y=ColReader("label"), splitter=ColSplitter("is_valid"),
        item_tfms=[KeepLastTokens(settings.max_tokens)] if settings.max_tokens else None,
    )
    batch_size = min(settings.clas_batch_size, len(train[0]))
    dls = block.dataloaders(frame, bs=batch_size, val_bs=2 * settings.clas_batch_size)
    if list(dls.vocab[1]) != list(label_names):
        raise AssertionError(f"fastai's label order {list(dls.vocab[1])} is not ours {label_names}.")
    _check_tokens(dls.train_ds, list(train[0]), vocab)

    adam = partial(Adam, mom=0.7, sqr_mom=0.99, eps=1e-5, wd=0.01)  # ULMFiTTrainingArguments' defaults
    regularizer = dict(alpha=config.ar_alpha, beta=config.tar_beta) if ar_tar else dict(alpha=0.0, beta=0.0)
    learn = text_classifier_learner(
        dls, AWD_LSTM, seq_len=config.bptt, max_len=config.max_len, config={**awd_lstm_clas_config, **_sizes(config)},
        drop_mult=settings.clas_drop_mult, pretrained=False, opt_func=adam, path=stage2, model_dir=".",
        cbs=_precision_cbs(settings.precision), **regularizer,
    )
    learn.load_encoder(ENCODER)
    _no_weight_decay_on_lstm_biases(learn)
    num_groups = len(learn.opt.param_lists)
    total_steps = settings.clas_epochs * len(dls.train)
    record = _TrainingRecord()
    schedule = stlr_scheduler(num_groups, settings.clas_lr, settings.discriminative_factor, total_steps,
                              settings.stlr_cut_frac, settings.stlr_ratio)
    train_started = time.time()
    with learn.no_logging():
        learn.fit(settings.clas_epochs, settings.clas_lr,
                  cbs=[GradualUnfreezing(), schedule, _SkipValidation(), record])
    train_seconds = time.time() - train_started
    predict_started = time.time()
    with learn.no_bar():
        probabilities, targets = learn.get_preds(ds_idx=1)
    return {
        "test_accuracy": float((probabilities.argmax(1) == targets).float().mean()),
        "seconds": time.time() - started,
        "train_seconds": train_seconds,
        "test_seconds": time.time() - predict_started,
        "tokens_per_second": record.tokens / max(train_seconds, 1e-9),
        "steps": len(record.losses),
        "epochs": settings.clas_epochs,
        "training": {"learning_rate": settings.clas_lr, "ulmfit_schedule": "stlr", "unfreeze_schedule": "gradual",
                     "discriminative_lr_factor": settings.discriminative_factor,
                     "stlr_cut_frac": settings.stlr_cut_frac,
                     "stlr_ratio": settings.stlr_ratio, "adam_beta1": 0.7, "adam_beta2": 0.99, "adam_epsilon": 1e-5,
                     "weight_decay": 0.01, "per_device_train_batch_size": batch_size, "ar_tar": ar_tar},
        "curve": record.curve(),
        "test_probabilities": probabilities.double().numpy().round(6).tolist(),
        "test_labels": targets.tolist(),
    }
