"""Whole ULMFiT stages as users run them, side by side with fastai 2.8.

    python -m benchmarks.stages                          # results in benchmarks/results/stages.{md,json}
    python -m benchmarks.stages --quick --out /tmp/s     # tiny sizes, a smoke test (its numbers mean nothing)

Stage 2 (LM fine-tuning) runs through `ulmfit.stages.run_stage`, what `ulmfit finetune-lm` runs, on a recipe, against
fastai's `fine_tune`; stage 3 (the classifier with ULMFiT's discriminative rates, STLR and gradual unfreezing) runs
through `run_stage` as `ulmfit train-classifier` does, against fastai's `fit` with the same schedule
(`experiments.fastai_side`, a fastai user's ULMFiT). Both sides start from the same stage 1, the English model shipped
with the package (fastai loads it as its pretrained pair), keep its vocabulary and read the same real IMDb reviews as
the same token ids (checked), at the same model size, batch, epochs and schedule. Each stage of each run is a fresh
process that imports one side only; the sides alternate in ABBA order over `--rounds`. The report gives medians and
spreads of each stage's wall time, training tokens/s and peak memory, with the perplexity (one fp32 evaluator for
both) and test accuracy each side reached.

The `ulmfit` stages keep what a user's run has: a checkpoint and an evaluation each epoch, gradient clipping at 1.0
(fastai clips nothing), a model card and a training-curve plot; fastai's side saves its encoder.
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.data import IMDB_LABELS, balanced_sample
from ulmfit.data import DataSpec, load_data

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED = REPO_ROOT / "training" / "demo_data"
SHIPPED_MODEL = "pretrained:en"
STAGES = ("finetune_lm", "classifier")
QUALITY = {"finetune_lm": "valid_perplexity", "classifier": "test_accuracy"}  # what each stage reached
LABEL_NAMES = list(IMDB_LABELS)


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """What both sides train: data sizes and the recipe, shared through `experiments.settings.TaskSettings`."""

    lm_docs: int = 1000  # unlabelled reviews stage 2 trains on
    lm_valid_docs: int = 100  # more unlabelled reviews: the held-out perplexity
    clas_docs: int = 500  # labelled training reviews (balanced)
    test_docs: int = 500  # labelled test reviews (balanced)
    lm_epochs: int = 1  # fine_tune(lm_epochs): one frozen epoch, then lm_epochs with every layer
    lm_lr: float = 1e-2
    lm_batch_size: int = 32
    lm_drop_mult: float = 0.3
    clas_epochs: int = 5  # gradual unfreezing: one more layer group each epoch
    clas_lr: float = 1e-2
    clas_batch_size: int = 32
    clas_drop_mult: float = 0.5
    max_tokens: int | None = None  # classifiers read whole reviews


QUICK = StageSettings(lm_docs=40, lm_valid_docs=10, clas_docs=32, test_docs=16, clas_epochs=5, clas_batch_size=8,
                      lm_batch_size=8)


def default_sides() -> list[str]:
    from modeling_awd_lstm import cpu_has_bf16_kernels

    # fastai as its CPU users get it (fp32: its `to_bf16()` autocasts on CUDA only) and with a bf16 autocast callback.
    return ["ours-bf16", "fastai-fp32", "fastai-bf16"] if cpu_has_bf16_kernels() else ["ours-fp32", "fastai-fp32"]


# ----------------------------------------------------------------------------------------------------------------------
# Data: the same reviews for both sides, written once
# ----------------------------------------------------------------------------------------------------------------------
def _read(path: Path) -> tuple[list[str], list[int]]:
    rows = load_data(DataSpec(path=str(path)))
    return list(rows["text"]), list(rows["label"])


def _balanced(path: Path, count: int) -> list[dict]:
    """`count` reviews of `path`, balanced and shuffled (seeded), labelled with class names."""
    texts, labels = _read(path)
    return [{"text": texts[i], "label": IMDB_LABELS[labels[i]]}
            for i in balanced_sample(labels, count, np.random.default_rng(0))]


def prepare_data(data_dir: Path | None, settings: StageSettings, folder: Path) -> dict[str, Path]:
    """IMDb reviews as JSON Lines in `folder`: stage 2's training and held-out text (unlabelled reviews), the
    classifier's training and test reviews. `data_dir` holds IMDb's `unsup/train/test.jsonl.gz`; by default the
    subsets bundled with the package."""
    names = {"unsup": "unsup.jsonl.gz", "train": "train.jsonl.gz", "test": "test.jsonl.gz"}
    if data_dir is None:
        data_dir, names = BUNDLED, {key: f"imdb_{name}" for key, name in names.items()}
    unsup, _ = _read(data_dir / names["unsup"])
    if len(unsup) < settings.lm_docs + settings.lm_valid_docs:
        raise ValueError(f"{data_dir}: {len(unsup)} unlabelled reviews, fewer than --lm-docs + --lm-valid-docs")
    order = np.random.default_rng(0).permutation(len(unsup))
    parts = {
        "lm_train": [{"text": unsup[i]} for i in order[: settings.lm_docs]],
        "lm_valid": [{"text": unsup[i]} for i in order[settings.lm_docs: settings.lm_docs + settings.lm_valid_docs]],
        "clas_train": _balanced(data_dir / names["train"], settings.clas_docs),
        "clas_test": _balanced(data_dir / names["test"], settings.test_docs),
    }
    paths = {}
    for name, rows in parts.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


def _texts_and_labels(path: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [row["text"] for row in rows], [row.get("label") for row in rows]


# ----------------------------------------------------------------------------------------------------------------------
# Our side: a recipe through `run_stage`
# ----------------------------------------------------------------------------------------------------------------------
def write_recipe(paths: dict[str, Path], settings: StageSettings, precision: str, folder: Path) -> Path:
    """The recipe both of our stages run: the shipped model's sizes and vocabulary, fastai's `fine_tune` for stage 2,
    the paper's stage 3. Otherwise what `ulmfit` does by default (checkpoints and evaluation each epoch, clipping)."""
    import yaml
    from transformers import AutoConfig

    from ulmfit.pretrained import model_location

    config = AutoConfig.from_pretrained(model_location(SHIPPED_MODEL), trust_remote_code=True)
    bf16 = precision == "bf16"
    recipe = {
        "name": "stages-benchmark",
        "seed": 0,
        "model": {"emb_size": config.emb_size, "hidden_size": config.hidden_size, "num_layers": config.num_layers,
                  "bptt": config.bptt, "max_len": config.max_len, "drop_mult": settings.lm_drop_mult},
        "stages": {
            "finetune_lm": {
                "parent": SHIPPED_MODEL,
                "data": {"path": str(paths["lm_train"]), "format": "json", "label_column": None},
                "eval_data": {"path": str(paths["lm_valid"]), "format": "json", "label_column": None},
                "training": {"num_train_epochs": settings.lm_epochs + 1, "learning_rate": settings.lm_lr,
                             "per_device_train_batch_size": settings.lm_batch_size, "ulmfit_schedule": "fine_tune",
                             "fine_tune_freeze_epochs": 1, "bf16": bf16},
            },
            "classifier": {
                "parent": "finetune_lm",
                "data": {"path": str(paths["clas_train"]), "format": "json", "label_column": "label",
                         "label_names": LABEL_NAMES},
                "test_data": {"path": str(paths["clas_test"]), "format": "json", "label_column": "label",
                              "label_names": LABEL_NAMES},
                "eval_fraction": 0.0,  # fastai's side trains on every labelled review too
                "max_tokens": settings.max_tokens,
                "drop_mult": settings.clas_drop_mult,
                "training": {"num_train_epochs": settings.clas_epochs, "learning_rate": settings.clas_lr,
                             "per_device_train_batch_size": settings.clas_batch_size, "ulmfit_schedule": "stlr",
                             "unfreeze_schedule": "gradual", "discriminative_lr_factor": 2.6, "bf16": bf16},
            },
        },
    }
    path = folder / f"recipe-{precision}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_ours(job: dict) -> dict:
    from experiments.ours import evaluate_lm, lm_corpus
    from modeling_awd_lstm import AwdLstmForCausalLM, AwdLstmTokenizer
    from ulmfit.recipes import load_recipe
    from ulmfit.stages import check_training_arguments, run_stage

    recipe = load_recipe(job["recipe"])
    check_training_arguments(recipe)
    result = run_stage(recipe, job["stage"], job["output_dir"])
    record = {"seconds": result.seconds, "tokens_per_second": result.tokens_per_second, "metrics": result.metrics}
    if job["stage"] == "finetune_lm":  # the fp32 evaluator both sides are scored with, outside the stage's time
        tokenizer = AwdLstmTokenizer.from_pretrained(result.folder)
        valid = lm_corpus(_texts_and_labels(Path(job["paths"]["lm_valid"]))[0], tokenizer)
        model = AwdLstmForCausalLM.from_pretrained(result.folder)
        with tempfile.TemporaryDirectory() as scratch:
            record["valid_perplexity"] = evaluate_lm(model, valid, job["settings"]["lm_batch_size"],
                                                     model.config.bptt, Path(scratch))
    else:
        record["test_accuracy"] = result.metrics["test_accuracy"]
    return record


