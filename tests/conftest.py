import gzip
import json
from pathlib import Path

import pytest

DEMO_DATA = Path(__file__).resolve().parent.parent / "training" / "demo_data"


def read_imdb(split: str, limit: int | None = None) -> list[dict]:
    """Rows of the bundled IMDb subset (`train`, `test` or `unsup`)."""
    rows = []
    with gzip.open(DEMO_DATA / f"imdb_{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) == limit:
                break
    return rows


@pytest.fixture(scope="session")
def imdb_texts() -> list[str]:
    return [row["text"] for row in read_imdb("test", limit=40)]
