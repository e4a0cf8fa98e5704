"""Result files: one JSON per run, `results/<experiment>/<name>_seed<k>.json`, written once the run has finished (so a
file that exists is a finished run, which the commands skip)."""

import json
import os
from datetime import datetime, timezone
from pathlib import Path


def result_path(results_dir: Path, experiment: str, name: str, seed: int) -> Path:
    return results_dir / experiment / f"{name}_seed{seed}.json"


def write_json(path: Path, record: dict) -> None:
    """Written under a temporary name and renamed: an interrupted run leaves no result behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def load_results(results_dir: Path) -> list[dict]:
    """Every run's record under `results_dir`, with `path` added."""
    records = []
    for path in sorted(results_dir.glob("*/*.json")):
        record = read_json(path)
        record["path"] = str(path)
        records.append(record)
    return records


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
