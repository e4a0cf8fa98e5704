"""`ulmfit`: run a ULMFiT recipe or one of its stages, classify, generate, convert fastai models, push stages.

    ulmfit run demo                           # all three stages of the bundled demo recipe
    ulmfit run hub_configs/paper_imdb.yaml --set hub.organization=me --push
    ulmfit finetune-lm demo --parent me/ulmfit-demo-lm
    ulmfit predict runs/demo/classifier reviews.csv --text-column review
    ulmfit generate runs/demo/finetune_lm "The movie was"

Under `accelerate launch -m ulmfit run RECIPE` every process trains; the main process alone writes and pushes.
"""

import argparse
import atexit
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from .pretrained import PREFIX as PRETRAINED_PREFIX
from .pretrained import model_location
from .recipes import STAGE_ORDER, Recipe, RecipeError, load_recipe

STAGE_COMMANDS = {"pretrain": "pretrain", "finetune-lm": "finetune_lm", "train-classifier": "classifier"}
COMMANDS_WITH_STAGES = {"run", *STAGE_COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ulmfit", description="ULMFiT with Hugging Face transformers.")
    parser.add_argument("--debug", action="store_true", help="Show the traceback of an error, not just its message.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="Run a recipe's stages: its last stage and the stages it starts from.")
    _add_recipe_arguments(run)
    run.add_argument(
        "--stages", default=None,
        help="Comma-separated stages to run, in order (default: the last stage and the stages it starts from).",
    )
    for command, stage in STAGE_COMMANDS.items():
        one = commands.add_parser(command, help=f"Run only the {stage} stage of a recipe.")
        _add_recipe_arguments(one)
        one.add_argument("--parent", default=None, help="Parent stage: a local stage folder or a Hub repository id.")

    validate = commands.add_parser("validate", help="Check a recipe without running it.")
    validate.add_argument("recipe")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    commands.add_parser("arguments", help="List the ULMFiT training arguments a recipe's `training:` may set.")

    predict = commands.add_parser("predict", help="Classify a file of texts (txt: one per line, csv, jsonl).")
    predict.add_argument("model", help="Classifier folder or Hub repository.")
    predict.add_argument("file")
    predict.add_argument(
        "--backward", default=None, metavar="MODEL",
        help="A backward classifier (model.backwards: true) of the same classes: predict with the mean of both "
        "classifiers' probabilities, the paper's forward + backward ensemble.",
    )
    predict.add_argument(
        "--explain", action="store_true",
        help="Also give each token's importance for the predicted class (fastai's intrinsic attention), in the "
        "output and as an HTML page beside it.",
    )
    predict.add_argument(
        "--text-column", nargs="+", default=["text"],
        help="The text column of a csv or jsonl file; several are joined as in training (e.g. title description).",
    )
    predict.add_argument("--output", default=None, help="Where to write predictions (default: FILE.predictions.jsonl).")
    predict.add_argument("--batch-size", type=int, default=64)

    generate = commands.add_parser("generate", help="Sample a continuation from a language model.")
    generate.add_argument("model", help="LM folder, Hub repository, or shipped model (pretrained:en).")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=40)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=40)
    generate.add_argument("--greedy", action="store_true")
    generate.add_argument("--seed", type=int, default=0)

    lr_find = commands.add_parser(
        "lr-find", help="fastai's learning-rate range test on a stage of a recipe, as the stage would train."
    )
    _add_recipe_arguments(lr_find, trains=False)
    lr_find.add_argument("--stage", required=True, choices=STAGE_ORDER)
    lr_find.add_argument("--parent", default=None, help="Parent stage: a local stage folder or a Hub repository id.")
    lr_find.add_argument("--num-steps", type=int, default=100)
    lr_find.add_argument("--start-lr", type=float, default=1e-7)
    lr_find.add_argument("--end-lr", type=float, default=10.0)

    push = commands.add_parser("push", help="Push a stage folder to the Hub with its card.")
    push.add_argument("folder", help="A stage folder, or a shipped model (pretrained:en).")
    push.add_argument("repo_id")
    push.add_argument("--tag", default=None)
    push.add_argument("--revision", default=None)
    push.add_argument("--private", action="store_true")

    convert = commands.add_parser("convert-fastai", help="Convert a fastai ULMFiT model to a transformers folder.")
    _add_convert_arguments(convert)
    return parser


