"""Running one ULMFiT stage of a recipe: data, tokenizer, model, Trainer, evaluation, stage folder, push.

Each stage starts from its parent (a stage of the same recipe, a local stage folder or a Hub repository), writes a
self-contained folder (model, tokenizer, record, curves, card) and returns a short summary.
"""

import ctypes
import dataclasses
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, set_seed

from modeling_awd_lstm import AwdLstmConfig, AwdLstmForCausalLM, AwdLstmForSequenceClassification, AwdLstmTokenizer

from .data import (
    REGRESSION,
    SINGLE_LABEL,
    ClassificationCollator,
    DataSpec,
    TokenizedCorpus,
    encode_targets,
    join_text_fields,
    load_data,
    tokenize_for_classification,
    tokenize_for_lm,
    validate_dataset,
)
from .hub import CURVES_FILE, STAGE_FILE, StageRecord, push_stage, write_model_card
from .lr_finder import RangeTest, find_learning_rate
from .metrics import HEADLINE_METRICS, classification_compute_metrics
from .plots import plot_training_curves
from .pretrained import PREFIX as PRETRAINED_PREFIX
from .pretrained import model_location
from .recipes import STAGE_ORDER, Recipe, RecipeError, StageSpec, TokenizerSpec
from .tokenizer_training import train_fastai_tokenizer, train_subword_tokenizer
from .trainer import ULMFiTTrainer, ULMFiTTrainingArguments, last_complete_checkpoint

FIND_LEARNING_RATE = "find"  # `learning_rate: find` in a stage's training
LR_FIND_FILE, LR_FIND_PLOT = "lr_find.json", "lr_find.png"

# Stages keep fp32 weights (bf16 runs under autocast): a parent stored in bf16, as shipped models are, is upcast rather
# than loaded in the dtype its config records, which transformers would otherwise keep.
TRAINING_DTYPE = torch.float32


@dataclass
class StageResult:
    stage: str
    folder: str
    metrics: dict[str, float]
    seconds: float
    tokens_per_second: float
    pushed_to: str | None = None
    # The same task without ULMFiT (classifiers): the from-scratch twin and TF-IDF + logistic regression.
    baselines: dict[str, float] = field(default_factory=dict)
    processes: int = 1
    is_main: bool = True
    # How the stage got its weights: "trained", "resumed from checkpoint-<step>" or "reused" (finished earlier).
    status: str = "trained"


CHECKPOINTS = "checkpoints"
# What an interrupted stage was started with; a run that resumes it must ask for the same.
RUN_SETTINGS_FILE = "ulmfit_run.json"