# ----------------------------------------------------------------------------------------------------------------------
# fastai's side: `experiments.fastai_side`, a fastai user's ULMFiT
# ----------------------------------------------------------------------------------------------------------------------
def run_fastai(job: dict) -> dict:
    from experiments import fastai_side
    from experiments.settings import TaskSettings
    from ulmfit.pretrained import model_location

    settings = StageSettings(**job["settings"])
    task = TaskSettings(
        "imdb", max_tokens=settings.max_tokens, lm_epochs=settings.lm_epochs, lm_lr=settings.lm_lr,
        lm_batch_size=settings.lm_batch_size, lm_drop_mult=settings.lm_drop_mult, clas_epochs=settings.clas_epochs,
        clas_lr=settings.clas_lr, clas_batch_size=settings.clas_batch_size, clas_drop_mult=settings.clas_drop_mult,
        precision=job["precision"],
    )
    parent, folder, paths = Path(model_location(SHIPPED_MODEL)), Path(job["output_dir"]), job["paths"]
    if job["stage"] == "finetune_lm":
        train_texts, valid_texts = (_texts_and_labels(Path(paths[name]))[0] for name in ("lm_train", "lm_valid"))
        record = fastai_side.finetune_lm(train_texts + valid_texts, [False] * len(train_texts) + [True] * len(
            valid_texts), task, parent, folder / "finetune_lm", keep_vocab=True)
        return {"seconds": record["stage_seconds"], "tokens_per_second": record["tokens_per_second"],
                "valid_perplexity": record["valid_perplexity"]}
    record = fastai_side.train_classifier(
        folder / "finetune_lm", parent, _texts_and_labels(Path(paths["clas_train"])),
        _texts_and_labels(Path(paths["clas_test"])), LABEL_NAMES, task, seed=0,
    )
    return {"seconds": record["seconds"], "tokens_per_second": record["tokens_per_second"],
            "test_accuracy": record["test_accuracy"]}


