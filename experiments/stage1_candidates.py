"""Stage-1 candidates for the shipped English model, each trained for the same CPU time through `ulmfit pretrain`.

    python -m experiments.stage1_candidates --data-dir /work/shared/data --minutes 8 \
        --results-dir experiments/results-avx512

Every candidate is the `wikipedia_en` recipe with another model size, vocabulary or batch. A short probe run measures
its training speed (without evaluation); the real run then gets as many steps as fit in `--minutes` of training at
that speed, along a full one-cycle schedule, so each candidate ends its schedule instead of being cut off mid-rate.
All read one Wikipedia file (4.2M words: more than any candidate reads in the time) and are measured on WikiText-2's
validation articles.
Perplexity per token depends on the vocabulary, so the table also gives it per WikiText word: exp(loss per predicted
token x predicted tokens / words). Each candidate is written to `stage1_candidates/<name>.json` when it ends and is
skipped when that file exists, so an interrupted command is run again to finish.
"""

import argparse
import json
import math
import time
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks.report import machine_info, versions
from ulmfit.recipes import load_recipe
from ulmfit.stages import run_stage

RECIPE = "wikipedia_en"
TRAIN_FILE = "general_en/wikipedia-2018-03.jsonl.gz"
EVAL_FILE = "wikitext2/wiki.valid.tokens"
PROBE_STEPS = 25
CANDIDATES = {
    "words30k-128/512-b64": [],
    "words30k-192/768-b64": ["model.emb_size=192", "model.hidden_size=768"],
    "words30k-256/1024-b64": ["model.emb_size=256", "model.hidden_size=1024"],
    "subword15k-128/512-b64": ["tokenizer.kind=subword", "tokenizer.vocab_size=15000"],
    "words30k-128/512-b128": ["stages.pretrain.training.per_device_train_batch_size=128"],
    # fastai's from-scratch language-model recipe: every layer at one rate, 1e-2.
    "words30k-128/512-b64-one-rate-1e-2": [
        "stages.pretrain.training.learning_rate=0.01", "stages.pretrain.training.discriminative_lr_factor=1.0"
    ],
}


def run_candidate(name: str, overrides: list[str], data_dir: Path, minutes: float, work: Path) -> dict:
    overrides = [
        f"stages.pretrain.data.path={data_dir / TRAIN_FILE}",
        f"stages.pretrain.eval_data.path={data_dir / EVAL_FILE}",
        *overrides,
    ]
    recipe = load_recipe(RECIPE, overrides=overrides)
    slug = name.replace("/", "-")
    probe_recipe = load_recipe(
        RECIPE, overrides=[*overrides, "stages.pretrain.eval_data=null", "stages.pretrain.eval_fraction=0"]
    )
    probe = run_stage(probe_recipe, "pretrain", work / f"{slug}-probe", overwrite=True, training_overrides={
        "max_steps": PROBE_STEPS, "eval_strategy": "no", "save_strategy": "no", "logging_steps": 5,
    })
    batch_tokens = recipe.stages["pretrain"].training["per_device_train_batch_size"] * recipe.model.bptt
    steps = max(int(minutes * 60 * probe.tokens_per_second / batch_tokens), PROBE_STEPS)
    started = time.time()
    result = run_stage(recipe, "pretrain", work / slug, overwrite=True, training_overrides={
        "max_steps": steps, "eval_strategy": "no", "save_strategy": "no",
    })
    loss = math.log(result.metrics["eval_perplexity"])
    tokens, unknown, words = _eval_counts(result.folder, data_dir / EVAL_FILE, recipe.stages["pretrain"].training)
    record = {
        "name": name, "overrides": overrides[2:],
        "steps": steps, "tokens_read": steps * batch_tokens, "tokens_per_second": round(result.tokens_per_second, 1),
        "probe_tokens_per_second": round(probe.tokens_per_second, 1), "stage_seconds": round(time.time() - started, 1),
        "eval_perplexity": round(result.metrics["eval_perplexity"], 2),
        "eval_word_perplexity": round(math.exp(loss * tokens / words), 2),
        "eval_tokens": tokens, "eval_words": words, "eval_unknown_rate": round(unknown / tokens, 5),
    }
    record["model"] = json.loads((Path(result.folder) / "ulmfit_stage.json").read_text())["model_summary"]
    return record


def _eval_counts(folder: str, eval_file: Path, training: dict) -> tuple[int, int, int]:
    """Predicted tokens, of them unknown, and WikiText words (whitespace tokens) of the evaluation text."""
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    lines = [line for line in eval_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [i for row in tokenizer(lines, return_attention_mask=False)["input_ids"] for i in row]
    rows = 2 * training["per_device_train_batch_size"]  # the evaluation batch: each row's first token is not predicted
    return len(ids) - rows, sum(i == tokenizer.unk_token_id for i in ids), sum(len(line.split()) for line in lines)


def report(records: list[dict], minutes: float) -> str:
    lines = [
        f"# Stage-1 candidates: {minutes:g} minutes of training each",
        "",
        f"Each the `{RECIPE}` recipe (one-cycle, peak 0.005, BPTT 70, bf16) with the changes named, trained on "
        f"`{TRAIN_FILE}` through `ulmfit pretrain` for as many steps as its probe's speed fits in {minutes:g} minutes, "
        f"measured on WikiText-2 validation (`{EVAL_FILE}`, {records[0]['eval_words']:,} words).",
        "",
        "| candidate | model | steps | tokens read | tokens/s | perplexity per token | per word | unknown tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['name']} | {r['model']} | {r['steps']:,} | {r['tokens_read'] / 1e6:.2f}M"
            f" | {r['tokens_per_second']:,.0f}"
            f" | {r['eval_perplexity']:.1f} | {r['eval_word_perplexity']:.1f} | {100 * r['eval_unknown_rate']:.2f}% |"
        )
    machine = records[0]["machine"]
    lines += ["", f"Machine: {machine['cpu']}, {machine['cores']} cores, bf16 hardware: "
              f"{', '.join(machine['bf16_hardware']) or 'none'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--results-dir", type=Path, default=Path("experiments/results-avx512"))
    parser.add_argument("--work-dir", type=Path, default=Path("experiments/work/stage1_candidates"))
    parser.add_argument("--only", default=None, help="Comma-separated candidate names to run.")
    args = parser.parse_args()
    out = args.results_dir / "stage1_candidates"
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(CANDIDATES)
    for name in names:
        path = out / f"{name.replace('/', '-')}.json"
        if path.exists():
            continue
        record = run_candidate(name, CANDIDATES[name], args.data_dir, args.minutes, args.work_dir)
        record.update(minutes=args.minutes, machine=machine_info(), versions=versions(),
                      command="python -m experiments.stage1_candidates " + " ".join(
                          f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None))
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record, indent=2))
    records = [json.loads((out / f"{name.replace('/', '-')}.json").read_text()) for name in CANDIDATES
               if (out / f"{name.replace('/', '-')}.json").exists()]
    text = report(records, args.minutes)
    (args.results_dir / "stage1_candidates.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