def _add_recipe_arguments(parser: argparse.ArgumentParser, trains: bool = True) -> None:
    parser.add_argument(
        "recipe", nargs="?", default="demo", help="Recipe file, or a shipped recipe name (default: demo)."
    )
    parser.add_argument("--output-dir", default=None, help="Where stage folders go (default: the recipe's output_dir).")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="Override any recipe value by its dotted path, e.g. --set stages.classifier.training.learning_rate=0.005",
    )
    parser.add_argument(
        "--training", dest="training", action="append", default=[], metavar="KEY=VALUE",
        help="Set a training argument for every stage run, e.g. --training max_steps=20",
    )
    if not trains:
        return
    parser.add_argument(
        "--push", action="store_true", default=None, help="Push each stage to the Hub (recipe: hub.push)."
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="Train stages that already finished again, replacing their folders (finished stages are otherwise kept).",
    )
    parser.add_argument(
        "--restart", action="store_true",
        help="Start an interrupted stage over instead of resuming it from its last checkpoint.",
    )


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    from .convert import add_convert_fastai_arguments

    add_convert_fastai_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .hub import HubPushError

    try:
        status = COMMANDS[args.command](args)
    except (RecipeError, FileNotFoundError, FileExistsError, ValueError, HubPushError) as error:
        if args.debug:
            raise
        print(f"ulmfit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = " (it resumes from its last checkpoint)" if args.command in COMMANDS_WITH_STAGES else ""
        print(f"ulmfit {args.command}: interrupted; run the same command again to continue{again}.", file=sys.stderr)
        return 130
    leave_process_group(status)
    return status


def leave_process_group(status: int = 0) -> None:
    """Ends an `accelerate launch` process that succeeded on every process: destroys its process group and exits with
    `status` without tearing down the interpreter. Does nothing outside a process group.

    gloo's worker threads drop a finished collective's tensors on their own time; a thread that does so once the
    interpreter has begun tearing down cannot take the GIL and aborts the process ("terminate called without an
    active exception") after all the work is done. So the exit handlers run, the output is flushed and the process
    ends before that teardown. After a failure the group is left alone: the other processes may still be waiting in a
    collective, where destroying it would hang.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# ----------------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------------
def _load(args: argparse.Namespace) -> Recipe:
    """The recipe, with every stage's training arguments checked by building them, as the run will."""
    import typing

    from .stages import check_training_arguments
    from .trainer import ULMFiTTrainingArguments

    hints = typing.get_type_hints(ULMFiTTrainingArguments)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(ULMFiTTrainingArguments) if f.init}
    recipe = load_recipe(args.recipe, overrides=args.overrides, training_fields=fields)
    check_training_arguments(recipe, _training_overrides(getattr(args, "training", [])))
    return recipe


def _training_overrides(pairs: list[str]) -> dict:
    values = {}
    for pair in pairs:
        if "=" not in pair:
            raise RecipeError(f"--training {pair!r} must look like key=value.")
        key, raw = pair.split("=", 1)
        values[key] = yaml.safe_load(raw)
    return values


def command_run(args: argparse.Namespace) -> int:
    recipe = _load(args)
    if args.command == "run":
        stages = args.stages.split(",") if args.stages else recipe.lineage()
        parent = None
        first = stages[0]
        for name in [] if args.stages else [name for name in recipe.stages if name not in stages]:
            print(
                f"Stage {name} is not run: {first} starts from {recipe.stages[first].parent} "
                f"(`--set stages.{first}.parent={name}` trains {name} first and starts from it)."
            )
    else:
        stages, parent = [STAGE_COMMANDS[args.command]], args.parent
    _check_stages(recipe, stages)
    from .stages import run_stage, summarize

    output_dir = _output_dir(args, recipe)
    overrides = _training_overrides(args.training)
    results = []
    for stage in stages:
        results.append(run_stage(
            recipe, stage, output_dir, parent=parent, training_overrides=overrides, push=args.push,
            overwrite=args.overwrite, restart=args.restart,
        ))
    if results[-1].is_main:
        summarize(recipe, results)
    return 0