# glibc's mallopt parameters and the environment variables that set them at start-up.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def reuse_freed_memory() -> None:
    """Keeps large freed blocks in the process instead of returning them to the system.

    Training allocates and frees the same large blocks every step. By default glibc serves them with mmap and unmaps
    them on free, so every step faults them in again, which on a small CPU costs a large part of each step. Keeping
    them raises the peak memory to a few times the live one. This does
    what `MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647` would; a process started with either
    variable keeps its own choice. Linux with glibc only.
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in MALLOC_VARIABLES):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library
        return
    libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
    libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(2**30))


def stage_folder(recipe: Recipe, output_dir: str | Path, stage: str) -> Path:
    return Path(output_dir) / stage


def is_finished(folder: str | Path) -> bool:
    """A stage is finished once its record is written: the last file a stage writes."""
    return Path(folder, STAGE_FILE).is_file()


def last_checkpoint(folder: str | Path) -> str | None:
    """The latest complete checkpoint of the stage in `folder` (a save cut short is not one)."""
    return last_complete_checkpoint(Path(folder, CHECKPOINTS))


def prepare_stage_folder(folder: Path, settings: dict, overwrite: bool = False, restart: bool = False) -> str | None:
    """Makes `folder` ready for a stage and returns the checkpoint to resume from, if any.

    A finished stage is replaced only with `overwrite`, and then emptied first so that no file of the old run stays
    beside the new one. An interrupted stage resumes from its last checkpoint, unless `restart`, if it was started
    with the same `settings`. A folder holding anything that no stage wrote is refused.
    """
    if is_finished(folder) and not overwrite:
        raise FileExistsError(f"{folder} holds a finished stage; pass --overwrite to train it again.")
    checkpoint = last_checkpoint(folder)
    if checkpoint is not None and not (restart or overwrite):
        saved = json.loads(Path(folder, CHECKPOINTS, RUN_SETTINGS_FILE).read_text())
        changed = _changed_keys(saved, settings)
        if changed:
            raise ValueError(
                f"{folder} holds an interrupted run started with other settings ({', '.join(changed[:3])} differ): "
                "run the command it was started with to resume it, or pass --restart to discard it."
            )
        return checkpoint
    if folder.exists() and any(folder.iterdir()):
        if not (is_finished(folder) or Path(folder, CHECKPOINTS).is_dir()):
            raise FileExistsError(
                f"{folder} holds files that no ULMFiT stage wrote; choose another --output-dir or empty it."
            )
        shutil.rmtree(folder)
    Path(folder, CHECKPOINTS).mkdir(parents=True)
    Path(folder, CHECKPOINTS, RUN_SETTINGS_FILE).write_text(json.dumps(settings, indent=2, default=str) + "\n")
    return None


def _changed_keys(old, new, where: str = "") -> list[str]:
    # Keys on one side only are settings a newer version of this package added or dropped, not the user's changes.
    if isinstance(old, dict) and isinstance(new, dict):
        return [key for name in sorted(set(old) & set(new))
                for key in _changed_keys(old[name], new[name], f"{where}.{name}" if where else name)]
    return [] if old == new else [where or "settings"]


def _run_settings(recipe: Recipe, stage_name: str, parent_path: str | None, args: ULMFiTTrainingArguments) -> dict:
    """Everything a stage's result depends on, as JSON values, to tell whether a rerun continues the same run: the
    recipe's stage and every training argument in effect (the recipe's `training:` with the command's overrides)."""
    spec = dataclasses.asdict(recipe.stages[stage_name])
    spec.pop("training")
    training = {name: value for name, value in args.to_dict().items() if name not in _RUN_LOCAL_ARGUMENTS}
    values = {
        "recipe": recipe.name, "stage": stage_name, "seed": recipe.seed, "parent": parent_path,
        "model": dataclasses.asdict(recipe.model), "tokenizer": dataclasses.asdict(recipe.tokenizer),
        "spec": spec, "training": training,
    }
    return json.loads(json.dumps(values, default=str))


# Training arguments that may differ between the runs of one stage without changing its result.
_RUN_LOCAL_ARGUMENTS = {"logging_dir", "disable_tqdm", "hub_token", "dataloader_num_workers"}


def reused_result(stage_name: str, folder: Path) -> StageResult:
    """The summary of a stage finished by an earlier run, from its record."""
    record = StageRecord.load(folder)
    return StageResult(stage=stage_name, folder=str(folder), metrics=record.metrics, seconds=0.0,
                       tokens_per_second=0.0, baselines=record.baselines, status="reused")


def resolve_parent(
    recipe: Recipe, stage: StageSpec, output_dir: Path, parent_override: str | None = None
) -> str | None:
    """A local folder or Hub repository id for the stage's parent."""
    parent = parent_override or stage.parent
    if parent is None:
        return None
    if parent in STAGE_ORDER:
        folder = stage_folder(recipe, output_dir, parent)
        if not is_finished(folder):
            raise FileNotFoundError(
                f"Stage {parent!r} has not finished: {folder} holds no finished stage. Run it first (`ulmfit run` runs "
                f"every stage and resumes an interrupted one), or pass --parent with a stage folder or Hub repository."
            )
        return str(folder)
    if parent.startswith(PRETRAINED_PREFIX):
        return model_location(parent)
    check_model_folder(parent, f" or one of this recipe's stages ({', '.join(recipe.stages)})")
    return parent


def _stage_parent(recipe: Recipe, stage_name: str, output_dir: Path, parent: str | None) -> str | None:
    """`resolve_parent` for a stage about to be built: every stage but `pretrain` needs one."""
    parent_path = resolve_parent(recipe, recipe.stages[stage_name], output_dir, parent)
    if stage_name != "pretrain" and parent_path is None:
        raise ValueError(f"Stage {stage_name!r} needs a parent: set `stages.{stage_name}.parent` or pass --parent.")
    return parent_path


