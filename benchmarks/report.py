"""Medians, ratios ours/fastai, targets; written as JSON, a markdown table and a plot."""

import json
import math
import os
import platform
from collections import defaultdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from .data import Prepared
from .measure import median
from .settings import Settings

IMPLS = ("fastai", "ours")
# Targets: ours / fastai (fp32) at least this much (memory: at most).
TARGET_LM_SPEEDUP = 2.5
TARGET_LM_PPL_GAP = 0.02
TARGET_INFER_SPEEDUP = 4.0
TARGET_GEN_SPEEDUP = 20.0


# ----------------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    memory_gib = None
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
        memory_gib = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "bf16_hardware": sorted(f for f in flags if f in {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "memory_gib": memory_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(),
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for package in ("torch", "transformers", "fastai", "fastcore", "spacy", "numpy", "tokenizers"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------------
def _key(run: dict) -> tuple:
    return (run["task"], run.get("vocab"), run.get("batch_size"), run["precision"])


def _setting_label(key: tuple, settings: Settings) -> str:
    task, vocab, batch_size, precision = key
    if task == "lm_train":
        return (
            f"vocab {vocab // 1000 if vocab >= 1000 else vocab}{'k' if vocab >= 1000 else ''}, batch {batch_size},"
            f" BPTT {settings.bptt}, {precision}"
        )
    if task == "clas_train":
        return f"IMDb, batch {settings.clas_train_batch_size}, {precision}"
    if task == "clas_infer":
        return f"{settings.infer_docs} IMDb test reviews, {precision}"
    return f"{settings.prompt_tokens}-token prompt, {settings.new_tokens} new tokens, {precision}"


def _ratio(ours: float | None, fastai: float | None) -> float | None:
    if ours is None or fastai is None or not fastai or math.isnan(ours) or math.isnan(fastai):
        return None
    return ours / fastai


def _metrics(task: str, results: list[dict], clock: str) -> dict[str, float]:
    """Median throughputs of one implementation at one setting, over every timed step of every round; `clock` is
    "times" (wall) or "cpu" (this process's CPU seconds, all threads)."""
    if not results:
        return {}
    if task == "lm_train":
        times = [t for r in results for t in r["steps"][clock]]
        return {"tokens/s": results[0]["tokens_per_batch"] / median(times)}
    if task == "clas_train":
        steps = [
            (t, d, k) for r in results for t, d, k in zip(r["steps"][clock], r["steps"]["docs"], r["steps"]["tokens"])
        ]
        return {"docs/s": median([d / t for t, d, _ in steps]), "tokens/s": median([k / t for t, _, k in steps])}
    key = "time" if clock == "times" else "cpu"
    if task == "clas_infer":
        batched = [r["batched"] for r in results]
        single = [t for r in results for t in r["single"][clock]]
        return {
            "docs/s, sorted batches": median([b["docs"] / b[key] for b in batched]),
            "tokens/s, sorted batches": median([b["tokens"] / b[key] for b in batched]),
            "docs/s, one at a time": 1 / median(single) if single else math.nan,
        }
    return {"new tokens/s": median([run["new_tokens"] / run[key] for r in results for run in r["runs"]])}


def _memory(records: list[dict]) -> dict | None:
    mems = [r["memory"] for r in records if r.get("memory")]
    if not mems:
        return None
    return {
        "peak_mb": max(m["peak_mb"] for m in mems),
        "above_baseline_mb": max(m["peak_mb"] - m["baseline_mb"] for m in mems),
        "isolated": all(m["isolated"] for m in mems),
    }


def _agreement(reference: list[float], other: list[float]) -> dict:
    n = min(len(reference), len(other))
    same = sum((a > 0.5) == (b > 0.5) for a, b in zip(reference[:n], other[:n]))
    return {
        "docs": n,
        "same_label": same,
        "max_abs_prob_diff": max((abs(a - b) for a, b in zip(reference, other)), default=0.0),
    }


def summarize(records: list[dict], settings: Settings, prepared: Prepared, started: float, finished: float,
              reused_predictions: dict | None = None) -> dict:
    """`reused_predictions`: the prediction comparisons of a previous report whose inference records are reused (its
    saved records hold no per-review probabilities)."""
    by_key: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: {impl: [] for impl in IMPLS})
    for record in records:
        by_key[_key(record["run"])][record["impl"]].append(record)

    rows = []
    for key, per_impl in by_key.items():
        task = key[0]
        results = {impl: [r["result"] for r in per_impl[impl] if r["result"]] for impl in IMPLS}
        wall = {impl: _metrics(task, results[impl], "times") for impl in IMPLS}
        cpu = {impl: _metrics(task, results[impl], "cpu") for impl in IMPLS}
        for name in dict.fromkeys([*wall["fastai"], *wall["ours"]]):
            fastai_value, ours_value = wall["fastai"].get(name), wall["ours"].get(name)
            fastai_cpu, ours_cpu = cpu["fastai"].get(name), cpu["ours"].get(name)
            rows.append({
                "task": task, "vocab": key[1], "batch_size": key[2], "precision": key[3],
                "setting": _setting_label(key, settings), "metric": name,
                "fastai": fastai_value, "ours": ours_value, "ratio": _ratio(ours_value, fastai_value),
                "fastai_per_cpu_s": fastai_cpu, "ours_per_cpu_s": ours_cpu, "ratio_cpu": _ratio(ours_cpu, fastai_cpu),
                "runs": {impl: len(results[impl]) for impl in IMPLS},
                "memory": {impl: _memory(per_impl[impl]) for impl in IMPLS},
            })

    quality = {}
    for key, per_impl in by_key.items():
        if key[0] != "lm_train":
            continue
        for impl in IMPLS:
            for r in per_impl[impl]:
                if r["result"] and "valid_ppl" in r["result"]:
                    quality[f"{impl} {key[3]}"] = {
                        "valid_ppl": r["result"]["valid_ppl"], "vocab": key[1], "batch_size": key[2],
                        "train_tokens": settings.quality_batches * key[2] * settings.bptt,
                        "eval_tokens": settings.eval_batches * key[2] * settings.bptt,
                    }

    predictions = dict(reused_predictions or {})
    infer = {key[3]: per_impl for key, per_impl in by_key.items() if key[0] == "clas_infer"}
    reference = next((r["result"] for r in infer.get("fp32", {}).get("fastai", []) if r["result"]), None)
    if reference is not None and isinstance(reference["probs"], list):
        # fastai's batched predictions depend on the padding (its max_len window counts pad tokens), so each run is
        # compared with fastai's prediction for the review alone (predict) and with fastai's sorted batches.
        alone, batched = reference["single"]["probs"], reference["probs"]
        for precision, per_impl in infer.items():
            for impl in IMPLS:
                result = next((r["result"] for r in per_impl[impl] if r["result"]), None)
                if result is None:
                    continue
                ids_match = result["single"].get("ids_match_fastai")
                predictions[f"{impl} {precision}, sorted batches"] = {
                    "vs_fastai_alone": _agreement(alone, result["probs"]),
                    "vs_fastai_batched": _agreement(batched, result["probs"]),
                    "mode": f"batches of {settings.infer_batch_size}",
                }
                predictions[f"{impl} {precision}, one at a time"] = {
                    "vs_fastai_alone": _agreement(alone, result["single"]["probs"]),
                    "vs_fastai_batched": _agreement(batched, result["single"]["probs"]),
                    "mode": result["single"]["mode"]
                    + (f"; token ids equal to fastai's for {sum(ids_match)}/{len(ids_match)}" if ids_match else ""),
                }

    generation = {}
    for key, per_impl in by_key.items():
        if key[0] == "generate":
            for impl in IMPLS:
                result = next((r["result"] for r in per_impl[impl] if r["result"]), None)
                if result:
                    generation[f"{impl} {key[3]}"] = {k: result[k] for k in ("mode", "prompt_tokens", "sample")}

    data = torch.load(prepared.data, weights_only=False)
    summary = {
        "title": "AWD-LSTM (ULMFiT): this package vs fastai",
        "date": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(finished - started, 1),
        "machine": machine_info(),
        "versions": versions(),
        "settings": settings.to_dict(),
        "data": data["stats"],
        "prompt": data["prompt"]["text"],
        "rows": rows,
        "quality": quality,
        "predictions": predictions,
        "generation": generation,
        "load_average_1min": _load_summary(records),
        "measured": measured_on(records),
        "errors": [{"impl": r["impl"], "run": r["run"], "error": r["error"]} for r in records if r["error"]],
        "records": [_slim(r) for r in records],
    }
    summary["targets"] = targets(summary, settings)
    return summary


def _load_summary(records: list[dict]) -> dict | None:
    loads = [r["load_avg_1min_before"] for r in records if "load_avg_1min_before" in r]
    return {"median": median(loads), "max": max(loads)} if loads else None


def measured_on(records: list[dict]) -> dict[str, list[str]]:
    """When each benchmark was measured: `--reuse` joins the measurements of earlier runs to a report."""
    dates = defaultdict(set)
    for record in records:
        if "measured" in record:
            dates[record["run"]["task"]].add(record["measured"])
    return {task: sorted(values) for task, values in dates.items()}


def _slim(record: dict) -> dict:
    """The raw record without the per-review probabilities (summarized under `predictions`)."""
    record = json.loads(json.dumps(record))
    if record.get("result") and "probs" in record["result"]:
        record["result"]["probs"] = f"{len(record['result']['probs'])} values"
    return record


def _find(rows: list[dict], task: str, metric: str, precision: str, vocab=None, batch_size=None) -> dict | None:
    for row in rows:
        if (row["task"], row["metric"], row["precision"]) == (task, metric, precision) and \
                (vocab is None or row["vocab"] == vocab) and (batch_size is None or row["batch_size"] == batch_size):
            return row
    return None


def _best_ours(rows: list[dict], task: str, metric: str, **where) -> tuple[float | None, str | None]:
    candidates = [(r["ours"], r["precision"]) for r in rows if r["task"] == task and r["metric"] == metric
                  and r["ours"] is not None and all(r[k] == v for k, v in where.items())]
    return max(candidates) if candidates else (None, None)


# (target, task, metric, minimum speedup over fastai fp32, unit)
_SPEED_TARGETS = [
    ("LM training throughput", "lm_train", "tokens/s", TARGET_LM_SPEEDUP, "tokens/s"),
    ("Classifier inference, sorted batches of 64", "clas_infer", "docs/s, sorted batches", TARGET_INFER_SPEEDUP,
     "reviews/s"),
    ("Generation", "generate", "new tokens/s", TARGET_GEN_SPEEDUP, "tokens/s"),
]


def targets(summary: dict, settings: Settings) -> list[dict]:
    """Each target: the best precision of ours against fastai in fp32 (the baseline a fastai user gets on CPU)."""
    rows, out = summary["rows"], []

    def add(name, goal, measured, met, detail):
        out.append({"target": name, "goal": goal, "measured": measured, "met": met, "detail": detail})

    for name, task, metric, minimum, unit in _SPEED_TARGETS:
        # LM throughput is compared at the setting whose perplexity the quality run measures.
        where = dict(vocab=settings.quality_vocab, batch_size=settings.quality_batch_size) if task == "lm_train" else {}
        base = _find(rows, task, metric, "fp32", **where)
        best, precision = _best_ours(rows, task, metric, **where)
        if not (base and base["fastai"] and best):
            continue
        speedup = best / base["fastai"]
        goal = f">= {minimum:g}x fastai fp32"
        measured = (f"{speedup:.2f}x (ours {precision} {best:,.{_digits(best)}f} vs fastai fp32 "
                    f"{base['fastai']:,.{_digits(base['fastai'])}f} {unit})")
        met, detail = speedup >= minimum, {"speedup": speedup, "ours_precision": precision}
        if task == "lm_train":
            fastai_ppl = summary["quality"].get("fastai fp32", {}).get("valid_ppl")
            ours_ppl = summary["quality"].get(f"ours {precision}", {}).get("valid_ppl")
            gap = abs(ours_ppl / fastai_ppl - 1) if fastai_ppl and ours_ppl else None
            goal += f", perplexity within {TARGET_LM_PPL_GAP:.0%}"
            measured += (f"; perplexity {ours_ppl:.1f} vs {fastai_ppl:.1f} ({gap:.1%})" if gap is not None
                         else "; no perplexity")
            met = met and gap is not None and gap <= TARGET_LM_PPL_GAP
            detail["ppl_gap"] = gap
        add(name, goal, measured, met, detail)
    higher = []
    seen = set()
    for row in rows:
        key = (row["task"], row["setting"])
        mem = row["memory"]
        if key in seen or not (mem["fastai"] and mem["ours"]):
            continue
        seen.add(key)
        if mem["ours"]["peak_mb"] > mem["fastai"]["peak_mb"]:
            higher.append(
                f"{row['task']} {row['setting']}: {mem['ours']['peak_mb']:,.0f} vs {mem['fastai']['peak_mb']:,.0f} MB"
            )
    if seen:
        add("Peak memory", "ours <= fastai at every setting (process peak RSS)",
            f"higher at {len(higher)} of {len(seen)} settings" + (": " + "; ".join(higher) if higher else ""),
            not higher, {"higher": higher})
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------
_TASK_TITLES = {"lm_train": "LM training", "clas_train": "Classifier training", "clas_infer": "Classifier inference",
                "generate": "Generation"}


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _digits(value: float | None) -> int:
    return 0 if value is not None and value >= 100 else (1 if value is not None and value >= 10 else 2)


def _measured_line(summary: dict) -> list[str]:
    """Names the run behind each benchmark when the report joins several (`--reuse`)."""
    measured = summary.get("measured") or {}
    if len({date for dates in measured.values() for date in dates}) < 2:
        return []
    parts = [f"{_TASK_TITLES.get(task, task)} {' and '.join(dates)}" for task, dates in measured.items()]
    return [f"Measured in more than one run (`--reuse`), started at: {'; '.join(parts)}."]


def markdown(summary: dict) -> str:
    m, v, s = summary["machine"], summary["versions"], summary["settings"]
    size = s["model"]
    lines = [
        f"# {summary['title']}",
        "",
        f"{summary['date']}, {summary['duration_s'] / 60:.1f} min. Machine: {m['cpu']}, {m['cores']} cores"
        f" ({', '.join(m['bf16_hardware']) or 'no bf16 instructions'}), {m['memory_gib']} GiB,"
        f" GPU: {m['gpu'] or 'none'}."
        f" torch threads: {s['threads'] or m['cores']}, OMP_WAIT_POLICY={s['omp_wait_policy'] or 'unset'}."
        + (f" Load average (1 min) before each measurement: median {summary['load_average_1min']['median']:.1f},"
           f" max {summary['load_average_1min']['max']:.1f}." if summary.get("load_average_1min") else ""),
        *_measured_line(summary),
        f"Versions: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, fastai {v['fastai']},"
        f" spaCy {v['spacy']}.",
        f"Model: AWD-LSTM {size['emb_size']}/{size['hidden_size']}/{size['num_layers']}, fastai's dropouts"
        f" (LM: drop_mult 1 with AR 2 / TAR 1; classifier: drop_mult 0.5). {s['repeats']} ABBA round(s) per setting,"
        " each implementation in its own fresh process; medians over every timed step."
        + (" **Quick mode: tiny sizes, a smoke test, not a measurement.**" if s["quick"] else ""),
        "",
    ]
    if "bf16" not in s["precisions"]:
        lines += ["bf16 was not measured: this CPU has no bf16 kernels (AVX-512 BF16 or AMX), so oneDNN has no bf16"
                  " LSTM and bf16 matrix products run hundreds of times slower than fp32.", ""]
    if summary["targets"]:
        lines += ["## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['goal']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |"
                  for t in summary["targets"]]
        lines.append("")
    lines += ["## Throughput (medians)", "",
              "| benchmark | setting | metric | fastai | ours | ours/fastai | ours/fastai by CPU time"
              " | peak MB fastai | peak MB ours |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in summary["rows"]:
        mem = row["memory"]
        mems = [f"{_fmt(mem[i]['peak_mb'])} (+{_fmt(mem[i]['above_baseline_mb'])})" if mem[i] else "-" for i in IMPLS]
        lines.append(
            f"| {_TASK_TITLES[row['task']]} | {row['setting']} | {row['metric']}"
            f" | {_fmt(row['fastai'], _digits(row['fastai']))}"
            f" | {_fmt(row['ours'], _digits(row['ours']))} | {_fmt(row['ratio'], 2)}x | {_fmt(row['ratio_cpu'], 2)}x"
            f" | {mems[0]} | {mems[1]} |"
        )
    lines += ["", "Throughputs are per wall-clock second (medians). \"By CPU time\": the same ratio per CPU second of"
              " the process (all threads), which contention from other jobs on the machine barely moves. Peak MB: the"
              " process's peak resident memory, and in brackets how much of it came after the libraries and data were"
              " loaded (the benchmark's own allocations).", ""]
    if summary["quality"]:
        lines += ["## LM quality: validation perplexity after the same tokens from the same initial weights", "",
                  "| run | train tokens | eval tokens | perplexity |", "|---|---:|---:|---:|"]
        for name, q in sorted(summary["quality"].items()):
            lines.append(f"| {name} | {q['train_tokens']:,} | {q['eval_tokens']:,} | {q['valid_ppl']:.2f} |")
        lines.append("")
    if summary["predictions"]:
        lines += ["## Classifier predictions against fastai fp32", "",
                  "Same label / largest probability difference, against fastai's prediction for each review alone"
                  " (`predict`, unpadded) and against fastai's sorted batches (where fastai's result depends on the"
                  " padding: its `max_len` window counts pad tokens).", "",
                  "| run | vs fastai, review alone | vs fastai, sorted batches | how |", "|---|---:|---:|---|"]
        for name, p in summary["predictions"].items():
            cells = [f"{a['same_label']}/{a['docs']}, {a['max_abs_prob_diff']:.1e}"
                     for a in (p["vs_fastai_alone"], p["vs_fastai_batched"])]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} | {p['mode']} |")
        lines.append("")
    if summary["generation"]:
        lines += ["## Generation", "", f"Prompt: \"{summary['prompt']}\"", ""]
        lines += [
            f"- {name}: {g['mode']}, {g['prompt_tokens']}-token prompt" for name, g in summary["generation"].items()
        ]
        lines.append("")
    d = summary["data"]
    lines += [
        "## Data and method", "",
        f"- LM: WikiText-2 articles, tokenized by fastai ({d['lm_train_tokens']:,} tokens to train on from"
        f" `wiki.valid.tokens`, {d['lm_valid_tokens']:,} held out from `wiki.test.tokens`), in fastai's"
        " `LMDataLoader` layout on both sides.",
        f"- Vocabulary: fastai's `make_vocab` (min_freq {s['min_freq']}) over WikiText-2 and"
        f" {d['vocab_source_docs']['imdb_train_reviews']:,} IMDb training reviews ({d['distinct_tokens']:,} distinct"
        f" tokens); real entries per size: {', '.join(f'{k}: {n:,}' for k, n in d['real_vocab_entries'].items())}, the"
        " rest fastai's `xxfake` filler (the decoder's cost depends on its size only).",
        f"- Classifier: {d['clas_train_docs']} IMDb training reviews ({d['clas_train_tokens']:,} tokens) for training,"
        f" {d['infer_docs']} test reviews ({d['infer_tokens']:,} tokens) for inference; fastai `SortedDL` + `Pad_Chunk`"
        " vs ours length-sorted, right-padded batches with an attention mask; both sides form the same batches.",
        "- Training: fastai's Learner (Adam, RNNRegularizer) vs ours a plain loop on the model's own loss with torch's"
        " fused AdamW set to fastai's hyper-parameters; timed from the start of a step through the optimizer step."
        " bf16: `torch.autocast('cpu', torch.bfloat16)` around forward and loss on both sides (a fastai callback).",
        "- Inference one at a time and generation start from raw text on both sides (fastai `predict`, ours the"
        " tokenizer, `pipeline`/`generate` and decoding).",
        "",
    ]
    if summary["errors"]:
        lines += ["## Errors", ""] + [f"- {e['impl']} {e['run']['task']}: {e['error'].strip().splitlines()[-1]}"
                                      for e in summary["errors"]] + [""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["ratio"] is not None]
    labels = [f"{_TASK_TITLES[r['task']]}: {r['setting']} ({r['metric']})" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 0.38 * max(len(rows), 4) + 1.5),
                                   gridspec_kw={"width_ratios": [3, 2]})
    y = range(len(rows))
    ax1.barh(list(y), [r["ratio"] for r in rows], color=["tab:green" if r["ratio"] >= 1 else "tab:red" for r in rows])
    ax1.axvline(1.0, color="black", linewidth=1)
    ax1.set_xscale("log")
    ax1.set_yticks(list(y), labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("throughput ours / fastai (log scale)")
    for i, r in enumerate(rows):
        ax1.text(r["ratio"], i, f" {r['ratio']:.2f}x", va="center", fontsize=7)

    mem_rows = [r for r in rows if r["memory"]["fastai"] and r["memory"]["ours"]]
    seen, mem_labels, fastai_mb, ours_mb = set(), [], [], []
    for r in mem_rows:
        key = (r["task"], r["setting"])
        if key not in seen:
            seen.add(key)
            mem_labels.append(f"{_TASK_TITLES[r['task']]}: {r['setting']}")
            fastai_mb.append(r["memory"]["fastai"]["peak_mb"])
            ours_mb.append(r["memory"]["ours"]["peak_mb"])
    y2 = range(len(mem_labels))
    ax2.barh([i - 0.2 for i in y2], fastai_mb, height=0.4, label="fastai")
    ax2.barh([i + 0.2 for i in y2], ours_mb, height=0.4, label="ours")
    ax2.set_yticks(list(y2), mem_labels, fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("peak resident memory (MB)")
    ax2.legend()
    fig.suptitle(f"{summary['title']} — {summary['machine']['cpu']}, {summary['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(summary: dict, out_dir: Path, suffix: str = "") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path, png_path = (out_dir / f"results{suffix}.{ext}" for ext in ("md", "json", "png"))
    # The measured gaps and their causes are written by hand beside the tables (`analysis.md` in the same folder).
    analysis = out_dir / "analysis.md"
    md_path.write_text(markdown(summary) + (f"\n{analysis.read_text()}" if analysis.is_file() and not suffix else ""))
    json_path.write_text(json.dumps(summary, indent=1, default=str))
    plot(summary, png_path)
    return [md_path, json_path, png_path]