def _check_stages(recipe: Recipe, stages: list[str]) -> None:
    unknown = [stage for stage in stages if stage not in recipe.stages]
    if unknown:
        raise RecipeError(f"Stage {unknown[0]!r} is not in recipe {recipe.name!r} (it has {', '.join(recipe.stages)}).")


def _output_dir(args: argparse.Namespace, recipe: Recipe) -> Path:
    return Path(args.output_dir or recipe.output_dir or f"runs/{recipe.name}")


def command_lr_find(args: argparse.Namespace) -> int:
    recipe = _load(args)
    _check_stages(recipe, [args.stage])
    from .stages import find_stage_learning_rate

    output_dir = _output_dir(args, recipe)
    test, plot = find_stage_learning_rate(
        recipe, args.stage, output_dir, parent=args.parent, training_overrides=_training_overrides(args.training),
        start_lr=args.start_lr, end_lr=args.end_lr, num_steps=args.num_steps,
    )
    print(
        f"Suggested learning rates for {args.stage}: valley {test.valley:.2e} (fastai's default), minimum/10 "
        f"{test.minimum:.2e}; {len(test.losses)} steps, plot in {plot}. Set it with "
        f"--set stages.{args.stage}.training.learning_rate={test.valley:.2e}, or let the stage find it with "
        f"learning_rate: find."
    )
    return 0


def command_validate(args: argparse.Namespace) -> int:
    recipe = _load(args)
    print(f"{recipe.source}: valid recipe {recipe.name!r} with stages {', '.join(recipe.stages)}")
    return 0


def command_arguments(args: argparse.Namespace) -> int:
    from transformers import HfArgumentParser

    from .trainer import ULMFiTTrainingArguments

    HfArgumentParser(ULMFiTTrainingArguments).print_help()
    return 0


def read_texts(path: str, text_columns: list[str], fastai_markers: bool = True) -> list[str]:
    """The texts of a data file (.txt one per line, .csv, .jsonl, .parquet), read as the stages read their data;
    several text columns joined as in training."""
    from .data import DataSpec, join_text_fields, load_data, validate_dataset

    if not Path(path).exists():
        raise FileNotFoundError(f"No file {path}.")
    spec = DataSpec(path=path, text_column=text_columns[0] if len(text_columns) == 1 else list(text_columns),
                    label_column=None)
    dataset = load_data(spec)
    validate_dataset(dataset, text_column=spec.text_fields)
    return list(join_text_fields(dataset, spec, fastai_markers)[spec.text_key])


def command_predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm
    from transformers import pipeline

    import modeling_awd_lstm  # noqa: F401  (registers the Auto classes)

    from .ensemble import ensemble_classifiers, mean_probabilities
    from .interpret import explain, write_explanations_html
    from .stages import has_field_markers

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1; got {args.batch_size}.")
    if args.explain and args.backward:
        raise ValueError("--explain explains one classifier: leave out --backward, or explain each on its own.")
    _check_is_classifier(args.model)
    if args.backward:
        _check_is_classifier(args.backward)
        classifiers = ensemble_classifiers(args.model, args.backward)
    else:
        classifiers = [pipeline("text-classification", model=args.model, trust_remote_code=True, top_k=None)]
    texts = read_texts(args.file, args.text_column, fastai_markers=has_field_markers(classifiers[0].tokenizer))
    problem_type = classifiers[0].model.config.problem_type
    output = Path(args.output or f"{args.file}.predictions.jsonl")
    # Written under a temporary name and renamed when complete: an interrupted run leaves earlier predictions intact.
    partial = output.with_name(f"{output.name}.partial")
    explanations = []
    with partial.open("w", encoding="utf-8") as handle:
        for start in tqdm(range(0, len(texts), args.batch_size), desc="Classifying", unit="batch"):
            batch = texts[start : start + args.batch_size]
            scores = [classify(batch, batch_size=args.batch_size, truncation=False) for classify in classifiers]
            for text, *each in zip(batch, *scores):
                row = prediction_row(text, mean_probabilities(each), problem_type)
                if args.explain:
                    model, tokenizer = classifiers[0].model, classifiers[0].tokenizer
                    explanations.append(explain(model, tokenizer, text, label=row.get("label")))
                    row.update(tokens=explanations[-1].tokens, importance=explanations[-1].importance)
                handle.write(json.dumps(row) + "\n")
    os.replace(partial, output)
    print(f"Wrote {len(texts)} predictions to {output}" + (" (forward + backward ensemble)" if args.backward else ""))
    if args.explain:
        page = output.with_name(f"{output.stem}.html")
        written = write_explanations_html(explanations, f"{page}.partial", title=f"{args.model}: {args.file}")
        os.replace(written, page)
        print(f"Token importance (darker weighs more) in {page}")
    return 0


