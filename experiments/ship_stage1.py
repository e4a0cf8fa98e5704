"""Ships the finished English stage 1 in the package as `pretrained:en`: bf16 weights, tokenizer, model code, record,
training curves and a card with its history and held-out WikiText-2 perplexity.

    python -m experiments.ship_stage1 runs/wikipedia_en/pretrain --earlier-run experiments/stage1_snapshot \
        --data-dir /work/shared/data --results-dir experiments/results-avx512

The stage was trained in runs: each later run started from the weights an earlier one left (`--earlier-run`, oldest
first, each a folder with that run's `trainer_state.json`) with a fresh optimizer and schedule. Their logs are joined
into one history for the curves and the card. WikiText-2's validation and test articles are measured with
`experiments.stage1_evaluate` and written to `stage1_wikitext2.json` in the results folder.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.report import machine_info
from experiments.stage1_evaluate import SPLITS, evaluate_wikitext2
from ulmfit.hub import CURVES_FILE, MODEL_CODE_FILES, StageRecord, write_model_card
from ulmfit.plots import plot_training_curves
from ulmfit.pretrained import shipped_models
from ulmfit.stages import CHECKPOINTS, is_finished

SHIPPED = Path(__file__).resolve().parent.parent / "training" / "pretrained"
NAME = "en"
MODEL_NAME = "ulmfit-en-wikipedia-lm"
WIKITEXT2 = "WikiText-2 (Merity et al. 2016), articles left out of the training text"


def joined_history(states: list[dict]) -> tuple[list[dict], list[dict]]:
    """One log for runs that continued each other (steps and tokens counted on), and a summary row per run."""
    history, runs, steps, tokens = [], [], 0, 0
    for state in states:
        for entry in state["log_history"]:
            shifted = {**entry, "step": entry["step"] + steps}
            if "num_input_tokens_seen" in entry:
                shifted["num_input_tokens_seen"] = entry["num_input_tokens_seen"] + tokens
            history.append(shifted)
        runtime = max((e.get("train_runtime", 0.0) for e in state["log_history"]), default=0.0)
        runs.append({"steps": state["global_step"], "planned_steps": state["max_steps"],
                     "tokens": state["num_input_tokens_seen"], "seconds": round(runtime)})
        steps, tokens = steps + state["global_step"], tokens + state["num_input_tokens_seen"]
    return history, runs


def card_notes(runs: list[dict], wikitext2: dict, reproduce: str) -> str:
    total_tokens = sum(run["tokens"] for run in runs)
    total_hours = sum(run["seconds"] for run in runs) / 3600
    rows = "\n".join(
        f"| {i} | {run['steps']:,} of a {run['planned_steps']:,}-step one-cycle | {run['tokens'] / 1e6:.1f}M | "
        f"{run['seconds'] / 60:.0f} min | {run['start']} |"
        for i, run in enumerate(runs, 1)
    )
    results = "\n".join(
        f"| {split} | {r['perplexity']:.1f} | {r['word_perplexity']:.1f} | {100 * r['unknown_rate']:.2f}% |"
        for split, r in wikitext2.items()
    )
    return f"""\
Read {total_tokens / 1e6:.1f}M tokens of English Wikipedia in {total_hours:.1f} hours of training on 2-core CPUs
with AVX-512 BF16 (bf16 autocast), with `ulmfit pretrain wikipedia_en` (`hub_configs/wikipedia_en.yaml`), in
{len(runs)} runs: each later run started from the weights the one before it left, with a fresh optimizer and
one-cycle schedule and another shuffling seed, so that it read the articles in another order.

| run | steps (batches of 64 x 70 tokens) | tokens read | training wall time | started from |
|---|---|---|---|---|
{rows}

Held-out perplexity on WikiText-2, whose validation and test articles the training text leaves out (per token of
this model's vocabulary; per WikiText word, which other vocabularies can be compared with; WikiText-2 as published,
`<unk>` markers included):

| WikiText-2 split | perplexity per token | per word | unknown tokens |
|---|---|---|---|
{results}

