"""Running one ULMFiT stage of a recipe: data, tokenizer, model, Trainer, evaluation, stage folder, push.

Each stage starts from its parent (a stage of the same recipe, a local stage folder or a Hub repository), writes a
self-contained folder (model, tokenizer, record, curves, card) and returns a short summary.
"""

import dataclasses
import glob
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from modeling_awd_lstm import AwdLstmConfig, AwdLstmForCausalLM, AwdLstmForSequenceClassification

from .data import (
    ClassificationCollator,
    DataSpec,
    TokenizedCorpus,
    encode_labels,
    load_data,
    tokenize_for_classification,
    tokenize_for_lm,
    validate_dataset,
)
from .hub import CURVES_FILE, StageRecord, push_stage, write_model_card
from .metrics import classification_compute_metrics
from .plots import plot_training_curves
from .recipes import STAGE_ORDER, Recipe, StageSpec, TokenizerSpec
from .tokenizer_training import train_fastai_tokenizer, train_subword_tokenizer
from .trainer import ULMFiTTrainer, ULMFiTTrainingArguments


@dataclass
class StageResult:
    stage: str
    folder: str
    metrics: dict[str, float]
    seconds: float
    tokens_per_second: float
    pushed_to: str | None = None
    extra: dict[str, float] = field(default_factory=dict)
    processes: int = 1
    is_main: bool = True


def stage_folder(recipe: Recipe, output_dir: str | Path, stage: str) -> Path:
    return Path(output_dir) / stage


def resolve_parent(recipe: Recipe, stage: StageSpec, output_dir: Path, parent_override: str | None = None) -> str | None:
    """A local folder or Hub repository id for the stage's parent."""
    parent = parent_override or stage.parent
    if parent is None:
        return None
    if parent in STAGE_ORDER:
        folder = stage_folder(recipe, output_dir, parent)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"Stage {parent!r} has not been run: {folder} has no model. Run it first (`ulmfit run` runs every "
                f"stage), or pass --parent with a stage folder or Hub repository."
            )
        return str(folder)
    return parent


def _split_eval(dataset, spec: StageSpec, seed: int):
    if spec.eval_data is not None or spec.eval_fraction == 0:
        return dataset, None
    parts = dataset.train_test_split(test_size=spec.eval_fraction, seed=seed)
    return parts["train"], parts["test"]


def _read(spec: DataSpec, labelled: bool, max_documents: int | None = None):
    dataset = load_data(spec)
    if max_documents is not None and len(dataset) > max_documents:
        dataset = dataset.select(range(max_documents))
    validate_dataset(
        dataset, text_column=spec.text_column, label_column=spec.label_column if labelled else None,
        label_names=spec.label_names if labelled else None,
    )
    return dataset


def build_tokenizer(spec: TokenizerSpec, dataset, text_column: str) -> PreTrainedTokenizerBase:
    if spec.kind == "fastai":
        return train_fastai_tokenizer(dataset, max_vocab=spec.max_vocab, min_freq=spec.min_freq, text_column=text_column)
    return train_subword_tokenizer(dataset, vocab_size=spec.vocab_size, model=spec.subword_model, text_column=text_column)


def _training_arguments(
    recipe: Recipe, spec: StageSpec, folder: Path, overrides: dict, from_scratch: bool
) -> ULMFiTTrainingArguments:
    values = dict(
        output_dir=str(folder / "checkpoints"),
        seed=recipe.seed,
        lm_bptt=recipe.model.bptt,
        save_strategy="epoch",
        save_total_limit=1,
        eval_strategy="epoch",
        logging_steps=10,
        report_to="none",
        disable_tqdm=False,
        include_num_input_tokens_seen="non_padding",
    )
    values.update(spec.training)
    values.update(overrides)
    if from_scratch:  # discriminative rates protect pretrained layers; random ones all train at the full rate
        values.setdefault("discriminative_lr_factor", 1.0)
    # Evaluation keeps no graph: twice the training batch fits, as fastai does.
    values.setdefault("per_device_eval_batch_size", 2 * values.get("per_device_train_batch_size", 8))
    return ULMFiTTrainingArguments(**values)