def prediction_row(text: str, scores: dict[str, float], problem_type: str | None) -> dict:
    """One line of `predict`'s output: the label and class probabilities; for multi-label classes every label whose
    sigmoid reaches the threshold; for regression the value."""
    from .metrics import MULTI_LABEL_THRESHOLD

    if problem_type == "regression":
        return {"text": text, "value": round(next(iter(scores.values())), 6)}
    probabilities = {label: round(p, 6) for label, p in scores.items()}
    if problem_type == "multi_label_classification":
        labels = [label for label, p in scores.items() if p >= MULTI_LABEL_THRESHOLD]
        return {"text": text, "labels": labels, "probabilities": probabilities}
    return {"text": text, "label": max(scores, key=scores.get), "probabilities": probabilities}


def _check_is_classifier(model: str) -> None:
    """A language-model folder would load with a new, random classifier head and label texts at random."""
    from .stages import check_model_folder

    if not check_model_folder(model):
        return
    config_file = Path(model, "config.json").expanduser()
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ValueError(
            f"{model} holds a {', '.join(architectures) or 'model'}, not a classifier: predict needs a classifier "
            "stage folder (e.g. runs/demo/classifier)."
        )


def command_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import pipeline

    import modeling_awd_lstm  # noqa: F401  (registers the Auto classes)

    from .stages import check_model_folder

    model = model_location(args.model)
    check_model_folder(model)
    torch.manual_seed(args.seed)
    generator = pipeline("text-generation", model=model, trust_remote_code=True)
    sampling = (
        {"do_sample": False}
        if args.greedy
        else {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k}
    )
    result = generator(args.prompt, max_new_tokens=args.max_new_tokens, **sampling)
    print(result[0]["generated_text"])
    return 0


def command_push(args: argparse.Namespace) -> int:
    from .hub import push_stage

    push = dict(tag=args.tag, revision=args.revision, private=args.private)
    if args.folder.startswith(PRETRAINED_PREFIX):  # a copy: the push renders the card, and the package stays as shipped
        with tempfile.TemporaryDirectory() as scratch:
            name = args.folder.removeprefix(PRETRAINED_PREFIX)
            folder = shutil.copytree(model_location(args.folder), Path(scratch, name))
            url = push_stage(folder, args.repo_id, commit_message=f"Upload {args.folder} from ulmfit-hf", **push)
    else:
        url = push_stage(args.folder, args.repo_id, **push)
    print(f"Pushed {args.folder} to {url}")
    return 0


def command_convert(args: argparse.Namespace) -> int:
    from .convert import run_convert_fastai

    return run_convert_fastai(args) or 0


COMMANDS = {
    "run": command_run,
    **{command: command_run for command in STAGE_COMMANDS},
    "validate": command_validate,
    "arguments": command_arguments,
    "predict": command_predict,
    "generate": command_generate,
    "push": command_push,
    "lr-find": command_lr_find,
    "convert-fastai": command_convert,
}

if __name__ == "__main__":
    raise SystemExit(main())
