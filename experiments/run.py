"""ULMFiT results side by side with fastai: the same recipe in both implementations, low-shot learning, ablations.

    python -m experiments.run compare --task trec6      # ours and fastai 2.8, same stage 1, same recipe
    python -m experiments.run compare --task imdb
    python -m experiments.run lowshot                   # IMDb with 100 to 5,000 labels: ULMFiT, from scratch, TF-IDF
    python -m experiments.run ablations --task trec6    # variants of the recipe (ours)
    python -m experiments.run stage2_timing --task trec6  # both stage 2s timed side by side, alternating
    python -m experiments.run report                    # RESULTS.md and plots from every result file

Every run writes `results/<experiment>/<name>_seed<k>.json` when it finishes, and a command skips the runs whose file
exists, so an interrupted command picks up where it stopped. Stage 2 (LM fine-tuning) runs once per implementation
(seed 0) and is shared by the classifier runs of every seed; its folder under `--work-dir` is named after the
settings that decide it. `--quick` shrinks everything for a smoke test; its numbers mean nothing.
"""

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import TaskData, imdb_lowshot_train, load_task
from .results import now, read_json, result_path, write_json
from .settings import (
    LOWSHOT_LABELS,
    LOWSHOT_MIN_STEPS,
    LOWSHOT_SCRATCH_LR,
    TASKS,
    TaskSettings,
    lowshot_settings,
    signature,
    task_settings,
)

EXPERIMENTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXPERIMENTS_DIR.parent
IMPLS = ("ours", "fastai")
STAGE2_FILE = "stage2.json"

# The classifier's arguments for one rate on every layer group, trained from the start.
ONE_RATE_CLASSIFIER = {"discriminative_lr_factor": 1.0, "unfreeze_schedule": None}
# Ablations: what each variant changes in the recipe (stage 3 unless said), and the training arguments it sets.
ABLATIONS = {
    "full": ("ULMFiT: stage 1, stage 2, discriminative rates (2.6), STLR, gradual unfreezing", {}),
    "no_pretraining": ("no stage 1: stage 2 from random weights (one-cycle, one rate), then the full recipe", {}),
    "no_lm_finetuning": ("no stage 2: the classifier straight from stage 1 (its vocabulary)", {}),
    "lm_one_rate": ("stage 2 at one rate for every layer along a one-cycle (no frozen epoch, no discriminative "
                    "rates), then the full recipe", {}),
    "lm_discr": ("stage 2 with discriminative rates (2.6) along a one-cycle, every layer from the start, then the "
                 "full recipe", {}),
    "lm_discr_stlr": ("stage 2 with discriminative rates (2.6) along STLR, every layer from the start (the paper's "
                      "stage 2), then the full recipe", {}),
    "lm_one_rate_gentle": ("stage 2 as lm_one_rate, then the classifier at one gentle rate (the from-scratch "
                           f"classifier's {LOWSHOT_SCRATCH_LR:g}) for every layer, no unfreezing, STLR",
                           {**ONE_RATE_CLASSIFIER, "learning_rate": LOWSHOT_SCRATCH_LR}),
    "no_discriminative": ("full fine-tuning: one rate for every layer group (factor 1), no unfreezing, STLR",
                          ONE_RATE_CLASSIFIER),
    "no_gradual_unfreezing": ("discriminative rates (2.6) and STLR, every layer group trained from the start",
                              {"unfreeze_schedule": None}),
    "last_layer": ("only the classifier head trains (encoder frozen), STLR", {"unfreeze_schedule": "0:1"}),
    "constant_lr": ("constant rates instead of STLR (discriminative, gradual unfreezing)",
                    {"ulmfit_schedule": "constant"}),
    "cosine_lr": ("cosine decay after a 10% linear warm-up instead of STLR (discriminative, gradual unfreezing)",
                  {"ulmfit_schedule": "cosine", "warmup_steps": 0.1}),
    "backward": ("backward LM and classifier (stages 1-3 read every document reversed), full recipe", {}),
    "ensemble": ("forward + backward: mean of the two classifiers' probabilities", {}),
    "tfidf": ("no network: TF-IDF (word 1-2 grams) + logistic regression, C by 5-fold cross-validation", {}),
}
# Our stage-2 kinds: the schedule each trains along (`ours.LM_SCHEDULES`) and whether it starts from random weights.
# "ours" is the recipe's (fastai's `fine_tune`, as fastai's side runs it); "ours_backward" is that recipe on reversed
# text from a backward stage 1; "ours_scratch" trains every layer at one rate, as nothing is pretrained to protect.
OURS_STAGE2 = {
    "ours": ("fine_tune", False), "ours_backward": ("fine_tune", False), "ours_scratch": ("one_rate", True),
    "ours_one_rate": ("one_rate", False), "ours_discr": ("discr", False), "ours_discr_stlr": ("discr_stlr", False),
}
# The stage-2 LM a variant starts from (a kind, see `Experiment.stage2`) where it is not the recipe's ("ours").
ABLATION_STAGE2 = {"no_pretraining": "ours_scratch", "lm_one_rate": "ours_one_rate", "lm_discr": "ours_discr",
                   "lm_discr_stlr": "ours_discr_stlr", "lm_one_rate_gentle": "ours_one_rate"}