# ----------------------------------------------------------------------------------------------------------------------
# One stage of one side in a fresh process
# ----------------------------------------------------------------------------------------------------------------------
def worker(job_file: str) -> int:
    """Runs the job described in `job_file` (JSON) and writes its record next to it."""
    from benchmarks.measure import peak_rss_mb

    job = json.loads(Path(job_file).read_text())
    if job["threads"]:
        import torch

        torch.set_num_threads(job["threads"])
    record = (run_ours if job["side"].startswith("ours") else run_fastai)(job)
    record["peak_rss_mb"] = peak_rss_mb()
    Path(job["result"]).write_text(json.dumps(record))
    return 0


def run_job(job: dict, folder: Path) -> dict:
    job_file = folder / f"job-{job['side']}-{job['stage']}-{job['round']}.json"
    job["result"] = str(job_file.with_suffix(".result.json"))
    job_file.write_text(json.dumps(job))
    started = time.perf_counter()
    # OpenMP threads that sleep while they wait, as the other benchmarks run them (see `Settings.omp_wait_policy`).
    environment = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    subprocess.run([sys.executable, "-m", "benchmarks.stages", "--worker", str(job_file)], check=True,
                   cwd=REPO_ROOT, env=environment)
    record = json.loads(Path(job["result"]).read_text())
    record["process_seconds"] = time.perf_counter() - started
    return record


# ----------------------------------------------------------------------------------------------------------------------
# The run and its report
# ----------------------------------------------------------------------------------------------------------------------
def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict], sides: list[str]) -> dict:
    summary = {}
    for stage in STAGES:
        for side in sides:
            mine = [run for run in runs if run["side"] == side and run["stage"] == stage]
            if not mine:
                continue
            summary[f"{stage}/{side}"] = {key: _spread([run[key] for run in mine]) for key in (
                "seconds", "process_seconds", "tokens_per_second", "peak_rss_mb", QUALITY[stage])}
    return summary