def run_stage(
    recipe: Recipe,
    stage_name: str,
    output_dir: str | Path,
    parent: str | None = None,
    training_overrides: dict | None = None,
    push: bool | None = None,
    token: str | None = None,
) -> StageResult:
    """Runs one stage of `recipe` and returns its summary; the stage folder is `output_dir/stage_name`."""
    spec = recipe.stages[stage_name]
    output_dir = Path(output_dir)
    folder = stage_folder(recipe, output_dir, stage_name)
    folder.mkdir(parents=True, exist_ok=True)
    parent_path = resolve_parent(recipe, spec, output_dir, parent)
    if stage_name != "pretrain" and parent_path is None:
        raise ValueError(f"Stage {stage_name!r} needs a parent: set `stages.{stage_name}.parent` or pass --parent.")
    started = time.time()
    is_classifier = stage_name == "classifier"
    args = _training_arguments(recipe, spec, folder, training_overrides or {}, from_scratch=parent_path is None)
    # Under several processes the main one reads, tokenizes and caches first; the others reuse its caches.
    with args.main_process_first(desc=f"{stage_name}: preparing data"):
        tokenizer, train, evaluation = _prepare_data(spec, parent_path, recipe.seed, is_classifier, recipe)
        if is_classifier:
            model, trainer, test = _classifier_trainer(recipe, spec, parent_path, tokenizer, train, evaluation, args)
        else:
            model, trainer = _language_model_trainer(recipe, spec, parent_path, tokenizer, train, evaluation, args)
            test = None

    train_output = trainer.train()
    metrics = _final_metrics(trainer, evaluation, test, is_classifier)
    extra = _train_from_scratch(model.config, args, trainer, test, folder) if is_classifier and spec.compare_from_scratch else {}
    seconds = time.time() - started
    result = StageResult(
        stage=stage_name, folder=str(folder), metrics=metrics, seconds=seconds,
        tokens_per_second=trainer.state.num_input_tokens_seen / max(train_output.metrics["train_runtime"], 1e-9),
        extra=extra, processes=args.world_size, is_main=trainer.is_world_process_zero(),
    )
    if not result.is_main:
        return result

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    plot_training_curves(trainer.state.log_history, folder / CURVES_FILE, title=f"{recipe.name}: {stage_name}")
    repo_id = recipe.stage_repo_id(stage_name)
    record = StageRecord(
        stage=stage_name,
        recipe=recipe.name,
        model_name=(repo_id or f"{recipe.name}-{stage_name}").split("/")[-1],
        parent=_parent_name(recipe, spec, parent_path, parent),
        metrics={**metrics, **extra},
        eval_split="test" if test is not None else "validation",
        hyperparameters=_hyperparameters(model, args),
        data=_provenance(spec),
        model_summary=_model_summary(model),
    )
    record.save(folder)
    write_model_card(folder, repo_id or record.model_name)
    if (recipe.hub.push if push is None else push) and repo_id:
        result.pushed_to = push_stage(folder, repo_id, token=token, tag=recipe.hub.tag, private=recipe.hub.private)
    return result


def _prepare_data(spec: StageSpec, parent_path: str | None, seed: int, is_classifier: bool, recipe: Recipe):
    """The stage's tokenizer and its validated training and evaluation sets."""
    train = _read(spec.data, labelled=is_classifier, max_documents=spec.max_documents)
    train, held_out = _split_eval(train, spec, seed)
    evaluation = (
        _read(spec.eval_data, labelled=is_classifier, max_documents=spec.max_eval_documents)
        if spec.eval_data is not None
        else held_out
    )
    tokenizer_spec = spec.tokenizer or recipe.tokenizer
    if parent_path is None or tokenizer_spec.rebuild:
        tokenizer = build_tokenizer(tokenizer_spec, train, spec.data.text_column)
    else:
        tokenizer = AutoTokenizer.from_pretrained(parent_path, trust_remote_code=True)
    return tokenizer, train, evaluation


def _train_from_scratch(config, args, trainer, test, folder: Path) -> dict[str, float]:
    """The same classifier, data and schedule from random weights: what stages 1 and 2 add."""
    scratch = AwdLstmForSequenceClassification(config)
    scratch_args = dataclasses.replace(args, output_dir=str(folder / "from_scratch"), save_strategy="no")
    scratch_trainer = ULMFiTTrainer(
        model=scratch, args=scratch_args, train_dataset=trainer.train_dataset, eval_dataset=trainer.eval_dataset,
        processing_class=trainer.processing_class, data_collator=trainer.data_collator,
        compute_metrics=trainer.compute_metrics,
    )
    scratch_trainer.train()
    metrics = _final_metrics(scratch_trainer, None, test, is_classifier=True)
    return {f"from_scratch_{name}": value for name, value in metrics.items() if name.endswith("accuracy")}


