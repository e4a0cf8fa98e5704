"""RESULTS.md and plots from every result file: the comparison with fastai, low-shot learning, ablations, each run,
the hardware and the exact commands."""

import os
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .results import load_results, now, read_json  # noqa: E402
from .run import ABLATIONS, REPO_ROOT, timing_path  # noqa: E402
from .settings import DIFFERENCES_FROM_ULMFIT, PAPER_ERRORS  # noqa: E402

TASK_NAMES = {"trec6": "TREC-6", "imdb": "IMDb"}
LOWSHOT_NAMES = {"ulmfit": "ULMFiT (ours)", "ulmfit_lm_one_rate": "ULMFiT, stage 2 at one rate",
                 "ulmfit_scratch_schedule": "stage 2 at one rate, scratch's classifier schedule",
                 "no_stage1_scratch_schedule": "no stage 1, stage 2, scratch's classifier schedule",
                 "ulmfit_no_unfreezing": "ULMFiT, no unfreezing",
                 "ulmfit_one_rate": "ULMFiT, one rate, no unfreezing",
                 "scratch": "from scratch", "tfidf": "TF-IDF + LR"}

# A low-shot run that puts at least this share of the test reviews in one class has collapsed.
ONE_CLASS_SHARE = 0.99
SAME_AND_DIFFERENT = """\
Both implementations start from the same stage-1 weights (exported to fastai with
`ulmfit.convert_fastai.save_fastai_pretrained`) and read the same documents with the same tokens: fastai
builds its stage-2 vocabulary with its own pipeline and the harness asserts that it equals ours, and that the first
documents get the same ids on both sides. Both run the same epochs, rates, batch sizes, dropouts (`drop_mult`), BPTT
and `max_len`, and the same precision.

- Stage 2: fastai's `learn.fine_tune(E, lr)` (one frozen epoch, then all layers), ours `ulmfit_schedule: fine_tune`,
  with fastai's `TextLearner` momentums (0.8, 0.7, 0.8) and Adam's moments cleared when the layers unfreeze, as
  fastai's `unfreeze()` does.
- Stage 3: discriminative rates (factor 2.6 between layer groups), STLR (cut_frac 0.1, ratio 32) over the whole run,
  gradual unfreezing (one more layer group per epoch), Adam with beta1 0.7 (not scheduled), beta2 0.99, eps 1e-5,
  decoupled weight decay 0.01; fastai through one `learn.fit` with a `ParamScheduler` and an unfreezing callback.
- Made equal on the fastai side: no weight decay on the LSTM biases (fastai's `wd_bn_bias=False` decays them), no
  AR/TAR on the classifier (fastai adds it to classifiers too; ours has none; `--fastai-classifier-ar-tar` keeps it),
  and Adam's state cleared at each unfreezing on both sides (fastai's `Learner.freeze_to`, our trainer's gradual
  unfreezing). Ours clips no gradient (fastai clips none) and drops the last partial training batch (as fastai does).
- Not equal: random streams (dropout masks, document shuffling, batch order) differ between the two; fastai's
  classifier counts padding towards `max_len` in padded batches (ours pools over each document alone), which only
  matters for documents longer than `max_len`; fastai's own validation loss weighs batches by rows, ours by tokens,
  so the stage-2 perplexity is also measured for both by one evaluator (ours, fp32).
"""



def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2, note: str = "") -> str:
    if not values:
        return "not run"
    values = [scale * v for v in values]
    count = f"(n={len(values)}{'; ' + note if note else ''})"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} {count}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f} {count}"


def predicts_one_class(record: dict) -> bool:
    """Whether a classifier run collapsed: at least `ONE_CLASS_SHARE` of its test documents in one class."""
    probabilities = record.get("stage3", {}).get("test_probabilities")
    if not probabilities:
        return False
    predicted = np.asarray(probabilities).argmax(1)
    return np.bincount(predicted).max() >= ONE_CLASS_SHARE * len(predicted)


def _mean(values: list[float], digits: int = 0) -> str:
    return f"{np.mean(values):.{digits}f}" if values else "–"


def _shown(path: Path) -> str:
    """`path` as the repository's commands name it: relative to the repository root when it lies below it."""
    path = Path(path).resolve()
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)