def check_model_folder(model: str, alternatives: str = "") -> bool:
    """Whether `model` is a local model folder, checked to be complete; a local path that holds no model, or a
    damaged one, fails here with its name rather than later as a Hub lookup or a traceback."""
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        if folder.exists() or model.startswith((".", "/", "~")):
            raise FileNotFoundError(
                f"{model} holds no model (no config.json): pass a stage folder or a Hub repository id{alternatives}."
            )
        check_hub_model(model)
        return False
    from safetensors import SafetensorError, safe_open

    for weights in folder.glob("*.safetensors"):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except SafetensorError as error:
            raise ValueError(f"{weights} is damaged ({error}): copy it again, or train the stage again.") from None
    return True


def check_hub_model(repo_id: str) -> None:
    """Fetches the config of a Hub model (or finds it in the cache) before any data is prepared, so a misspelt id or
    an unreachable Hub ends in one line rather than a traceback after minutes of work."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    local_path = "a local path starts with ./ or /"
    try:
        hf_hub_download(repo_id, "config.json")
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor a Hub model repository this token can see: check the name "
            f"({local_path})."
        ) from None
    except EntryNotFoundError as error:
        if isinstance(error, FileNotFoundError):  # the local kind: offline, or the Hub unreachable, and not cached
            raise FileNotFoundError(
                f"{repo_id!r} is not a local folder, and the Hub could not be reached to fetch it (nor is it in the "
                f"cache): check the connection, or pass a local model folder ({local_path})."
            ) from None
        raise FileNotFoundError(f"The Hub repository {repo_id!r} holds no model (no config.json).") from None
    except HfHubHTTPError as error:
        raise FileNotFoundError(f"Fetching {repo_id!r} from the Hub failed: {str(error).splitlines()[0]}") from None


def _split_eval(dataset, spec: StageSpec, seed: int):
    if spec.eval_data is not None or spec.eval_fraction == 0:
        return dataset, None
    parts = dataset.train_test_split(test_size=spec.eval_fraction, seed=seed)
    return parts["train"], parts["test"]


def _read(
    spec: DataSpec, labelled: bool, max_documents: int | None = None, fastai_markers: bool = True,
    problem_type: str | None = None,
):
    """The validated data of `spec`, its text fields joined for the stage's tokenizer (`join_text_fields`)."""
    dataset = load_data(spec)
    if max_documents is not None and len(dataset) > max_documents:
        dataset = dataset.select(range(max_documents))
    validate_dataset(
        dataset, text_column=spec.text_fields, label_column=spec.label_column if labelled else None,
        label_names=spec.label_names if labelled else None, problem_type=problem_type,
    )
    return join_text_fields(dataset, spec, fastai_markers)


def build_tokenizer(spec: TokenizerSpec, dataset, text_column: str) -> PreTrainedTokenizerBase:
    if spec.kind == "fastai":
        return train_fastai_tokenizer(
            dataset, max_vocab=spec.max_vocab, min_freq=spec.min_freq, text_column=text_column
        )
    return train_subword_tokenizer(
        dataset, vocab_size=spec.vocab_size, model=spec.subword_model, text_column=text_column
    )


def check_training_arguments(recipe: Recipe, overrides: dict | None = None) -> None:
    """Builds every stage's training arguments, so a value that cannot train fails before any work, naming the stage."""
    for name, spec in recipe.stages.items():
        try:
            args = _training_arguments(recipe, spec, Path("."), overrides or {}, from_scratch=spec.parent is None)
        except (TypeError, ValueError) as error:
            raise RecipeError(f"`stages.{name}.training`: {error}") from error
        try:
            dataclasses.replace(args, **spec.from_scratch_training)
        except (TypeError, ValueError) as error:
            raise RecipeError(f"`stages.{name}.from_scratch_training`: {error}") from error


