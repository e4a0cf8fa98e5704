import gzip
import json
import site
import sys
from pathlib import Path

import pytest

# The `hub_server` fixture (tests/hub_server.py), for every test module that takes it as an argument.
pytest_plugins = ["hub_server"]

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


# The parent's site packages are added by hand, without running their .pth files, so an editable install of this
# project (which works through a .pth file) is invisible: the process sees transformers and torch, not this package.
# They come from this process, which ran `site` (venv, conda or system interpreter alike): under `-S` the child's own
# `site.getsitepackages()` would name the base interpreter's folders, not a virtual environment's.
WITHOUT_PACKAGE_PRELUDE = f"import sys; sys.path.extend({site.getsitepackages()!r})\n"


def python_without_package(script: str) -> list[str]:
    """A command running `script` in a Python process where this project's packages cannot be imported."""
    return [sys.executable, "-I", "-S", "-c", WITHOUT_PACKAGE_PRELUDE + script]


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """The tests' models are tiny: one thread beats two threads fighting over two cores (measured 9 s vs 52 s)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def bf16_kernels(monkeypatch):
    """Sets whether this CPU counts as having bf16 kernels, so both of the model's and trainer's paths are tested on
    any machine: a CPU without them still computes bf16 in the stepwise LSTM, only slowly, but has no fused bf16 LSTM,
    so there bf16 training runs every layer stepwise."""
    from modeling_awd_lstm import kernels_awd_lstm

    real = kernels_awd_lstm.cpu_has_bf16_kernels()

    def set_present(present: bool) -> None:
        monkeypatch.setattr(kernels_awd_lstm, "cpu_has_bf16_kernels", lambda: present)
        if present and not real:
            monkeypatch.setattr(kernels_awd_lstm, "FUSED_BF16_TRAINING_MAX_HIDDEN", 0)

    return set_present
