"""One benchmark process: `python -m benchmarks.worker SPEC.json RESULT.json`.

Runs the measurements of one implementation listed in SPEC and writes their results, each with this process's
memory: its peak resident set (`VmHWM`) and the same figure once the libraries and data were loaded, before any
model existed. Only the side under test is imported, so neither library's footprint shows in the other's figures.
"""

import json
import os
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path

import torch

from .data import Prepared, load_data
from .measure import peak_rss_mb
from .settings import ModelSize, Settings


def settings_from_dict(values: dict) -> Settings:
    known = {f.name for f in fields(Settings)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in known}
    values["model"] = ModelSize(**values["model"])
    return Settings(**values)


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    settings = settings_from_dict(spec["settings"])
    torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    impl = spec["impl"]
    if impl == "fastai":
        from . import fastai_side as side
    elif impl == "ours":
        from . import ours_side as side
    else:
        raise ValueError(f"Unknown implementation {impl!r}.")
    prepared = Prepared.from_dict(spec["prepared"])
    data = load_data(prepared)
    baseline = peak_rss_mb()
    results = []
    for run in spec["runs"]:
        start = time.perf_counter()
        try:
            outcome = side.TASKS[run["task"]](run, settings, data, prepared)
            error = None
        except Exception:  # reported to the parent, which records it and goes on
            outcome, error = None, traceback.format_exc()
        results.append({
            "run": run, "impl": impl, "result": outcome, "error": error,
            "wall_s": time.perf_counter() - start,
            "memory": {"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "isolated": len(spec["runs"]) == 1},
            "threads": torch.get_num_threads(),
        })
    Path(result_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