def _training_arguments(
    recipe: Recipe, spec: StageSpec, folder: Path, overrides: dict, from_scratch: bool
) -> ULMFiTTrainingArguments:
    if "resume_from_checkpoint" in {**spec.training, **overrides}:
        raise ValueError(
            "resume_from_checkpoint is not set by hand: running a stage's command again resumes it from its last "
            "checkpoint (--restart starts it over)."
        )
    evaluates = spec.eval_data is not None or spec.eval_fraction > 0
    values = dict(
        output_dir=str(folder / CHECKPOINTS),
        seed=recipe.seed,
        lm_bptt=recipe.model.bptt,
        save_strategy="epoch",
        save_total_limit=2,  # the previous checkpoint stays until the newest is complete
        eval_strategy="epoch" if evaluates else "no",
        logging_steps=10,
        report_to="none",
        disable_tqdm=False,
        include_num_input_tokens_seen="non_padding",
    )
    values.update(spec.training)
    values.update(overrides)
    if not evaluates and values["eval_strategy"] != "no":
        raise ValueError(
            f"eval_strategy {values['eval_strategy']!r} needs evaluation data, and the stage has none (no `eval_data`, "
            "`eval_fraction: 0`): give one of them, or leave eval_strategy unset."
        )
    if values.get("learning_rate") == FIND_LEARNING_RATE:
        del values["learning_rate"]  # chosen by the range test once the stage is built
    if from_scratch:  # discriminative rates protect pretrained layers; random ones all train at the full rate
        values.setdefault("discriminative_lr_factor", 1.0)
    # Evaluation keeps no graph: twice the training batch fits, as fastai does.
    values.setdefault("per_device_eval_batch_size", 2 * values.get("per_device_train_batch_size", 8))
    args = ULMFiTTrainingArguments(**values)
    if args.learning_rate <= 0:  # a stage that cannot learn
        raise ValueError(f"learning_rate must be positive; got {args.learning_rate}.")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ValueError(f"num_train_epochs must be positive (or set max_steps); got {args.num_train_epochs}.")
    return args


def run_stage(
    recipe: Recipe,
    stage_name: str,
    output_dir: str | Path,
    parent: str | None = None,
    training_overrides: dict | None = None,
    push: bool | None = None,
    token: str | None = None,
    overwrite: bool = False,
    restart: bool = False,
) -> StageResult:
    """Runs one stage of `recipe` and returns its summary; the stage folder is `output_dir/stage_name`.

    A finished stage is kept and its summary returned (`status="reused"`) unless `overwrite`; an interrupted one
    continues from its last checkpoint unless `restart`.
    """
    spec = recipe.stages[stage_name]
    output_dir = Path(output_dir)
    folder = stage_folder(recipe, output_dir, stage_name)
    if is_finished(folder) and not overwrite:
        return reused_result(stage_name, folder)
    reuse_freed_memory()
    parent_path = _stage_parent(recipe, stage_name, output_dir, parent)
    started = time.time()
    is_classifier = stage_name == "classifier"
    overrides = training_overrides or {}
    args = _training_arguments(recipe, spec, folder, overrides, from_scratch=parent_path is None)
    settings = _run_settings(recipe, stage_name, parent_path, args)
    with args.main_process_first(desc=f"{stage_name}: preparing the stage folder"):
        if args.should_save:
            resume_from = prepare_stage_folder(folder, settings, overwrite=overwrite, restart=restart)
        else:
            resume_from = last_checkpoint(folder)
    built = _build_stage(recipe, stage_name, parent_path, args, resume_from)
    tokenizer, train, evaluation = built.tokenizer, built.train, built.evaluation
    model, trainer, test = built.model, built.trainer, built.test_tokens
    notes = ""
    if finds_learning_rate(spec, overrides):
        if args.world_size > 1:  # each process would test on its own rows and find its own rate
            raise ValueError(
                "learning_rate: find runs in one process: run `ulmfit lr-find` first and set the rate it suggests."
            )
        notes = _set_found_learning_rate(trainer, folder, resume_from)

    tokens_before = _tokens_seen(resume_from)  # read now: the resumed run's own checkpoints rotate it away
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    metrics = _final_metrics(trainer, evaluation, test, is_classifier)
    baselines, hyperparameters = {}, _hyperparameters(model, args)
    if is_classifier and spec.compare_from_scratch:
        scratch_metrics, scratch_args = _train_from_scratch(
            model.config, args, spec.from_scratch_training, trainer, test, folder
        )
        baselines.update(scratch_metrics)
        changed = spec.from_scratch_training
        hyperparameters.update({f"from_scratch_{name}": getattr(scratch_args, name) for name in changed})
    if is_classifier and spec.compare_tfidf and model.config.problem_type == SINGLE_LABEL:  # logistic regression
        baselines.update(_tfidf_baseline(spec, train, evaluation, built.test, args.seed))
    seconds = time.time() - started
    result = StageResult(
        stage=stage_name, folder=str(folder), metrics=metrics, seconds=seconds,
        tokens_per_second=(trainer.state.num_input_tokens_seen - tokens_before)
        / max(train_output.metrics["train_runtime"], 1e-9),
        baselines=baselines, processes=args.world_size, is_main=trainer.is_world_process_zero(),
        status=f"resumed from {Path(resume_from).name}" if resume_from else "trained",
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
        metrics=metrics,
        baselines=baselines,
        eval_split="test" if test is not None else "validation",
        hyperparameters=hyperparameters,
        data=_provenance(spec),
        model_summary=_model_summary(model),
        notes=notes,
    )
    write_model_card(folder, repo_id or record.model_name, record)
    record.save(folder)  # last: the record marks the stage finished
    if (recipe.hub.push if push is None else push) and repo_id:
        result.pushed_to = push_stage(folder, repo_id, token=token, tag=recipe.hub.tag, private=recipe.hub.private)
    return result


