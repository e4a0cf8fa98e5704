"""The documents of each task, picked once so that both implementations and every command read the same ones.

    data_dir/trec/train_5500.label, TREC_10.label            TREC-6 (Latin-1; the coarse label is the text before ':')
    data_dir/imdb/{train,test,unsup}.jsonl.gz                IMDb ({"id", "text", "label", "rating"}; -1: unlabelled)

Files are read by `ulmfit.data.load_data`. Every random pick is seeded, so a task's documents depend only on its
settings.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ulmfit.data import DataSpec, load_data

from .settings import TaskSettings

IMDB_LABELS = ("neg", "pos")


@dataclass
class TaskData:
    """A task's documents. `lm_texts` is the stage-2 text in the order both sides count its vocabulary (fastai counts
    every row of its LM DataFrame, the held-out ones too); `lm_is_valid` marks the rows held out for perplexity."""

    task: str
    label_names: list[str]
    lm_texts: list[str]
    lm_is_valid: list[bool]
    train_texts: list[str]
    train_labels: list[str]
    test_texts: list[str]
    test_labels: list[str]

    def lm_split(self) -> tuple[list[str], list[str]]:
        train = [text for text, valid in zip(self.lm_texts, self.lm_is_valid) if not valid]
        valid = [text for text, valid in zip(self.lm_texts, self.lm_is_valid) if valid]
        return train, valid

    def stats(self) -> dict:
        return {"lm_docs": len(self.lm_texts), "lm_valid_docs": sum(self.lm_is_valid),
                "train_docs": len(self.train_texts), "test_docs": len(self.test_texts), "labels": self.label_names}


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"No {what} at {path}. Point --data-dir at the folder holding trec/ and imdb/ (default /work/shared/data)."
        )
    return path


def balanced_sample(labels: list, n: int, rng: np.random.Generator) -> list[int]:
    """`n` indices with the classes as equal as they can be (the first classes get the remainder), shuffled."""
    classes = sorted(set(labels))
    by_class = {c: [i for i, label in enumerate(labels) if label == c] for c in classes}
    picked = []
    for rank, c in enumerate(classes):
        want = n // len(classes) + (1 if rank < n % len(classes) else 0)
        if want > len(by_class[c]):
            raise ValueError(f"Asked for {want} documents of class {c!r}, but there are only {len(by_class[c])}.")
        picked += rng.choice(by_class[c], size=want, replace=False).tolist()
    return [int(i) for i in rng.permutation(picked)]


def _held_out(n: int, fraction: float, rng: np.random.Generator) -> list[bool]:
    valid = set(rng.choice(n, size=max(1, round(n * fraction)), replace=False).tolist())
    return [i in valid for i in range(n)]


def _read_trec(path: Path) -> tuple[list[str], list[str]]:
    rows = load_data(DataSpec(path=str(_require(path, "TREC file")), format="trec"))
    return list(rows["text"]), list(rows["coarse_label"])


@functools.lru_cache(maxsize=4)  # the low-shot runs draw from the same train split again and again
def _read_imdb(data_dir: Path, split: str) -> tuple[list[str], list[int]]:
    rows = load_data(DataSpec(path=str(_require(data_dir / "imdb" / f"{split}.jsonl.gz", f"IMDb {split} split"))))
    return list(rows["text"]), list(rows["label"])


def load_task(settings: TaskSettings, data_dir: Path) -> TaskData:
    """The documents `settings` describe (see `TaskSettings`)."""
    rng = np.random.default_rng(settings.data_seed)
    if settings.task == "trec6":
        train_texts, train_labels = _read_trec(data_dir / "trec" / "train_5500.label")
        test_texts, test_labels = _read_trec(data_dir / "trec" / "TREC_10.label")
        if settings.labels is not None:
            keep = rng.permutation(len(train_texts))[: settings.labels]
            train_texts, train_labels = [train_texts[i] for i in keep], [train_labels[i] for i in keep]
        if settings.test_docs is not None:
            keep = rng.permutation(len(test_texts))[: settings.test_docs]
            test_texts, test_labels = [test_texts[i] for i in keep], [test_labels[i] for i in keep]
        lm_texts = list(train_texts)
        # A small subset may miss a rare class (ABBR) in training: the head still gets its output.
        label_names = sorted(set(train_labels) | set(test_labels))
    else:
        (train, train_ids), (test, test_ids) = _read_imdb(data_dir, "train"), _read_imdb(data_dir, "test")
        picked = balanced_sample(train_ids, settings.labels, rng)
        test_picked = balanced_sample(test_ids, settings.test_docs, rng)
        train_texts, train_labels = [train[i] for i in picked], [IMDB_LABELS[train_ids[i]] for i in picked]
        test_texts, test_labels = [test[i] for i in test_picked], [IMDB_LABELS[test_ids[i]] for i in test_picked]
        unsup_texts = []
        if settings.unsup_docs:
            unsup, _ = _read_imdb(data_dir, "unsup")
            unsup_texts = [unsup[int(i)] for i in rng.choice(len(unsup), settings.unsup_docs, replace=False)]
        lm_texts = unsup_texts + train_texts
        label_names = list(IMDB_LABELS)
    return TaskData(
        task=settings.task, label_names=label_names, lm_texts=lm_texts,
        lm_is_valid=_held_out(len(lm_texts), settings.lm_valid_fraction, rng),
        train_texts=train_texts, train_labels=train_labels, test_texts=test_texts, test_labels=test_labels,
    )


def imdb_lowshot_train(data_dir: Path, n: int, seed: int) -> tuple[list[str], list[str]]:
    """`n` balanced IMDb training reviews for seed `seed`; a seed's smaller sets are part of its larger ones."""
    texts, labels = _read_imdb(data_dir, "train")
    rng = np.random.default_rng(1000 + seed)
    orders = {c: rng.permutation([i for i, label in enumerate(labels) if label == c]) for c in (0, 1)}
    picked = [int(i) for c in (0, 1) for i in orders[c][: n // 2 + (n % 2 if c == 0 else 0)]]
    if len(picked) < n:
        raise ValueError(f"Asked for {n} IMDb training reviews, but there are only {len(labels)}.")
    picked = [picked[i] for i in rng.permutation(len(picked))]
    return [texts[i] for i in picked], [IMDB_LABELS[labels[i]] for i in picked]
