"""Benchmarks of this package's AWD-LSTM against fastai 2.8, side by side on the same machine, data and weights.

    python -m benchmarks.run [--quick] [--data-dir D] [--out benchmarks/results]

Each measurement runs in a fresh process that imports one implementation only (so its peak memory is its own); the
two implementations alternate in ABBA order over `repeats` rounds so that machine drift cancels, and the report
gives medians and ratios ours/fastai. `--quick` runs tiny models on a little data (a smoke test, not a measurement).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .data import default_cache_dir, prepare, resolve_data_files
from .report import summarize, write_reports
from .settings import FULL, QUICK, Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("fastai", "ours")
TASK_GROUPS = ("lm", "clas_train", "clas_infer", "generate")
_TASK_OF_GROUP = {"lm": "lm_train", "clas_train": "clas_train", "clas_infer": "clas_infer", "generate": "generate"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def plan(settings: Settings, only: tuple[str, ...]) -> list[dict]:
    """The settings both implementations are measured at, in the order they run."""
    tasks = {_TASK_OF_GROUP[group] for group in only}
    settings_list: list[dict] = []
    if "lm_train" in tasks:
        for vocab in settings.lm_vocab_sizes:
            for batch_size in settings.lm_batch_sizes:
                for precision in settings.precisions:
                    settings_list.append({"task": "lm_train", "vocab": vocab, "batch_size": batch_size,
                                          "precision": precision})
    for task in ("clas_train", "clas_infer", "generate"):
        if task in tasks:
            settings_list += [{"task": task, "precision": precision} for precision in settings.precisions]
    return settings_list


def run_spec(setting: dict, settings: Settings, repeat: int) -> dict:
    """What one process runs for `setting` in round `repeat`: the first round of the quality setting trains longer
    and evaluates perplexity."""
    run = dict(setting, repeat=repeat)
    if setting["task"] == "lm_train":
        quality = (repeat == 0 and setting["vocab"] == settings.quality_vocab
                   and setting["batch_size"] == settings.quality_batch_size)
        run["warmup"] = settings.lm_warmup_batches
        run["timed"] = (settings.quality_batches - settings.lm_warmup_batches) if quality else settings.lm_timed_batches
        run["eval_batches"] = settings.eval_batches if quality else 0
    return run


def run_worker(impl: str, runs: list[dict], settings: Settings, prepared, workdir: Path, index: int) -> list[dict]:
    spec_path, result_path = workdir / f"spec_{index}.json", workdir / f"result_{index}.json"
    spec = {"impl": impl, "runs": runs, "settings": settings.to_dict(), "prepared": prepared.to_dict()}
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    if settings.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = settings.omp_wait_policy
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", str(spec_path), str(result_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or not result_path.is_file():
        error = f"worker exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
        log(f"  {impl}: FAILED ({error.splitlines()[-1] if error else ''})")
        return [{"run": run, "impl": impl, "result": None, "error": error, "wall_s": elapsed, "memory": None}
                for run in runs]
    records = json.loads(result_path.read_text())
    for record in records:
        record["process_wall_s"] = elapsed
        record["load_avg_1min_before"] = load_before
        if record["error"]:
            log(f"  {impl} {record['run']['task']}: FAILED\n{record['error']}")
    return records


def _describe(run: dict) -> str:
    extra = f" vocab {run['vocab']} batch {run['batch_size']}" if run["task"] == "lm_train" else ""
    return f"{run['task']}{extra} {run['precision']} (round {run['repeat'] + 1})"


def execute(settings: Settings, prepared, only: tuple[str, ...]) -> list[dict]:
    records: list[dict] = []
    setting_list = plan(settings, only)
    with tempfile.TemporaryDirectory(prefix="awd_bench_") as tmp:
        workdir, index = Path(tmp), 0
        for repeat in range(settings.repeats):
            order = IMPLS if repeat % 2 == 0 else IMPLS[::-1]  # ABBA across rounds
            if settings.quick:
                # A smoke test: one process per implementation and round runs everything.
                for impl in order:
                    log(f"{impl}: all benchmarks (round {repeat + 1})")
                    runs = [run_spec(s, settings, repeat) for s in setting_list]
                    records += run_worker(impl, runs, settings, prepared, workdir, index)
                    index += 1
                continue
            for setting in setting_list:
                if setting["task"] == "clas_infer" and repeat >= settings.infer_repeats:
                    continue
                run = run_spec(setting, settings, repeat)
                for impl in order:
                    log(f"{impl}: {_describe(run)}")
                    records += run_worker(impl, [run], settings, prepared, workdir, index)
                    index += 1
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test of the whole pipeline")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="real data (default /work/shared/data; the bundled subsets when that is absent)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--cache-dir", type=Path, default=None, help="tokenized data and initial weights")
    parser.add_argument("--repeats", type=int, default=None, help="ABBA rounds per setting")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--only", default=",".join(TASK_GROUPS), help=f"comma-separated subset of {TASK_GROUPS}")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="a previous results.json: its measurements of the benchmarks not in --only join the"
                        " report")
    args = parser.parse_args(argv)

    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = set(only) - set(TASK_GROUPS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; choose from {TASK_GROUPS}")
    settings = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("repeats", args.repeats), ("threads", args.threads)) if v is not None}
    settings = dataclasses.replace(settings, **overrides)

    started = time.time()
    files = resolve_data_files(args.data_dir)
    same_folder = files.lm_train.parent == files.imdb_train.parent
    log(f"data: {files.lm_train.parent if same_folder else files.lm_train.parent.parent}")
    prepared = prepare(settings, files, args.cache_dir or default_cache_dir(), log=log)
    records = execute(settings, prepared, only)
    measured = datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds")
    for record in records:
        record["measured"] = measured
    reused_predictions = None
    if args.reuse is not None:
        rerun = {_TASK_OF_GROUP[group] for group in only}
        previous = json.loads(args.reuse.read_text())
        kept = [{"measured": previous["date"], **r} for r in previous["records"] if r["run"]["task"] not in rerun]
        order = list(_TASK_OF_GROUP.values())
        records = sorted(kept + records, key=lambda r: order.index(r["run"]["task"]))  # the tables' usual order
        if "clas_infer" not in rerun:
            reused_predictions = previous.get("predictions")
        log(f"reused {len(kept)} measurements of {args.reuse}")
    summary = summarize(records, settings, prepared, started=started, finished=time.time(),
                        reused_predictions=reused_predictions)
    paths = write_reports(summary, args.out, suffix="_quick" if settings.quick else "")
    log("wrote " + ", ".join(str(p) for p in paths))
    print(Path(paths[0]).read_text())
    failures = [r for r in records if r["error"]]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