@dataclass
class BuiltStage:
    """A stage ready to train: its tokenizer, its data as read (the test split read once, with train and eval), the
    model and its trainer, and the test split as the classifier reads it."""

    tokenizer: PreTrainedTokenizerBase
    train: object
    evaluation: object
    test: object
    model: object
    trainer: ULMFiTTrainer
    test_tokens: object = None


def _build_stage(
    recipe: Recipe, stage_name: str, parent_path: str | None, args, resume_from: str | None = None
) -> BuiltStage:
    """The stage's tokenizer, data, model and trainer, ready to train."""
    spec, is_classifier = recipe.stages[stage_name], stage_name == "classifier"
    set_seed(args.seed)  # the model's initial weights and the classifier head come from it
    # Under several processes the main one reads, tokenizes and caches first; the others reuse its caches.
    with args.main_process_first(desc=f"{stage_name}: preparing data"):
        tokenizer, train, evaluation, test = _prepare_data(
            spec, parent_path, recipe.seed, is_classifier, recipe, resume_from
        )
        if is_classifier:
            model, trainer, test_tokens = _classifier_trainer(
                recipe, spec, parent_path, tokenizer, train, evaluation, test, args
            )
        else:
            model, trainer = _language_model_trainer(recipe, spec, parent_path, tokenizer, train, evaluation, args)
            test_tokens = None
    if model.config.backwards != recipe.model.backwards:  # a parent's direction is its weights': it cannot change
        reads, recipe_reads = ("backwards", "forwards") if model.config.backwards else ("forwards", "backwards")
        raise ValueError(
            f"The parent {parent_path} reads text {reads} but the recipe reads it {recipe_reads} (model.backwards: "
            f"{str(recipe.model.backwards).lower()}): start from a parent that reads {recipe_reads}, or set "
            f"model.backwards: {str(model.config.backwards).lower()}."
        )
    return BuiltStage(tokenizer, train, evaluation, test, model, trainer, test_tokens)


def finds_learning_rate(spec: StageSpec, overrides: dict | None = None) -> bool:
    """Whether the stage's `learning_rate` is `find`: fastai's range test chooses it before training."""
    return {**spec.training, **(overrides or {})}.get("learning_rate") == FIND_LEARNING_RATE


def _set_found_learning_rate(trainer, folder: Path, resume_from: str | None) -> str:
    """Runs the range test (or, resuming, reads what it found) and trains at its `valley`; returns the card's note."""
    found = folder / LR_FIND_FILE
    if resume_from is not None and found.is_file():
        test = RangeTest(**json.loads(found.read_text()))
    else:
        test = find_learning_rate(trainer)
        if trainer.is_world_process_zero():
            found.write_text(json.dumps(dataclasses.asdict(test)) + "\n")
            test.plot(folder / LR_FIND_PLOT)
    trainer.args.learning_rate = test.valley
    print(f"Learning rate from the range test: {test.valley:.2e} (valley; minimum/10 is {test.minimum:.2e}).")
    return (
        f"`learning_rate: find`: fastai's range test chose {test.valley:.2e} (its `valley`; `minimum`/10 was "
        f"{test.minimum:.2e})."
    )