In this package it is `pretrained:{NAME}`: a recipe's `parent`, `ulmfit finetune-lm --parent pretrained:{NAME}`, or
`AutoModelForCausalLM.from_pretrained(shipped_model_folder("pretrained:{NAME}"))` with `shipped_model_folder` from
`ulmfit.pretrained`. The weights are stored in bf16; stages load them in fp32 to fine-tune.

To train it again (a similar model, not the same weights: the runs above were resumed across machines):

    {reproduce}
"""


def ship(
    stage: Path, earlier_runs: list[Path], data_dir: Path, results_dir: Path, target: Path = SHIPPED / NAME
) -> Path:
    if not is_finished(stage):
        raise SystemExit(f"{stage} holds no finished stage: finish it with `ulmfit pretrain wikipedia_en` first.")
    # The last run's log: its final checkpoint's trainer state.
    checkpoints = sorted(Path(stage, CHECKPOINTS).glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    states = [json.loads(Path(folder, "trainer_state.json").read_text()) for folder in [*earlier_runs, checkpoints[-1]]]
    history, runs = joined_history(states)
    runs[0]["start"] = "random weights"
    for run in runs[1:]:
        run["start"] = "the weights run before it left"

    if target.exists():
        shutil.rmtree(target)
    model = AutoModelForCausalLM.from_pretrained(stage, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(target)  # half the bytes; stages upcast to fp32 to fine-tune
    AutoTokenizer.from_pretrained(stage).save_pretrained(target)
    for name in MODEL_CODE_FILES:  # the code a `trust_remote_code` load of the folder runs
        if not (target / name).exists():
            shutil.copy(Path(stage, name), target / name)
    title = f"{MODEL_NAME}: {len(runs)} runs, {history[-1]['num_input_tokens_seen'] / 1e6:.1f}M tokens"
    plot_training_curves(history, target / CURVES_FILE, title=title)
    results_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(target / CURVES_FILE, results_dir / "stage1_training_curves.png")

    # Measured on the shipped bf16 weights, as users get them.
    wikitext2 = {split: evaluate_wikitext2(target, data_dir / file) for split, file in SPLITS.items()}
    (results_dir / "stage1_wikitext2.json").write_text(json.dumps(
        {**wikitext2, "runs": runs, "machine": machine_info(), "command": "python -m experiments.ship_stage1"},
        indent=2) + "\n")
    print(json.dumps(wikitext2, indent=2))

    record = StageRecord.load(stage)
    record.model_name = MODEL_NAME
    record.parent = None  # the runs before this one are the same stage, told in the notes
    record.license = "cc-by-sa-3.0"
    record.metrics = {
        "eval_perplexity": wikitext2["validation"]["perplexity"],
        "eval_word_perplexity": wikitext2["validation"]["word_perplexity"],
        "test_perplexity": wikitext2["test"]["perplexity"],
        "test_word_perplexity": wikitext2["test"]["word_perplexity"],
    }
    training = next(source for source in record.data if source["role"] == "training data")
    record.data = [
        training,
        {"role": "evaluation data", "description": f"{WIKITEXT2}: validation (`wiki.valid.tokens`)",
         "license": "CC BY-SA 3.0"},
        {"role": "test data", "description": f"{WIKITEXT2}: test (`wiki.test.tokens`)", "license": "CC BY-SA 3.0"},
    ]
    record.notes = card_notes(runs, wikitext2, reproduce="ulmfit pretrain wikipedia_en --training max_steps=11200")
    record.save(target)
    write_model_card(target, repo_id=MODEL_NAME)  # `ulmfit push` renders it again for the repository pushed to
    print(f"Wrote {target}; the package ships {', '.join(shipped_models())}.")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", type=Path, help="The finished stage folder of the last run.")
    parser.add_argument("--earlier-run", type=Path, action="append", default=[],
                        help="A folder with an earlier run's trainer_state.json, oldest first (repeatable).")
    parser.add_argument("--data-dir", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--results-dir", type=Path, default=Path("experiments/results-avx512"))
    args = parser.parse_args()
    ship(args.stage, args.earlier_run, args.data_dir, args.results_dir)


if __name__ == "__main__":
    main()
