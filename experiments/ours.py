"""This package's side of the experiments: stages 2 and 3 with `ULMFiTTrainer` and the package's data pieces, and a
backward stage 1 with `ulmfit.stages.run_stage`.

Text read backwards (`config.backwards`): language models train on reversed documents (`tokenize_for_lm(backwards=
True)`, xxbos last, as fastai's `backwards=True`); a backward classifier reverses each document itself.
"""

import math
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import set_seed

from modeling_awd_lstm import AwdLstmConfig, AwdLstmForCausalLM, AwdLstmForSequenceClassification, AwdLstmTokenizer
from ulmfit import stages
from ulmfit.convert_fastai import transfer_vocab
from ulmfit.data import TokenizedCorpus, encode_labels, tokenize_for_classification, tokenize_for_lm
from ulmfit.hub import STAGE_FILE, StageRecord
from ulmfit.recipes import Recipe, load_recipe
from ulmfit.stages import TRAINING_DTYPE
from ulmfit.tokenizer_training import train_fastai_tokenizer
from ulmfit.trainer import ULMFiTTrainer, ULMFiTTrainingArguments

from .settings import DIFFERENCES_FROM_ULMFIT, TaskSettings

LOGGING_STEPS = 0.05  # a training-loss point every 5% of the steps
# Stage-2 schedules (the paper's Table 6): a record's name for each, and the training arguments it sets.
# "fine_tune" is the recipe both implementations run: fastai's `fine_tune(lm_epochs, lm_lr)`, one frozen epoch, then
# every layer with the LSTMs at 1/100-1/4.6 of the top rate. The others train every layer from the start, no frozen
# epoch: "one_rate" at one rate along a one-cycle (the paper's "Full"); "discr" with discriminative rates (2.6 between
# layer groups, "Full + discr"); "discr_stlr" with those rates along STLR ("Full + discr + stlr", the paper's choice).
LM_SCHEDULES = {
    "fine_tune": ("fine_tune({lm_epochs}, {lr})", dict(ulmfit_schedule="fine_tune", fine_tune_freeze_epochs=1)),
    "one_rate": ("one_cycle({epochs}, {lr})", dict(ulmfit_schedule="one_cycle", discriminative_lr_factor=1.0)),
    "discr": ("one_cycle({epochs}, {lr}) with discriminative rates (2.6)",
              dict(ulmfit_schedule="one_cycle", discriminative_lr_factor=2.6)),
    "discr_stlr": ("stlr({epochs}, {lr}) with discriminative rates (2.6)",
                   dict(ulmfit_schedule="stlr", discriminative_lr_factor=2.6)),
}


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------
def lm_corpus(texts: list[str], tokenizer: AwdLstmTokenizer, backwards: bool = False) -> TokenizedCorpus:
    tokens = tokenize_for_lm(datasets.Dataset.from_dict({"text": texts}), tokenizer, backwards=backwards)
    return TokenizedCorpus.from_dataset(tokens, vocab_size=len(tokenizer))


def classification_data(
    texts: list[str], labels: list[str], label_names: list[str], tokenizer: AwdLstmTokenizer,
    max_tokens: int | None = None,
) -> datasets.Dataset:
    """Tokenized documents with class ids; with `max_tokens` only xxbos and the document's last tokens are kept."""
    dataset, _, _ = encode_labels(datasets.Dataset.from_dict({"text": texts, "label": labels}), "label", label_names)
    tokenizer.truncation_side = "left"  # keep the end of each document, which the classifier pools over
    return tokenize_for_classification(dataset, tokenizer, max_length=max_tokens)


# ----------------------------------------------------------------------------------------------------------------------
# Training pieces
# ----------------------------------------------------------------------------------------------------------------------
def training_arguments(folder: Path, seed: int, precision: str, **values) -> ULMFiTTrainingArguments:
    """The arguments every run here shares: `DIFFERENCES_FROM_ULMFIT`, the Trainer's progress bars, non-padding
    tokens counted for tokens/s."""
    return ULMFiTTrainingArguments(
        output_dir=str(folder / "checkpoints"), seed=seed, bf16=precision == "bf16",
        **{name: value for name, (value, _) in DIFFERENCES_FROM_ULMFIT.items()},
        logging_steps=LOGGING_STEPS, report_to="none", disable_tqdm=False,
        include_num_input_tokens_seen="non_padding", **values,
    )


def training_record(args: ULMFiTTrainingArguments) -> dict:
    """The arguments that shape a run's rates, for its result file."""
    return {name: getattr(args, name) for name in (
        "learning_rate", "ulmfit_schedule", "unfreeze_schedule", "discriminative_lr_factor", "stlr_cut_frac",
        "stlr_ratio", "warmup_steps", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay",
        "per_device_train_batch_size", "max_grad_norm")}


def loss_curve(log_history: list[dict]) -> list[list[float]]:
    return [[entry["step"], round(entry["loss"], 5)] for entry in log_history if "loss" in entry and "step" in entry]