def find_stage_learning_rate(
    recipe: Recipe,
    stage_name: str,
    output_dir: str | Path,
    parent: str | None = None,
    training_overrides: dict | None = None,
    **range_test,
) -> tuple[RangeTest, Path]:
    """fastai's learning-rate range test on a stage as `run_stage` would train it, without training it: the result
    and its plot, `output_dir/<stage>-lr_find.png`. `range_test` goes to `find_learning_rate`."""
    spec = recipe.stages[stage_name]
    output_dir = Path(output_dir)
    parent_path = _stage_parent(recipe, stage_name, output_dir, parent)
    with tempfile.TemporaryDirectory() as scratch:  # the stage's own folder stays as it is
        args = _training_arguments(recipe, spec, Path(scratch), training_overrides or {}, parent_path is None)
        trainer = _build_stage(recipe, stage_name, parent_path, args).trainer
        test = find_learning_rate(trainer, **range_test)
    output_dir.mkdir(parents=True, exist_ok=True)
    return test, test.plot(output_dir / f"{stage_name}-{LR_FIND_PLOT}")


def _tokens_seen(checkpoint: str | None) -> int:
    """Tokens read before `checkpoint`: a resumed run counts them, while its runtime starts at the resume."""
    if checkpoint is None:
        return 0
    return json.loads(Path(checkpoint, "trainer_state.json").read_text()).get("num_input_tokens_seen", 0)


def _prepare_data(
    spec: StageSpec, parent_path: str | None, seed: int, is_classifier: bool, recipe: Recipe,
    resume_from: str | None = None,
):
    """The stage's tokenizer and its validated training, evaluation and (for a classifier) test sets. An interrupted
    stage that built its own tokenizer gets it back from its checkpoint rather than building it again."""
    tokenizer_spec = spec.tokenizer or recipe.tokenizer
    builds_tokenizer = parent_path is None or tokenizer_spec.rebuild
    tokenizer = None
    if builds_tokenizer and resume_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(resume_from, trust_remote_code=True)
    elif not builds_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(parent_path, trust_remote_code=True)
    # Several text fields are joined as the tokenizer expects: with fastai's field markers for its tokenizer.
    markers = tokenizer_spec.kind == "fastai" if tokenizer is None else has_field_markers(tokenizer)
    reading = dict(labelled=is_classifier, fastai_markers=markers, problem_type=spec.problem_type)
    train = _read(spec.data, max_documents=spec.max_documents, **reading)
    train, held_out = _split_eval(train, spec, seed)
    evaluation = (
        _read(spec.eval_data, max_documents=spec.max_eval_documents, **reading)
        if spec.eval_data is not None
        else held_out
    )
    test = _read(spec.test_data, **reading) if spec.test_data is not None and is_classifier else None
    if tokenizer is None:
        tokenizer = build_tokenizer(tokenizer_spec, train, spec.data.text_key)
    return tokenizer, train, evaluation, test