LOWSHOT_METHODS = {
    "ulmfit": "ULMFiT (ours): the IMDb stage-2 LM of `compare`, full recipe",
    "ulmfit_lm_one_rate": "ULMFiT (ours), full recipe, from the stage-2 LM trained at one rate (`lm_one_rate`)",
    "ulmfit_scratch_schedule": "the one-rate stage-2 LM with the from-scratch classifier's schedule (one rate at its "
                               "own peak, no unfreezing, STLR): what stages 1-2 add to `scratch`, and nothing else",
    "no_stage1_scratch_schedule": "the stage-2 LM trained from random weights (`no_pretraining`: no stage 1) with the "
                                  "from-scratch classifier's schedule: what stage 2 alone adds to `scratch`",
    "ulmfit_no_unfreezing": "ULMFiT (ours) from the LM of `compare`, discriminative rates and STLR, every layer group "
                            "trained from the start (no gradual unfreezing)",
    "ulmfit_one_rate": "ULMFiT (ours) from the LM of `compare`, one rate for every layer and no gradual unfreezing",
    "scratch": "the same classifier from random weights (no stages 1-2), one rate for every layer (its own), STLR",
    "tfidf": "TF-IDF (word 1-2 grams) + logistic regression, C by 5-fold cross-validation",
}


@dataclasses.dataclass(frozen=True)
class LowshotRecipe:
    """How a low-shot method that trains a classifier differs from the full recipe."""

    stage2: str  # the stage-2 LM it starts from (a kind, see `Experiment.stage2`)
    recipe: dict | None = None  # what it changes in the classifier's training arguments (the ablations')
    random_init: bool = False  # only the LM's shape and vocabulary are kept
    scratch_lr: bool = False  # the from-scratch classifier's peak rate (`--scratch-lr`) instead of `--clas-lr`


LOWSHOT_RECIPES = {
    "ulmfit": LowshotRecipe("ours"),
    "ulmfit_lm_one_rate": LowshotRecipe("ours_one_rate"),
    "ulmfit_scratch_schedule": LowshotRecipe("ours_one_rate", ABLATIONS["no_discriminative"][1], scratch_lr=True),
    "no_stage1_scratch_schedule": LowshotRecipe("ours_scratch", ABLATIONS["no_discriminative"][1], scratch_lr=True),
    "ulmfit_no_unfreezing": LowshotRecipe("ours", ABLATIONS["no_gradual_unfreezing"][1]),
    "ulmfit_one_rate": LowshotRecipe("ours", ABLATIONS["no_discriminative"][1]),
    "scratch": LowshotRecipe("ours_one_rate", ABLATIONS["no_discriminative"][1], random_init=True, scratch_lr=True),
}