def evaluate_lm(model: AwdLstmForCausalLM, corpus: TokenizedCorpus, batch_size: int, bptt: int, folder: Path) -> float:
    """Perplexity on a held-out stream in fp32, the state carried across batches: one evaluator for both sides."""
    args = training_arguments(folder, seed=0, precision="fp32", per_device_eval_batch_size=batch_size, lm_bptt=bptt)
    trainer = ULMFiTTrainer(model=model, args=args, eval_dataset=corpus)
    return float(trainer.evaluate()["eval_perplexity"])


def predict_probabilities(trainer: ULMFiTTrainer, dataset: datasets.Dataset) -> np.ndarray:
    """Class probabilities in dataset order, read in length-sorted batches (padding changes nothing but time)."""
    order = np.argsort(-np.asarray(dataset["length"]), kind="stable")
    trainer.args.dataloader_drop_last = False  # (it is on for training) every test document counts
    logits = trainer.predict(dataset.select(order)).predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    probabilities = np.empty_like(logits, dtype=np.float64)
    probabilities[order] = torch.from_numpy(np.asarray(logits, dtype=np.float32)).softmax(-1).double().numpy()
    return probabilities


# ----------------------------------------------------------------------------------------------------------------------
# Stage 2: LM fine-tuning on the task's text
# ----------------------------------------------------------------------------------------------------------------------
def finetune_lm(
    lm_texts: list[str], lm_is_valid: list[bool], settings: TaskSettings, parent: Path, folder: Path,
    random_init: bool = False, schedule: str = "fine_tune",
) -> dict:
    """Stage 2 from `parent` (a stage-1 folder), after moving it to the task's vocabulary (fastai's rule over
    `lm_texts`, every row counted as fastai counts them; `match_embeds` transfer), along one of `LM_SCHEDULES`.

    `random_init` starts from random weights of the same shape (the "no pretraining" ablation). Saves the model and
    tokenizer in `folder` and returns the stage's record.
    """
    if schedule not in LM_SCHEDULES:
        raise ValueError(f"unknown stage-2 schedule {schedule!r}; choose from {', '.join(LM_SCHEDULES)}")
    started = time.time()
    set_seed(0)
    tokenizer = train_fastai_tokenizer(lm_texts, max_vocab=settings.max_vocab, min_freq=settings.min_freq)
    stage1 = AwdLstmForCausalLM.from_pretrained(
        parent, dtype=TRAINING_DTYPE, **AwdLstmConfig.dropouts("lm", settings.lm_drop_mult)
    )
    model = transfer_vocab(stage1, AwdLstmTokenizer.from_pretrained(parent).itos, tokenizer.itos)
    if random_init:
        set_seed(0)
        model = AwdLstmForCausalLM(model.config)
    name, arguments = LM_SCHEDULES[schedule]
    schedule_name = name.format(epochs=settings.lm_total_epochs, lm_epochs=settings.lm_epochs, lr=settings.lm_lr)
    schedule_name += " from random weights" if random_init else ""
    bptt, backwards = model.config.bptt, model.config.backwards
    train_texts = [text for text, valid in zip(lm_texts, lm_is_valid) if not valid]
    valid_texts = [text for text, valid in zip(lm_texts, lm_is_valid) if valid]
    corpus, valid = lm_corpus(train_texts, tokenizer, backwards), lm_corpus(valid_texts, tokenizer, backwards)
    args = training_arguments(
        folder, seed=0, precision=settings.precision, num_train_epochs=settings.lm_total_epochs,
        learning_rate=settings.lm_lr, per_device_train_batch_size=settings.lm_batch_size,
        per_device_eval_batch_size=settings.lm_batch_size,  # fastai validates with the training batch size
        lm_bptt=bptt, eval_strategy="epoch", **arguments,
    )
    trainer = ULMFiTTrainer(model=model, args=args, train_dataset=corpus, eval_dataset=valid,
                            processing_class=tokenizer)
    output = trainer.train()
    train_seconds = output.metrics["train_runtime"]
    own = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    perplexity = evaluate_lm(model, valid, settings.lm_batch_size, bptt, folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {
        "valid_perplexity": perplexity,
        "valid_perplexity_own": math.exp(own[-1]),
        "seconds": time.time() - started,
        "train_seconds": train_seconds,
        "tokens_per_second": trainer.state.num_input_tokens_seen / max(train_seconds, 1e-9),
        "train_tokens": int(corpus.num_tokens),
        "vocab_size": len(tokenizer),
        "epochs": settings.lm_total_epochs,
        "schedule": schedule_name,
        "training": training_record(args),
        "backwards": backwards,
        "curve": loss_curve(trainer.state.log_history),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Stage 3: the classifier
# ----------------------------------------------------------------------------------------------------------------------
def train_classifier(
    parent: Path,
    train: tuple[list[str], list[str]],
    test: tuple[list[str], list[str]],
    label_names: list[str],
    settings: TaskSettings,
    seed: int,
    folder: Path,
    recipe: dict | None = None,
    random_init: bool = False,
) -> dict:
    """The classifier from `parent` (an LM stage folder, which also gives the tokenizer, BPTT and `max_len`) trained on
    `train` with the paper's recipe (`recipe` replaces any of its training arguments), evaluated on `test`.

    `random_init` trains the same classifier from random weights instead. Returns the run's record, with the test
    probabilities (in test order) for ensembles.
    """
    started = time.time()
    set_seed(seed)  # the head's initial weights
    tokenizer = AwdLstmTokenizer.from_pretrained(parent)
    id2label = dict(enumerate(label_names))
    model = AwdLstmForSequenceClassification.from_pretrained(
        parent, dtype=TRAINING_DTYPE, num_labels=len(label_names), id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        **AwdLstmConfig.dropouts("classifier", settings.clas_drop_mult),
    )
    if random_init:
        set_seed(seed)
        model = AwdLstmForSequenceClassification(model.config)
    backwards = model.config.backwards
    train_data = classification_data(*train, label_names, tokenizer, settings.max_tokens)
    test_data = classification_data(*test, label_names, tokenizer, settings.max_tokens)
    values = dict(
        ulmfit_schedule="stlr", unfreeze_schedule="gradual", discriminative_lr_factor=settings.discriminative_factor,
        stlr_cut_frac=settings.stlr_cut_frac, stlr_ratio=settings.stlr_ratio, learning_rate=settings.clas_lr,
    )
    values.update(recipe or {})
    args = training_arguments(
        folder, seed=seed, precision=settings.precision, num_train_epochs=settings.clas_epochs,
        per_device_train_batch_size=min(settings.clas_batch_size, len(train[0])),
        per_device_eval_batch_size=2 * settings.clas_batch_size,
        dataloader_drop_last=True,  # fastai drops the last partial training batch
        eval_strategy="no", **values,
    )
    trainer = ULMFiTTrainer(model=model, args=args, train_dataset=train_data, processing_class=tokenizer)
    output = trainer.train()
    train_seconds = output.metrics["train_runtime"]
    predict_started = time.time()
    probabilities = predict_probabilities(trainer, test_data)
    labels = np.asarray(test_data["labels"])
    return {
        "test_accuracy": float((probabilities.argmax(1) == labels).mean()),
        "seconds": time.time() - started,
        "train_seconds": train_seconds,
        "test_seconds": time.time() - predict_started,
        "tokens_per_second": trainer.state.num_input_tokens_seen / max(train_seconds, 1e-9),
        "steps": trainer.state.global_step,
        "epochs": settings.clas_epochs,
        "training": training_record(args),
        "random_init": random_init,
        "backwards": backwards,
        "curve": loss_curve(trainer.state.log_history),
        "test_probabilities": np.round(probabilities, 6).tolist(),
        "test_labels": labels.tolist(),
    }


# ----------------------------------------------------------------------------------------------------------------------
# A backward stage 1
# ----------------------------------------------------------------------------------------------------------------------
def backward_recipe(recipe_path: Path, forward_stage1: Path, general_corpus: Path, quick: bool = False) -> Recipe:
    """The recipe that made `forward_stage1`, reading text backwards (`model.backwards: true`): its sizes and the
    training settings the forward run recorded (`ulmfit_stage.json`: epochs, rate, batch size, schedule) are taken
    from the forward model, its data from `general_corpus` (train/valid.jsonl.gz). `quick`: a few documents, one
    epoch."""
    forward = AwdLstmConfig.from_pretrained(forward_stage1)
    overrides = [
        "model.backwards=true",
        f"stages.pretrain.data.path={general_corpus / 'train.jsonl.gz'}",
        f"stages.pretrain.eval_data.path={general_corpus / 'valid.jsonl.gz'}",
        *(f"model.{name}={getattr(forward, name)}"
          for name in ("emb_size", "hidden_size", "num_layers", "bptt", "max_len")),
    ]
    if (forward_stage1 / STAGE_FILE).is_file():
        ran = StageRecord.load(forward_stage1).hyperparameters
        names = ("num_train_epochs", "learning_rate", "per_device_train_batch_size", "ulmfit_schedule")
        overrides += [f"stages.pretrain.training.{name}={ran[name]}" for name in names if name in ran]
    if quick:
        overrides += ["stages.pretrain.max_documents=200", "stages.pretrain.max_eval_documents=40",
                      "stages.pretrain.training.num_train_epochs=1",
                      "stages.pretrain.training.per_device_train_batch_size=8",
                      'stages.pretrain.training.save_strategy="no"']
    return load_recipe(str(recipe_path), overrides=overrides)


def pretrain_backward(
    recipe_path: Path, forward_stage1: Path, general_corpus: Path, output_dir: Path, quick: bool = False
) -> Path:
    """Pretrains the [`backward_recipe`] with `run_stage` into `output_dir`; returns the stage folder."""
    recipe = backward_recipe(recipe_path, forward_stage1, general_corpus, quick)
    result = stages.run_stage(recipe, "pretrain", output_dir)
    return Path(result.folder)