def has_field_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer reads fastai's field markers (`xxfld`): fastai's tokenizer does, subword ones do not."""
    return isinstance(tokenizer, AwdLstmTokenizer)


def _train_from_scratch(
    config, args, changes: dict, trainer, test, folder: Path
) -> tuple[dict[str, float], ULMFiTTrainingArguments]:
    """The same classifier, data and schedule from random weights, with the recipe's `from_scratch_training`
    `changes` to its training arguments: what stages 1 and 2 add. Returns its metrics and the arguments it ran with."""
    set_seed(args.seed)
    scratch = AwdLstmForSequenceClassification(config)
    scratch_args = dataclasses.replace(args, **changes, output_dir=str(folder / "from_scratch"), save_strategy="no")
    scratch_trainer = ULMFiTTrainer(
        model=scratch, args=scratch_args, train_dataset=trainer.train_dataset, eval_dataset=trainer.eval_dataset,
        processing_class=trainer.processing_class, data_collator=trainer.data_collator,
        compute_metrics=trainer.compute_metrics,
    )
    scratch_trainer.train()
    metrics = _final_metrics(scratch_trainer, None, test, is_classifier=True)
    # Single-label classes: accuracy alone; the other problem types keep each of their headline metrics.
    single = (config.problem_type or SINGLE_LABEL) == SINGLE_LABEL
    kept = {f"from_scratch_{name}": value for name, value in metrics.items() if not single or name.endswith("accuracy")}
    return kept, scratch_trainer.args


def _tfidf_baseline(spec: StageSpec, train, evaluation, test, seed: int) -> dict[str, float]:
    """TF-IDF + logistic regression fit on the classifier's own training split, scored where the classifier is."""
    from .baselines import tfidf_logreg

    scored_spec, prefix = (
        (spec.test_data, "test") if spec.test_data is not None else (spec.eval_data or spec.data, "eval")
    )
    scored = test if spec.test_data is not None else evaluation
    if scored is None:
        return {}

    def pairs(dataset, data_spec):
        return dataset[data_spec.text_key], [str(label) for label in dataset[data_spec.label_column]]

    result = tfidf_logreg(pairs(train, spec.data), pairs(scored, scored_spec), seed)
    return {f"tfidf_{prefix}_accuracy": result["test_accuracy"]}


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
        model = AwdLstmForCausalLM.from_pretrained(
            parent_path, dtype=TRAINING_DTYPE, **AwdLstmConfig.dropouts("lm", _drop_mult(recipe, spec))
        )
        if len(tokenizer) != model.config.vocab_size or (spec.tokenizer and spec.tokenizer.rebuild):
            model = _transfer_vocabulary(model, parent_path, tokenizer)
    column, backwards = spec.data.text_key, model.config.backwards
    corpus = TokenizedCorpus.from_dataset(
        tokenize_for_lm(train, tokenizer, text_column=column, backwards=backwards), vocab_size=len(tokenizer)
    )
    eval_column = (spec.eval_data or spec.data).text_key
    eval_corpus = TokenizedCorpus.from_dataset(
        tokenize_for_lm(evaluation, tokenizer, text_column=eval_column, backwards=backwards), vocab_size=len(tokenizer)
    ) if evaluation is not None else None
    trainer = ULMFiTTrainer(
        model=model, args=args, train_dataset=corpus, eval_dataset=eval_corpus, processing_class=tokenizer
    )
    return model, trainer


def _classifier_trainer(recipe, spec, parent_path, tokenizer, train, evaluation, test, args):
    label_column = spec.data.label_column
    train, label2id, id2label, problem_type = encode_targets(
        train, label_column=label_column, label_names=spec.data.label_names, problem_type=spec.problem_type
    )
    names = [id2label[i] for i in range(len(id2label))]
    if len(names) < 2 and problem_type != REGRESSION:
        raise ValueError(
            f"The classifier's training data has {len(names)} class(es) {names} in column {label_column!r}: a "
            "classifier needs at least two. Check the label column and the data, or set label_names."
        )
    model = AwdLstmForSequenceClassification.from_pretrained(
        parent_path, dtype=TRAINING_DTYPE, num_labels=len(names), id2label=id2label, label2id=label2id,
        problem_type=problem_type, **AwdLstmConfig.dropouts("classifier", _drop_mult(recipe, spec)),
    )
    column = spec.data.text_key
    if spec.max_tokens is not None:
        tokenizer.truncation_side = "left"  # keep the end of each document, which the classifier pools over

    def prepare(dataset, data_spec):
        if dataset is None:
            return None
        dataset = encode_targets(
            dataset, label_column=data_spec.label_column, label_names=None if problem_type == REGRESSION else names,
            problem_type=problem_type,
        )[0]
        return tokenize_for_classification(
            dataset, tokenizer, text_column=data_spec.text_key, label_column=data_spec.label_column,
            max_length=spec.max_tokens,
        )

    train_tokens = tokenize_for_classification(
        train, tokenizer, text_column=column, label_column=label_column, max_length=spec.max_tokens
    )
    eval_tokens = prepare(evaluation, spec.eval_data or spec.data)
    test_tokens = prepare(test, spec.test_data) if test is not None else None
    trainer = ULMFiTTrainer(
        model=model, args=args, train_dataset=train_tokens, eval_dataset=eval_tokens, processing_class=tokenizer,
        data_collator=ClassificationCollator(tokenizer), compute_metrics=classification_compute_metrics(problem_type),
    )
    return model, trainer, test_tokens


