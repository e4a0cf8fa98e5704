"""The general-domain corpus for stage 1 of the experiments, built from the real text in a data folder.

    python -m experiments.general_corpus --data-dir ../shared/data --out experiments/work/general

Training text: 14 Project Gutenberg books (NLTK's selection without the King James Bible, whose archaic English is 40%
of those words and far from any task here), 120 State of the Union and inaugural addresses, and WikiText-2 `valid`.
Held out: WikiText-2 `test`. Documents are paragraphs (books), speeches, and WikiText lines, written as JSON Lines.
"""

import argparse
import gzip
import json
import re
from pathlib import Path

SKIPPED_BOOKS = {"bible-kjv.txt"}
LATIN1_BOOKS = {"shakespeare-caesar.txt", "chesterton-ball.txt"}


def book_paragraphs(path: Path) -> list[str]:
    text = path.read_text(encoding="latin-1" if path.name in LATIN1_BOOKS else "utf-8")
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]


def speeches(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"].strip() for line in f if line.strip()]


def wikitext_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(texts: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def build(data_dir: Path, out: Path) -> dict[str, int]:
    train: list[str] = []
    for book in sorted((data_dir / "gutenberg_nltk").glob("*.txt")):
        if book.name not in SKIPPED_BOOKS:
            train += book_paragraphs(book)
    for name in ("state_union.jsonl.gz", "inaugural.jsonl.gz"):
        train += speeches(data_dir / "us_presidential_speeches" / name)
    train += wikitext_lines(data_dir / "wikitext2" / "wiki.valid.tokens")
    valid = wikitext_lines(data_dir / "wikitext2" / "wiki.test.tokens")
    write_jsonl(train, out / "train.jsonl.gz")
    write_jsonl(valid, out / "valid.jsonl.gz")
    return {"train_documents": len(train), "train_words": sum(len(t.split()) for t in train),
            "valid_documents": len(valid), "valid_words": sum(len(t.split()) for t in valid)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "work" / "general")
    args = parser.parse_args()
    print(json.dumps(build(args.data_dir, args.out)))


if __name__ == "__main__":
    main()