def _seeds(text: str) -> list[int]:
    try:
        return [int(seed) for seed in text.split(",") if seed.strip()]
    except ValueError:
        message = f"--seeds takes integers separated by commas, e.g. 0,1,2; got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _counts(text: str) -> list[int]:
    try:
        return [int(count) for count in text.split(",") if count.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, e.g. 100,500; got {text!r}") from None


def _names_from(allowed: dict, what: str):
    """An argparse type: a comma-separated list of `allowed`'s keys, each checked, in the order given."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = sorted(set(names) - set(allowed))
        if unknown or not names:
            problem = f"unknown {what} {unknown}" if unknown else f"no {what} given"
            raise argparse.ArgumentTypeError(f"{problem}; choose from {', '.join(allowed)}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("where things are")
    where.add_argument("--data-dir", type=Path, default=Path("/work/shared/data"), help="holds trec/ and imdb/")
    where.add_argument("--work-dir", type=Path, default=EXPERIMENTS_DIR / "work", help="stage-2 models and exports")
    where.add_argument("--results-dir", type=Path, default=EXPERIMENTS_DIR / "results", help="one JSON per run")
    where.add_argument("--stage1", type=Path, default=EXPERIMENTS_DIR / "work" / "general_lm" / "pretrain",
                       help="the stage-1 language model folder (AwdLstmForCausalLM + AwdLstmTokenizer)")
    run = common.add_argument_group("runs")
    run.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="classifier seeds (default 0,1,2)")
    run.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test (its numbers mean nothing)")
    run.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                     help="both implementations (default: bf16 CPU autocast on both sides where the CPU has bf16 "
                          "kernels, AVX-512 BF16 or AMX; fp32 elsewhere)")
    run.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    recipe = common.add_argument_group("data and recipe (defaults per task and --quick: experiments/settings.py)")
    for name, kind, text in (
        ("labels", int, "labelled training documents (IMDb: balanced subset; TREC: all 5,452 by default)"),
        ("test-docs", int, "test documents (IMDb: balanced subset; TREC: all 500 by default)"),
        ("unsup-docs", int, "IMDb: unlabelled reviews added to the stage-2 text"),
        ("max-tokens", int, "classifiers read only the last N tokens of each document"),
        ("lm-epochs", int, "stage 2: fine_tune epochs after the frozen one"),
        ("lm-lr", float, "stage 2: fine_tune base rate"),
        ("lm-batch-size", int, None), ("lm-drop-mult", float, None),
        ("clas-epochs", int, None), ("clas-lr", float, "stage 3: the top layer group's peak rate"),
        ("clas-batch-size", int, None), ("clas-drop-mult", float, None),
    ):
        recipe.add_argument(f"--{name}", type=kind, default=None, help=text)

    parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", parents=[common], help="ours and fastai 2.8 side by side on one task")
    compare.add_argument("--task", choices=TASKS, required=True)
    compare.add_argument("--fastai-classifier-ar-tar", action="store_true",
                         help="keep fastai's AR/TAR on the classifier (off by default: ours has none)")
    lowshot = commands.add_parser("lowshot", parents=[common], help="IMDb with few labels")
    lowshot.add_argument("--label-counts", type=_counts, default=None, help="default 100,500,1000,5000")
    lowshot.add_argument("--min-steps", type=int, default=None,
                         help="classifiers train at least this many steps, in more epochs on fewer labels "
                              f"(default {LOWSHOT_MIN_STEPS[False]}; 0: always --clas-epochs)")
    lowshot.add_argument("--methods", type=_names_from(LOWSHOT_METHODS, "methods"), default=list(LOWSHOT_METHODS),
                         help=f"comma-separated subset of {', '.join(LOWSHOT_METHODS)} (default: all)")
    lowshot.add_argument("--scratch-lr", type=float, default=LOWSHOT_SCRATCH_LR,
                         help="the from-scratch classifier's peak rate (default %(default)g)")
    lowshot.add_argument("--stage2", type=Path, default=None,
                         help="a stage-2 LM folder made by `ulmfit finetune-lm` (e.g. from "
                              "experiments/recipes/imdb_lm.yaml): every classifier starts from it (the from-scratch "
                              "one takes its shape and vocabulary) instead of a stage 2 trained here")
    ablations = commands.add_parser("ablations", parents=[common], help="variants of the recipe (ours)")
    ablations.add_argument("--task", choices=TASKS, required=True)
    ablations.add_argument("--variants", type=_names_from(ABLATIONS, "variants"), default=list(ABLATIONS),
                           help="comma-separated subset of the variants")
    ablations.add_argument("--stage1-backward", type=Path, default=None,
                           help="the backward stage-1 folder (default WORK_DIR/general_lm_backward/pretrain)")
    ablations.add_argument("--pretrain-backward", action="store_true",
                           help="pretrain the backward stage 1 when it does not exist (as long as stage 1 took)")
    ablations.add_argument("--stage1-recipe", type=Path, default=EXPERIMENTS_DIR / "recipes" / "general_lm.yaml")
    ablations.add_argument("--general-corpus", type=Path, default=None,
                           help="train/valid.jsonl.gz of stage 1 (default WORK_DIR/general)")
    timing = commands.add_parser("stage2_timing", parents=[common],
                                 help="both implementations' stage 2 timed side by side, alternating")
    timing.add_argument("--task", choices=TASKS, required=True)
    timing.add_argument("--rounds", type=int, default=2,
                        help="rounds of one stage 2 per side, in ABBA order (default %(default)s)")
    report = commands.add_parser("report", help="RESULTS.md and plots from every result file")
    report.add_argument("--results-dir", type=Path, default=EXPERIMENTS_DIR / "results")
    report.add_argument("--output", type=Path, default=REPO_ROOT / "RESULTS.md")
    report.add_argument("--plots-dir", type=Path, default=None, help="default: the results folder")
    return parser


# ----------------------------------------------------------------------------------------------------------------------
# One task's runs
# ----------------------------------------------------------------------------------------------------------------------
def _model_identity(folder: Path) -> dict:
    weights = folder / "model.safetensors"
    if not (folder / "config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"No finished language model at {folder}: build and pretrain stage 1 first (experiments/README.md), or "
            "point --stage1 at a stage folder."
        )
    stat = weights.stat()
    return {"path": str(folder.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class Experiment:
    """One task's settings, documents and stage-2 models."""

    def __init__(self, args: argparse.Namespace, task: str):
        self.args = args
        names = ("labels", "test_docs", "unsup_docs", "max_tokens", "lm_epochs", "lm_lr", "lm_batch_size",
                 "lm_drop_mult", "clas_epochs", "clas_lr", "clas_batch_size", "clas_drop_mult", "precision")
        self.settings: TaskSettings = task_settings(task, args.quick, **{n: getattr(args, n) for n in names})
        self.task_dir = args.work_dir / f"{task}-{signature(self.settings.data_signature())}"
        self._data: TaskData | None = None

    @property
    def data(self) -> TaskData:
        if self._data is None:
            self._data = load_task(self.settings, self.args.data_dir)
            self.task_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.task_dir / "settings.json", {**self.settings.data_signature(), **self._data.stats()})
        return self._data

    @property
    def test(self) -> tuple[list[str], list[str]]:
        return self.data.test_texts, self.data.test_labels

    @property
    def train(self) -> tuple[list[str], list[str]]:
        return self.data.train_texts, self.data.train_labels

    def stage2(self, kind: str, parent: Path | None = None) -> tuple[Path, dict]:
        """The stage-2 LM of `kind` ("fastai" or one of `OURS_STAGE2`), trained once and reused."""
        if kind != "fastai" and kind not in OURS_STAGE2:
            raise ValueError(f"unknown stage-2 kind {kind!r}; choose from fastai, {', '.join(OURS_STAGE2)}")
        parent = parent or self.args.stage1
        folder = self.task_dir / f"{kind}-{signature(_model_identity(parent))}" / "finetune_lm"
        if (folder / STAGE2_FILE).is_file():
            record = read_json(folder / STAGE2_FILE)
            tqdm.write(f"{self.settings.task} stage 2 ({kind}): done already, {folder}")
            return folder, record
        folder.mkdir(parents=True, exist_ok=True)
        tqdm.write(f"{self.settings.task} stage 2 ({kind}): {self.data.stats()['lm_docs']} documents from {parent}")
        record = self.train_stage2(kind, parent, folder)
        record.update(kind=kind, parent=str(parent), seed=0, folder=str(folder), finished=now())
        write_json(folder / STAGE2_FILE, record)
        tqdm.write(f"{self.settings.task} stage 2 ({kind}): validation perplexity {record['valid_perplexity']:.1f} "
                   f"(own {record['valid_perplexity_own']:.1f}), {record['seconds']:.0f} s, "
                   f"{record['tokens_per_second']:.0f} tokens/s, vocabulary {record['vocab_size']}")
        return folder, record

    def train_stage2(self, kind: str, parent: Path, folder: Path) -> dict:
        """Trains the stage-2 LM of `kind` from `parent` into `folder` (no reuse) and returns its record."""
        data, settings = self.data, self.settings
        if kind == "fastai":  # fastai is imported only where its side runs
            from modeling_awd_lstm import AwdLstmTokenizer

            from . import fastai_side

            ours_vocab = AwdLstmTokenizer.from_pretrained(self.stage2("ours")[0]).itos
            return fastai_side.finetune_lm(data.lm_texts, data.lm_is_valid, settings, parent, folder, ours_vocab)
        from . import ours

        schedule, random_init = OURS_STAGE2[kind]
        return ours.finetune_lm(data.lm_texts, data.lm_is_valid, settings, parent, folder,
                                random_init=random_init, schedule=schedule)

    def run(self, experiment: str, name: str, seed: int, train_fn, settings: TaskSettings | None = None,
            **fields) -> dict:
        """Runs `train_fn()` (a record with `test_accuracy`) unless its result file exists; writes and prints it.

        `settings`: what this run trained with, where it differs from the task's (low-shot epochs and rates)."""
        path = result_path(self.args.results_dir, experiment, name, seed)
        settings = settings or self.settings
        if path.is_file():
            record = read_json(path)
            if record.get("settings") != settings.to_dict():
                tqdm.write(f"warning: {path} was run with other settings; delete it (or use another --results-dir) "
                           "to run it again")
            tqdm.write(f"{experiment} {name} seed {seed}: done already, {path}")
            return record
        started = now()
        result = train_fn()
        record = {
            "experiment": experiment, "name": name, "seed": seed, "task": self.settings.task, **fields,
            "test_accuracy": result["test_accuracy"], "test_error": 1 - result["test_accuracy"],
            "n_test": len(self.test[0]), **{k: v for k, v in result.items() if k != "test_accuracy"},
            "settings": settings.to_dict(), "data": self.data.stats(),
            "command": self.args.command_line, "hardware": _hardware(), "started": started, "finished": now(),
        }
        write_json(path, record)
        tqdm.write(summary_line(record))
        return record