def _language_model_trainer(recipe, spec, parent_path, tokenizer, train, evaluation, args):
    if parent_path is None:
        config = AwdLstmConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **_model_values(recipe, spec, "lm"),
        )
        model = AwdLstmForCausalLM(config)
    else:
        model = AwdLstmForCausalLM.from_pretrained(parent_path, **AwdLstmConfig.dropouts("lm", _drop_mult(recipe, spec)))
        if len(tokenizer) != model.config.vocab_size or (spec.tokenizer and spec.tokenizer.rebuild):
            model = _transfer_vocabulary(model, parent_path, tokenizer)
    column, backwards = spec.data.text_column, model.config.backwards
    corpus = TokenizedCorpus.from_dataset(
        tokenize_for_lm(train, tokenizer, text_column=column, backwards=backwards), vocab_size=len(tokenizer)
    )
    eval_column = (spec.eval_data or spec.data).text_column
    eval_corpus = TokenizedCorpus.from_dataset(
        tokenize_for_lm(evaluation, tokenizer, text_column=eval_column, backwards=backwards), vocab_size=len(tokenizer)
    ) if evaluation is not None else None
    trainer = ULMFiTTrainer(
        model=model, args=args, train_dataset=corpus, eval_dataset=eval_corpus, processing_class=tokenizer
    )
    return model, trainer


def _classifier_trainer(recipe, spec, parent_path, tokenizer, train, evaluation, args):
    label_column = spec.data.label_column
    train, label2id, id2label = encode_labels(train, label_column=label_column, label_names=spec.data.label_names)
    names = [id2label[i] for i in range(len(id2label))]
    model = AwdLstmForSequenceClassification.from_pretrained(
        parent_path, num_labels=len(names), id2label=id2label, label2id=label2id,
        **AwdLstmConfig.dropouts("classifier", _drop_mult(recipe, spec)),
    )
    column = spec.data.text_column
    if spec.max_tokens is not None:
        tokenizer.truncation_side = "left"  # keep the end of each document, which the classifier pools over

    def prepare(dataset, data_spec):
        if dataset is None:
            return None
        dataset, _, _ = encode_labels(dataset, label_column=data_spec.label_column, label_names=names)
        return tokenize_for_classification(
            dataset, tokenizer, text_column=data_spec.text_column, label_column=data_spec.label_column,
            max_length=spec.max_tokens,
        )

    train_tokens = tokenize_for_classification(
        train, tokenizer, text_column=column, label_column=label_column, max_length=spec.max_tokens
    )
    eval_tokens = prepare(evaluation, spec.eval_data or spec.data)
    test = _read(spec.test_data, labelled=True) if spec.test_data is not None else None
    test_tokens = prepare(test, spec.test_data) if test is not None else None
    trainer = ULMFiTTrainer(
        model=model, args=args, train_dataset=train_tokens, eval_dataset=eval_tokens, processing_class=tokenizer,
        data_collator=ClassificationCollator(tokenizer), compute_metrics=classification_compute_metrics(),
    )
    return model, trainer, test_tokens


def _final_metrics(trainer, evaluation, test, is_classifier: bool) -> dict[str, float]:
    if is_classifier:
        dataset, prefix = (test, "test") if test is not None else (trainer.eval_dataset, "eval")
        if dataset is None:
            return {}
        results = trainer.evaluate(dataset, metric_key_prefix=prefix)
        return {f"{prefix}_{name}": float(results[f"{prefix}_{name}"]) for name in ("accuracy", "f1", "error_rate")}
    if evaluation is None:
        return {}
    # The evaluation run at the end of the last epoch already measured the final weights.
    last = trainer.state.log_history[-2:] if trainer.state.log_history else []
    finished = [e for e in last if "eval_loss" in e and e.get("step") == trainer.state.global_step]
    results = finished[-1] if finished else trainer.evaluate()
    return {"eval_perplexity": float(math.exp(results["eval_loss"]))}