def _final_metrics(trainer, evaluation, test, is_classifier: bool) -> dict[str, float]:
    if is_classifier:
        dataset, prefix = (test, "test") if test is not None else (trainer.eval_dataset, "eval")
        if dataset is None:
            return {}
        results = trainer.evaluate(dataset, metric_key_prefix=prefix)
        names = HEADLINE_METRICS[trainer.model.config.problem_type or SINGLE_LABEL]
        return {f"{prefix}_{name}": float(results[f"{prefix}_{name}"]) for name in names}
    if evaluation is None:
        return {}
    # The evaluation run at the end of the last epoch already measured the final weights.
    last = trainer.state.log_history[-2:] if trainer.state.log_history else []
    finished = [e for e in last if "eval_loss" in e and e.get("step") == trainer.state.global_step]
    results = finished[-1] if finished else trainer.evaluate()
    return {"eval_perplexity": float(math.exp(results["eval_loss"]))}


def _transfer_vocabulary(model, parent_path, tokenizer):
    from ulmfit.convert_fastai import transfer_vocab

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
    """The parent's Hub repository when the recipe names one under an organization, the alias of a shipped model,
    else where it was loaded from."""
    named = given_parent or spec.parent
    if named is not None and named.startswith(PRETRAINED_PREFIX):
        return named
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
    values.update(
        {name: round(getattr(config, name), 4) for name in ("output_p", "hidden_p", "input_p", "embed_p", "weight_p")}
    )
    values.update(ar_alpha=config.ar_alpha, tar_beta=config.tar_beta)
    return values


def _provenance(spec: StageSpec) -> list[dict[str, str]]:
    sources = []
    for role, data in (
        ("training data", spec.data), ("evaluation data", spec.eval_data), ("test data", spec.test_data)
    ):
        if data is None:
            continue
        # A local file, folder or glob; a Hub dataset id matches nothing.
        files = [data.path] if Path(data.path).exists() else sorted(glob.glob(data.path))
        local = bool(files)
        names = ", ".join(f"`{Path(name).name}`" for name in files) if local else f"`{data.path}`"
        entry = {"role": role, "description": f"{data.description} ({names})" if data.description else names}
        if not local:
            entry["hub"] = data.path
        if data.license:
            entry["license"] = data.license
        elif "demo_data" in data.path:
            entry["license"] = "see training/demo_data/PROVENANCE.md (WikiText: CC BY-SA 3.0; IMDb: research use)"
        sources.append(entry)
    return sources


def _model_summary(model) -> str:
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    return (
        f"AWD-LSTM, vocab {c.vocab_size}, embedding {c.emb_size}, {c.num_layers} LSTM layers of {c.hidden_size},"
        f" {params / 1e6:.1f}M parameters"
    )




def summarize(recipe: Recipe, results: list[StageResult]) -> str:
    """Prints and returns the end-of-run summary: per stage its metric, time, tokens/s and where it went."""
    processes = results[0].processes if results else 1
    lines = [f"\nULMFiT run `{recipe.name}` (processes {processes})", ""]
    lines.append(f"| stage | {'metric':<28} | {'time':>8} | {'tokens/s':>9} | {'weights':<28} | saved to / pushed to |")
    lines.append(f"|---|{'-' * 30}|{'-' * 10}|{'-' * 11}|{'-' * 30}|---|")
    for result in results:
        metric = ", ".join(
            f"{name} {value:.4g}" for name, value in result.metrics.items() if not name.endswith("error_rate")
        )
        where = result.folder + (f" -> {result.pushed_to}" if result.pushed_to else "")
        status = "reused (finished earlier)" if result.status == "reused" else result.status
        seconds, speed = (("-", "-") if result.status == "reused"
                          else (f"{result.seconds:.0f}s", f"{result.tokens_per_second:.0f}"))
        lines.append(f"| {result.stage} | {metric:<28} | {seconds:>8} | {speed:>9} | {status:<28} | {where} |")
        for name, value in result.baselines.items():
            lines.append(f"| {result.stage} | {name} {value:.4g}{'':<8} | | | baseline{'':<20} | |")
    if any(result.status == "reused" for result in results):
        lines += ["", "Finished stages were kept; pass --overwrite to train them again."]
    text = "\n".join(lines)
    print(text)
    return text