def _link(path: Path, output: Path) -> str:
    return os.path.relpath(path, output.parent)


# ----------------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------------
def _timing_line(timing: dict) -> str:
    seconds, train = timing["median"]["seconds"], timing["median"]["train_seconds"]
    return (f"Stage 2 timed side by side, {timing['rounds']} run(s) per side alternating in one process "
            f"(`{timing['command']}`): median {seconds['ours']:.1f} s ours against {seconds['fastai']:.1f} s fastai, "
            f"ours {timing['speedup']:.2f}x as fast ({train['ours']:.1f} against {train['fastai']:.1f} s of training, "
            f"{timing['train_speedup']:.2f}x). The table's stage-2 times are single runs, made at different times.")


def _compare_section(task: str, records: list[dict], output: Path, plots_dir: Path,
                     timing: dict | None = None) -> list[str]:
    by_impl = defaultdict(list)
    for record in records:
        by_impl[record["impl"]].append(record)
    lines = [f"### {TASK_NAMES[task]}", ""]
    first = records[0]
    data = first.get("data", {})
    lines += [
        f"{data.get('train_docs', '?')} training documents, {data.get('test_docs', '?')} test documents, "
        f"stage-2 text of {data.get('lm_docs', '?')} documents ({data.get('lm_valid_docs', '?')} held out for the "
        f"perplexity). Stage 2 runs once per implementation (seed 0) and its LM is shared by the classifiers of every "
        f"seed; stage 3 runs per seed.",
        "",
        "| implementation | test error % | stage-2 perplexity (one evaluator / own) | stage 2 (s) | stage 2 tokens/s "
        "| stage 3 per seed (s) | stage 3 tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for impl in ("fastai", "ours"):
        runs = by_impl.get(impl, [])
        if not runs:
            lines.append(f"| {impl} | not run | | | | | |")
            continue
        stage2 = runs[0]["stage2"]
        stage3 = [r["stage3"] for r in runs]
        lines.append(
            f"| {impl} | {_mean_std([r['test_error'] for r in runs])} | {stage2['valid_perplexity']:.1f} / "
            f"{stage2['valid_perplexity_own']:.1f} | {stage2['seconds']:.0f} | {stage2['tokens_per_second']:.0f} | "
            f"{_mean([s['seconds'] for s in stage3])} | {_mean([s['tokens_per_second'] for s in stage3])} |"
        )
    lines.append("")
    if timing is not None:
        lines += [_timing_line(timing), ""]
    lines += [f"Paper, full scale (WikiText-103 stage 1, every label): {PAPER_ERRORS[task]}% test error.", ""]
    plot = _plot_curves(task, by_impl, plots_dir)
    if plot is not None:
        lines += [f"![training curves, {TASK_NAMES[task]}]({_link(plot, output)})", ""]
    return lines


def _plot_curves(task: str, by_impl: dict, plots_dir: Path) -> Path | None:
    """Training loss of stage 2 and of stage 3 (the lowest seed), both implementations."""
    seed_runs = {impl: min(runs, key=lambda r: r["seed"]) for impl, runs in by_impl.items() if runs}
    if not any(r["stage2"].get("curve") or r["stage3"].get("curve") for r in seed_runs.values()):
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    panels = ((axes[0], "stage2", "stage 2: LM fine-tuning"), (axes[1], "stage3", "stage 3: classifier"))
    for axis, stage, title in panels:
        for impl, record in sorted(seed_runs.items()):
            curve = record[stage].get("curve") or []
            if curve:
                axis.plot(*zip(*curve), label=f"{impl}" + (f" (seed {record['seed']})" if stage == "stage3" else ""))
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss (with AR/TAR)" if stage == "stage2" else "training loss")
        axis.legend()
    figure.suptitle(f"{TASK_NAMES[task]}: fastai vs ours")
    figure.tight_layout()
    path = plots_dir / f"compare_{task}_curves.png"
    plots_dir.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _lowshot_section(records: list[dict], output: Path, plots_dir: Path) -> list[str]:
    table = defaultdict(lambda: defaultdict(list))
    for record in records:
        table[record["labels"]][record["method"]].append(record)
    methods = [m for m in LOWSHOT_NAMES if any(m in row for row in table.values())]
    lines = [
        "## Low-shot learning (IMDb)", "",
        f"{records[0]['n_test']} test reviews; each seed draws its own balanced labelled reviews. Test error %:", "",
        "| labels | " + " | ".join(LOWSHOT_NAMES[m] for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    collapsed = 0
    for labels in sorted(table):
        cells = []
        for method in methods:
            runs = table[labels][method]
            one_class = sum(predicts_one_class(r) for r in runs)
            collapsed += one_class
            cells.append(_mean_std([r["test_error"] for r in runs], note=f"{one_class} one class" if one_class else ""))
        lines.append(f"| {labels} | " + " | ".join(cells) + " |")
    if collapsed:
        lines += ["", f"*one class*: runs that put at least {ONE_CLASS_SHARE:.0%} of the test reviews in one class, "
                      "a classifier that collapsed to a constant prediction."]
    trained = {m: [r for row in table.values() for r in row[m] if "stage3" in r] for m in methods if m != "tfidf"}
    if any(trained.values()):
        epochs = sorted({(r["labels"], r["stage3"]["epochs"], r["stage3"]["steps"]) for runs in trained.values()
                         for r in runs})
        rates = "; ".join(
            f"{LOWSHOT_NAMES[m]} peak rate {_values(r['stage3']['training']['learning_rate'] for r in runs)}"
            for m, runs in trained.items() if runs
        )
        lines += ["", "Classifier epochs (steps) by labels: "
                  + ", ".join(f"{n}: {e} ({s})" for n, e, s in epochs) + f". {rates}."]
    figure, axis = plt.subplots(figsize=(9, 4))
    for method in methods:
        counts = [n for n in sorted(table) if table[n][method]]
        accuracies = [[r["test_accuracy"] for r in table[n][method]] for n in counts]
        axis.errorbar(counts, [np.mean(a) for a in accuracies],
                      yerr=[np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in accuracies],
                      marker="o", capsize=3, label=LOWSHOT_NAMES[method])
    axis.set_xscale("log")
    axis.set_xlabel("labelled training reviews")
    axis.set_ylabel("test accuracy")
    axis.set_title("IMDb, few labels")
    axis.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")  # beside the curves, not over them
    figure.tight_layout()
    plots_dir.mkdir(parents=True, exist_ok=True)
    path = plots_dir / "lowshot.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return lines + ["", f"![accuracy against the number of labels]({_link(path, output)})", ""]


def _values(values) -> str:
    return " / ".join(f"{v:g}" for v in sorted(set(values)))


def _ablations_section(task: str, records: list[dict]) -> list[str]:
    by_variant = defaultdict(list)
    for record in records:
        by_variant[record["variant"]].append(record)
    lines = [f"### {TASK_NAMES[task]}", "", "| variant | what changes | test error % | stage-2 perplexity "
             "| stage 3 per seed (s) |", "|---|---|---|---|---|"]
    for variant, (description, _) in ABLATIONS.items():
        runs = by_variant.get(variant, [])
        seconds = [r["stage3"]["seconds"] for r in runs if "stage3" in r]
        perplexity = {f"{r['stage2']['valid_perplexity']:.1f}" for r in runs if "stage2" in r}  # one shared stage 2
        lines.append(f"| {variant} | {description} | {_mean_std([r['test_error'] for r in runs])} | "
                     f"{' / '.join(sorted(perplexity)) or '–'} | {_mean(seconds)} |")
    return lines + [""]


def _runs_section(records: list[dict]) -> list[str]:
    lines = ["## Every run", "", "| experiment | run | seed | test accuracy | stage 2 (s, shared) | stage 3 (s) "
             "| stage 3 tokens/s | finished |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        stage2 = f"{r['stage2']['seconds']:.0f}" if r.get("stage2", {}).get("seconds") is not None else "–"
        stage3 = r.get("stage3") or r.get("baseline") or {}
        seconds = f"{stage3['seconds']:.0f}" if "seconds" in stage3 else "–"
        rate = f"{stage3['tokens_per_second']:.0f}" if "tokens_per_second" in stage3 else "–"
        lines.append(f"| {r['experiment']} | {r['name']} | {r['seed']} | {r['test_accuracy']:.4f} | {stage2} | "
                     f"{seconds} | {rate} | {r.get('finished', '')} |")
    return lines + [""]


def _hardware_section(records: list[dict]) -> list[str]:
    from benchmarks.report import machine_info, versions

    seen = {}
    for r in records:
        hw = r.get("hardware", {})
        v = hw.get("versions", {})
        key = (hw.get("cpu"), hw.get("cores"), hw.get("gpu"), v.get("torch"), v.get("transformers"), v.get("fastai"),
               hw.get("torch_threads"))
        seen.setdefault(key, []).append(r["experiment"])
    lines = ["## Hardware and software", "", "| CPU | cores | GPU | torch | transformers | fastai | torch threads "
             "| experiments |", "|---|---|---|---|---|---|---|---|"]
    for (cpu, cores, gpu, torch_v, transformers_v, fastai_v, threads), experiments in seen.items():
        lines.append(f"| {cpu} | {cores} | {gpu or '–'} | {torch_v} | {transformers_v} | {fastai_v} | {threads} | "
                     f"{', '.join(sorted(set(experiments)))} |")
    here, software = machine_info(), versions()
    lines += ["", f"Report written on {here['cpu']} ({here['cores']} cores, {here['memory_gib']} GiB, bf16 hardware: "
              f"{', '.join(here['bf16_hardware']) or 'none'}), torch {software['torch']}, {now()}.", ""]
    return lines


def _commands_section(records: list[dict]) -> list[str]:
    commands = defaultdict(set)
    for r in records:
        commands[r["experiment"]].add(r.get("command", "?"))
    lines = ["## Commands", "", "```bash"]
    for experiment in sorted(commands):
        lines += [f"# {experiment}", *sorted(commands[experiment])]
    return lines + ["```", ""]


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------
def write_report(results_dir: Path, output: Path, plots_dir: Path) -> Path:
    records = load_results(results_dir)
    if not records:
        raise FileNotFoundError(f"No result files under {results_dir}: run an experiment first.")
    by_experiment = defaultdict(list)
    for record in records:
        by_experiment[record["experiment"]].append(record)
    quick = any(r.get("settings", {}).get("quick") for r in records)
    lines = ["# ULMFiT: this package side by side with fastai 2.8", ""]
    if quick:
        lines += ["**These results come from `--quick` runs (tiny models and data): their numbers mean nothing.**", ""]
    lines += [f"Written by `python -m experiments.run report` from the result files of `{_shown(results_dir)}/`; the "
              "runs and how long they take are described in `experiments/README.md`.", ""]
    lines += ["Our side trains with `ULMFiTTrainer` as the `ulmfit` stages do, except: "
              + "; ".join(f"`{name}={value!r}`: {why}" for name, (value, why) in DIFFERENCES_FROM_ULMFIT.items())
              + ".", ""]

    compare = [t for t in TASK_NAMES if f"compare_{t}" in by_experiment]
    if compare:
        lines += ["## The same recipe in both implementations", "", SAME_AND_DIFFERENT]
        for task in compare:
            timing = timing_path(results_dir, task)
            lines += _compare_section(task, by_experiment[f"compare_{task}"], output, plots_dir,
                                      read_json(timing) if timing.is_file() else None)
    if "lowshot" in by_experiment:
        lines += _lowshot_section(by_experiment["lowshot"], output, plots_dir)
    ablations = [t for t in TASK_NAMES if f"ablations_{t}" in by_experiment]
    if ablations:
        lines += ["## Ablations (ours)", "",
                  "Each variant changes one thing in the recipe; its stage 2 runs once and is shared by its seeds "
                  "(a row with two perplexities took its seeds from two stage-2 runs). Rows not run (the backward "
                  "and ensemble rows need a backward stage 1) say so.", ""]
        for task in ablations:
            lines += _ablations_section(task, by_experiment[f"ablations_{task}"])
    # The reading of the figures is written by hand beside the results (`findings.md`), as the runs come in.
    findings = results_dir / "findings.md"
    lines += ["## What explains the differences", "", findings.read_text(encoding="utf-8").strip() if findings.is_file()
              else f"_Not written yet: see `{_shown(findings)}`._", ""]
    lines += _runs_section(records) + _hardware_section(records) + _commands_section(records)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines), encoding="utf-8")
    return output