def report(results: dict) -> str:
    machine, versions = results["machine"], results["versions"]
    lines = [
        "# Whole ULMFiT stages: `ulmfit` against fastai 2.8", "",
        f"{results['finished']}. Machine: {machine['cpu']}, {machine['cores']} cores "
        f"({', '.join(machine['bf16_hardware']) or 'no bf16 instructions'}), GPU: {machine['gpu'] or 'none'}. "
        f"Versions: {', '.join(f'{name} {version}' for name, version in versions.items() if version)}. "
        f"Command: `{results['command']}`.", "",
        f"Data: {results['data']}. Stage 1: the shipped English model ({SHIPPED_MODEL}), its vocabulary kept. "
        f"Settings: `{json.dumps(results['settings'])}`. {results['rounds']} round(s), sides in ABBA order, each "
        "stage of each run a fresh process. Medians (min-max).", "",
    ]
    summary, sides = results["summary"], results["sides"]
    reference = {stage: summary.get(f"{stage}/fastai-fp32") for stage in STAGES}
    lines += ["| stage | side | stage time (s) | process time (s) | training tokens/s | peak MB | quality | "
              "time vs fastai fp32 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for stage in STAGES:
        quality = QUALITY[stage]
        for side in sides:
            row = summary.get(f"{stage}/{side}")
            if row is None:
                continue

            def cell(key: str, digits: int = 1, row=row) -> str:
                value = row[key]
                return f"{value['median']:,.{digits}f} ({value['min']:,.{digits}f}-{value['max']:,.{digits}f})"

            ratio = (f"{reference[stage]['seconds']['median'] / row['seconds']['median']:.2f}x"
                     if reference[stage] else "-")
            lines.append(f"| {stage} | {side} | {cell('seconds')} | {cell('process_seconds')} | "
                         f"{cell('tokens_per_second', 0)} | {cell('peak_rss_mb', 0)} | {quality} "
                         f"{cell(quality, 3 if quality == 'test_accuracy' else 2)} | {ratio} |")
    lines += ["", "Stage time: inside the stage (ours: `run_stage`, from reading the data to the saved stage folder, "
              "card and plot; fastai: from its pretrained pair to the saved encoder, or to the test predictions). "
              "Process time: the whole command, Python's start and imports included. Time vs fastai fp32: fastai "
              "fp32's median stage time over this side's (above 1: faster). Perplexity: one fp32 evaluator (ours) on "
              "both sides' LMs over the held-out reviews; accuracy: on the test reviews."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="IMDb's unsup/train/test.jsonl.gz (default: the subsets bundled with the package)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--rounds", type=int, default=None, help="ABBA rounds (default 5; --quick 1)")
    parser.add_argument("--sides", default=None, help="comma-separated, of ours-bf16, ours-fp32, fastai-fp32, "
                        "fastai-bf16 (default: ours-bf16, fastai-fp32, fastai-bf16 on a CPU with bf16 kernels)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    from benchmarks.report import machine_info, versions
    from experiments.results import now

    settings = QUICK if args.quick else StageSettings()
    rounds = args.rounds or (1 if args.quick else 5)
    sides = args.sides.split(",") if args.sides else default_sides()
    unknown = sorted(set(sides) - {"ours-bf16", "ours-fp32", "fastai-fp32", "fastai-bf16"})
    if unknown or rounds < 1:
        parser.error(f"unknown side {unknown[0]!r}" if unknown else "--rounds must be at least 1")
    order = [side for k in range(rounds) for side in (sides if k % 2 == 0 else sides[::-1])]
    runs = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        paths = prepare_data(args.data_dir, settings, work)
        recipes = {precision: write_recipe(paths, settings, precision, work) for precision in ("fp32", "bf16")}
        for index, side in enumerate(order):
            precision = side.split("-")[1]
            output_dir = work / f"run{index}-{side}"
            for stage in STAGES:
                job = {"side": side, "stage": stage, "round": index, "precision": precision, "threads": args.threads,
                       "recipe": str(recipes[precision]), "output_dir": str(output_dir),
                       "paths": {name: str(path) for name, path in paths.items()},
                       "settings": dataclasses.asdict(settings)}
                record = {**run_job(job, work), "side": side, "stage": stage, "round": index}
                runs.append(record)
                print(f"{stage} | {side} | {record['seconds']:.1f} s | {record['tokens_per_second']:,.0f} tokens/s | "
                      f"peak {record['peak_rss_mb']:,.0f} MB", flush=True)
    results = {
        "finished": now(), "machine": machine_info(), "versions": versions(),
        "command": " ".join(["python -m benchmarks.stages", *(sys.argv[1:] if argv is None else argv)]),
        "data": f"IMDb reviews from {args.data_dir or 'the bundled subsets'}", "settings": dataclasses.asdict(settings),
        "rounds": rounds, "sides": sides, "runs": runs, "summary": summarize(runs, sides),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "stages_quick" if args.quick else "stages"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"{stem}.md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