def _hardware() -> dict:
    from benchmarks.report import machine_info, versions

    return {**machine_info(), "versions": versions(), "torch_threads": torch.get_num_threads()}


def _shared(stage2: dict) -> dict:
    """The stage-2 record as each seed's result holds it."""
    return {**stage2, "shared_across_seeds": True}


def ulmfit_stage2(folder: Path) -> tuple[Path, dict]:
    """A stage-2 LM trained by `ulmfit finetune-lm`, with the fields of a stage-2 record its stage record holds (its
    time is in that run's own log: the stage record keeps no wall time across resumed runs)."""
    from ulmfit.hub import StageRecord

    _model_identity(folder)
    stage = StageRecord.load(folder)
    if stage.stage != "finetune_lm":
        raise ValueError(f"{folder} is a {stage.stage} stage; --stage2 takes a finetune_lm stage folder.")
    perplexity = stage.metrics.get("eval_perplexity")
    return folder, {"kind": "ulmfit finetune-lm", "folder": str(folder), "parent": stage.parent,
                    "recipe": stage.recipe, "valid_perplexity": perplexity, "valid_perplexity_own": perplexity,
                    "eval_split": stage.eval_split, "seconds": None, "training": stage.hyperparameters,
                    "data": stage.data}


def summary_line(record: dict) -> str:
    parts = [record["experiment"], record["name"], f"seed {record['seed']}",
             f"test accuracy {record['test_accuracy']:.4f} (error {100 * record['test_error']:.2f}%, "
             f"n={record['n_test']})"]
    if "stage2" in record:
        stage2 = record["stage2"]
        seconds = "" if stage2["seconds"] is None else f", {stage2['seconds']:.0f} s"
        parts.append(f"stage 2 (shared) ppl {stage2['valid_perplexity']:.1f}{seconds}")
    if "stage3" in record:
        stage3 = record["stage3"]
        parts.append(f"stage 3 {stage3['seconds']:.0f} s, {stage3['tokens_per_second']:.0f} tokens/s")
    elif "baseline" in record:
        parts.append(f"{record['baseline']['seconds']:.0f} s, C={record['baseline']['best_C']:.3g}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------------
def command_compare(args: argparse.Namespace) -> int:
    from . import fastai_side, ours

    experiment = Experiment(args, args.task)
    name = f"compare_{args.task}"
    pending = {impl: [s for s in args.seeds if not result_path(args.results_dir, name, impl, s).is_file()]
               for impl in IMPLS}
    if not any(pending.values()):
        print(f"{name}: every run is done already ({args.results_dir / name}).")
        return 0
    tqdm.write(f"{name}: {experiment.data.stats()}. Stage 2 runs once per implementation (seed 0); its LM is shared "
               f"by the classifier runs of seeds {args.seeds}.")
    stage2 = {impl: experiment.stage2(impl) for impl in IMPLS if pending[impl] or impl == "ours"}
    settings, data = experiment.settings, experiment.data
    plan = [(seed, impl) for seed in args.seeds for impl in IMPLS if seed in pending[impl]]
    for seed, impl in tqdm(plan, desc=name, unit="run"):
        folder, stage2_record = stage2[impl]

        def train(seed=seed, impl=impl, folder=folder, stage2_record=stage2_record):
            if impl == "ours":
                stage3 = ours.train_classifier(folder, experiment.train, experiment.test, data.label_names, settings,
                                               seed, folder.parent / f"classifier_seed{seed}")
            else:
                stage3 = fastai_side.train_classifier(folder, args.stage1, experiment.train, experiment.test,
                                                      data.label_names, settings, seed, args.fastai_classifier_ar_tar)
            return {"test_accuracy": stage3["test_accuracy"], "stage2": _shared(stage2_record), "stage3": stage3}

        experiment.run(name, impl, seed, train, impl=impl)
    return 0


def command_lowshot(args: argparse.Namespace) -> int:
    from ulmfit.baselines import tfidf_logreg

    from .ours import train_classifier

    experiment = Experiment(args, "imdb")
    settings, data = experiment.settings, experiment.data
    counts = args.label_counts or list(LOWSHOT_LABELS[args.quick])
    min_steps = LOWSHOT_MIN_STEPS[args.quick] if args.min_steps is None else args.min_steps
    tqdm.write(f"lowshot: IMDb with {counts} labels, {len(experiment.test[0])} test reviews, seeds {args.seeds}; "
               "each seed draws its own balanced labels. ULMFiT starts from the IMDb stage-2 LM of `compare`.")
    given_stage2 = ulmfit_stage2(args.stage2) if args.stage2 else None
    if given_stage2 and "no_stage1_scratch_schedule" in args.methods:
        raise ValueError("no_stage1_scratch_schedule trains its own stage 2 from random weights: leave it out of "
                         "--methods with --stage2.")
    plan = [(n, seed, method) for n in counts for seed in args.seeds for method in args.methods]
    for n, seed, method in tqdm(plan, desc="lowshot", unit="run"):
        how = LOWSHOT_RECIPES.get(method)
        run_settings = settings if how is None else lowshot_settings(settings, n, how.scratch_lr, min_steps,
                                                                     args.scratch_lr)

        def train(n=n, seed=seed, method=method, how=how, run_settings=run_settings):
            labelled = imdb_lowshot_train(args.data_dir, n, seed)
            if how is None:
                baseline = tfidf_logreg(labelled, experiment.test, seed)
                return {"test_accuracy": baseline["test_accuracy"], "baseline": baseline}
            folder, stage2_record = given_stage2 or experiment.stage2(how.stage2)
            work = (experiment.task_dir if given_stage2 else folder.parent) / f"lowshot_{method}_n{n}_seed{seed}"
            stage3 = train_classifier(folder, labelled, experiment.test, data.label_names, run_settings, seed, work,
                                      random_init=how.random_init, recipe=how.recipe)
            record = {"test_accuracy": stage3["test_accuracy"], "stage3": stage3}
            if not how.random_init:
                record["stage2"] = _shared(stage2_record)
            return record

        experiment.run("lowshot", f"{method}_n{n}", seed, train, settings=run_settings, method=method, labels=n,
                       description=LOWSHOT_METHODS[method])
    return 0


def command_ablations(args: argparse.Namespace) -> int:
    from modeling_awd_lstm import AwdLstmConfig
    from ulmfit.baselines import tfidf_logreg

    from .ours import pretrain_backward, train_classifier

    variants = list(args.variants)
    experiment = Experiment(args, args.task)
    settings, data = experiment.settings, experiment.data
    name = f"ablations_{args.task}"
    backward_stage1 = args.stage1_backward or args.work_dir / "general_lm_backward" / "pretrain"
    if {"backward", "ensemble"} & set(variants) and not (backward_stage1 / "config.json").is_file():
        if args.pretrain_backward:
            tqdm.write(f"{name}: pretraining the backward stage 1 into {backward_stage1.parent}")
            backward_stage1 = pretrain_backward(args.stage1_recipe, args.stage1,
                                                args.general_corpus or args.work_dir / "general",
                                                backward_stage1.parent, quick=args.quick)
        else:
            tqdm.write(f"{name}: no backward stage 1 at {backward_stage1}: the backward and ensemble rows are skipped "
                       "(pass --pretrain-backward to pretrain it, as long as the forward stage 1 took, or "
                       "--stage1-backward to point at one)")
            variants = [v for v in variants if v not in ("backward", "ensemble")]
    if "ensemble" in variants:  # its parts too, before it
        variants += ["full", "backward"]
    variants = [v for v in ABLATIONS if v in variants]
    tqdm.write(f"{name}: variants {variants}, seeds {args.seeds}; each stage 2 runs once (seed 0) and is shared.")

    def parent_of(variant: str) -> tuple[Path, dict | None]:
        if variant == "no_lm_finetuning":
            return args.stage1, None
        if variant == "backward":
            if not AwdLstmConfig.from_pretrained(backward_stage1).backwards:
                raise ValueError(f"{backward_stage1} reads text forwards: pass a backward stage 1 (model.backwards).")
            return experiment.stage2("ours_backward", backward_stage1)
        return experiment.stage2(ABLATION_STAGE2.get(variant, "ours"))

    plan = [(seed, variant) for seed in args.seeds for variant in variants]
    for seed, variant in tqdm(plan, desc=name, unit="run"):
        description, recipe = ABLATIONS[variant]
        if variant == "ensemble":
            def train(seed=seed):
                return _ensemble(args.results_dir, name, seed)
        elif variant == "tfidf":
            def train(seed=seed):
                baseline = tfidf_logreg(experiment.train, experiment.test, seed)
                return {"test_accuracy": baseline["test_accuracy"], "baseline": baseline}
        elif variant == "full" and _compare_result(args, experiment, seed) is not None:
            def train(seed=seed):
                reused = _compare_result(args, experiment, seed)
                return {**{k: reused[k] for k in ("test_accuracy", "stage2", "stage3")}, "reused_from": reused["path"]}
        else:
            def train(seed=seed, variant=variant, recipe=recipe):
                folder, stage2_record = parent_of(variant)
                stage3 = train_classifier(folder, experiment.train, experiment.test, data.label_names, settings, seed,
                                          experiment.task_dir / "ablations" / f"{variant}_seed{seed}", recipe=recipe)
                record = {"test_accuracy": stage3["test_accuracy"], "stage3": stage3}
                if stage2_record is not None:
                    record["stage2"] = _shared(stage2_record)
                return record

        experiment.run(name, variant, seed, train, variant=variant, description=description)
    return 0


def _compare_result(args: argparse.Namespace, experiment: Experiment, seed: int) -> dict | None:
    """Our `compare` run of this seed, when it was run with these settings: the `full` ablation is that very run."""
    path = result_path(args.results_dir, f"compare_{experiment.settings.task}", "ours", seed)
    if not path.is_file():
        return None
    record = read_json(path)
    if record.get("settings") != experiment.settings.to_dict():
        return None
    return {**record, "path": str(path)}


def _ensemble(results_dir: Path, experiment: str, seed: int) -> dict:
    parts = {name: read_json(result_path(results_dir, experiment, name, seed)) for name in ("full", "backward")}
    labels = parts["full"]["stage3"]["test_labels"]
    if parts["backward"]["stage3"]["test_labels"] != labels:
        raise AssertionError("The forward and backward classifiers were tested on different documents.")
    probabilities = np.mean([np.asarray(p["stage3"]["test_probabilities"]) for p in parts.values()], axis=0)
    accuracy = float((probabilities.argmax(1) == np.asarray(labels)).mean())
    return {"test_accuracy": accuracy, "parts": {name: p["test_accuracy"] for name, p in parts.items()}}


def timing_path(results_dir: Path, task: str) -> Path:
    return results_dir / f"stage2_timing_{task}.json"


def command_stage2_timing(args: argparse.Namespace) -> int:
    """Each side's stage 2 `--rounds` times, alternating in ABBA order in this one process (so machine drift cancels),
    each into a temporary folder. `compare` runs one stage 2 per side, shared by every seed, at different times: this
    is the wall-clock comparison. Writes `RESULTS_DIR/stage2_timing_<task>.json`."""
    import tempfile

    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    experiment = Experiment(args, args.task)
    order = [impl for k in range(args.rounds) for impl in (IMPLS if k % 2 == 0 else IMPLS[::-1])]
    timed = ("seconds", "train_seconds", "tokens_per_second", "valid_perplexity")
    runs = []
    for impl in tqdm(order, desc=f"stage2_timing_{args.task}", unit="run"):
        with tempfile.TemporaryDirectory() as folder:
            record = experiment.train_stage2(impl, args.stage1, Path(folder))
        runs.append({"impl": impl, **{key: record[key] for key in timed}})
        tqdm.write(f"stage2_timing_{args.task} | {impl} | {record['seconds']:.1f} s ({record['train_seconds']:.1f} s "
                   f"training) | perplexity {record['valid_perplexity']:.2f}")
    median = {key: {impl: float(np.median([r[key] for r in runs if r["impl"] == impl])) for impl in IMPLS}
              for key in ("seconds", "train_seconds")}
    summary = {
        "task": args.task, "rounds": args.rounds, "runs": runs, "median": median,
        "speedup": median["seconds"]["fastai"] / median["seconds"]["ours"],
        "train_speedup": median["train_seconds"]["fastai"] / median["train_seconds"]["ours"],
        "settings": experiment.settings.to_dict(), "command": args.command_line, "hardware": _hardware(),
        "finished": now(),
    }
    write_json(timing_path(args.results_dir, args.task), summary)
    print(f"stage2_timing_{args.task}: median {median['seconds']['ours']:.1f} s ours, "
          f"{median['seconds']['fastai']:.1f} s fastai: ours {summary['speedup']:.2f}x as fast "
          f"({summary['train_speedup']:.2f}x in training alone)")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(args.results_dir, args.output, args.plots_dir or args.results_dir)
    print(f"wrote {path}")
    return 0


COMMANDS = {"compare": command_compare, "lowshot": command_lowshot, "ablations": command_ablations,
            "stage2_timing": command_stage2_timing, "report": command_report}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["python", "-m", "experiments.run", *argv])
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as error:
        print(f"experiments.run {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