def _transfer_vocabulary(model, parent_path, tokenizer):
    from modeling_awd_lstm.convert_fastai import transfer_vocab

    old_vocab = AutoTokenizer.from_pretrained(parent_path, trust_remote_code=True).convert_ids_to_tokens(
        list(range(model.config.vocab_size))
    )
    new_vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return transfer_vocab(model, old_vocab, new_vocab)


def _model_values(recipe: Recipe, spec: StageSpec, kind: str) -> dict:
    model = recipe.model
    return dict(
        emb_size=model.emb_size, hidden_size=model.hidden_size, num_layers=model.num_layers,
        ar_alpha=model.ar_alpha, tar_beta=model.tar_beta, bptt=model.bptt, max_len=model.max_len,
        backwards=model.backwards, **AwdLstmConfig.dropouts(kind, _drop_mult(recipe, spec)),
    )


def _drop_mult(recipe: Recipe, spec: StageSpec) -> float:
    return spec.drop_mult if spec.drop_mult is not None else recipe.model.drop_mult


def _parent_name(recipe: Recipe, spec: StageSpec, parent_path: str | None, given_parent: str | None) -> str | None:
    """The parent's Hub repository when the recipe names one under an organization, else where it was loaded from."""
    if given_parent is None and spec.parent in STAGE_ORDER:
        repo = recipe.stage_repo_id(spec.parent)
        if repo and "/" in repo:
            return repo
    return parent_path


def _hyperparameters(model, args) -> dict:
    config = model.config
    names = [
        "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "weight_decay",
        "ulmfit_schedule", "discriminative_lr_factor", "adam_beta1", "adam_beta2", "stlr_cut_frac", "stlr_ratio",
        "unfreeze_schedule", "lm_bptt", "lm_variable_bptt", "bf16",
    ]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values.update({name: round(getattr(config, name), 4) for name in ("output_p", "hidden_p", "input_p", "embed_p", "weight_p")})
    values.update(ar_alpha=config.ar_alpha, tar_beta=config.tar_beta)
    return values


def _provenance(spec: StageSpec) -> list[dict[str, str]]:
    sources = []
    for role, data in (("training data", spec.data), ("evaluation data", spec.eval_data), ("test data", spec.test_data)):
        if data is None:
            continue
        # A local file, folder or glob; a Hub dataset id matches nothing.
        files = [data.path] if Path(data.path).exists() else sorted(glob.glob(data.path))
        local = bool(files)
        names = ", ".join(f"`{Path(name).name}`" for name in files) if local else f"`{data.path}`"
        entry = {"role": role, "description": names}
        if not local:
            entry["hub"] = data.path
        if "demo_data" in data.path:
            entry["license"] = "see training/demo_data/PROVENANCE.md (WikiText: CC BY-SA 3.0; IMDb: research use)"
        sources.append(entry)
    return sources


def _model_summary(model) -> str:
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    return f"AWD-LSTM, vocab {c.vocab_size}, embedding {c.emb_size}, {c.num_layers} LSTM layers of {c.hidden_size}, {params / 1e6:.1f}M parameters"




def summarize(recipe: Recipe, results: list[StageResult]) -> str:
    """Prints and returns the end-of-run summary: per stage its metric, time, tokens/s and where it went."""
    processes = results[0].processes if results else 1
    lines = [f"\nULMFiT run `{recipe.name}` (processes {processes})", ""]
    lines.append(f"| stage | {'metric':<28} | {'time':>8} | {'tokens/s':>9} | saved to / pushed to |")
    lines.append(f"|---|{'-' * 30}|{'-' * 10}|{'-' * 11}|---|")
    for result in results:
        metric = ", ".join(f"{name} {value:.4g}" for name, value in result.metrics.items() if not name.endswith("error_rate"))
        where = result.folder + (f" -> {result.pushed_to}" if result.pushed_to else "")
        lines.append(
            f"| {result.stage} | {metric:<28} | {result.seconds:>7.0f}s | {result.tokens_per_second:>9.0f} | {where} |"
        )
        for name, value in result.extra.items():
            lines.append(f"| {result.stage} | {name} {value:.4g}{'':<8} | | | |")
    text = "\n".join(lines)
    print(text)
    return text
