"""`ulmfit convert-fastai`: turn a fastai ULMFiT model into a transformers folder.

The command line wires it with `add_convert_fastai_arguments(subparsers.add_parser("convert-fastai"))`; the parsed
arguments carry `func=run_convert_fastai`.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

from ulmfit.convert_fastai import FastaiConversionError, convert_fastai


def add_convert_fastai_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of `convert-fastai` to `parser` and set `func=run_convert_fastai`."""
    parser.description = (
        "Convert a fastai AWD_LSTM language model or text classifier to a transformers folder (config, safetensors "
        "weights, tokenizer, model card). Sizes are read from the weights."
    )
    parser.add_argument(
        "checkpoint",
        help="weights written by `learn.save` or `torch.save(learn.model.state_dict())` (with --vocab), or an "
        "exported Learner from `learn.export()` (with --trust-remote-pickle)",
    )
    parser.add_argument("output_dir", help="folder to write")
    parser.add_argument("--vocab", help="vocabulary of weights: a pickled list of tokens (itos.pkl) or a JSON list")
    parser.add_argument("--labels", nargs="+", help="class names of classifier weights, in output order")
    parser.add_argument(
        "--trust-remote-pickle",
        action="store_true",
        help="open an exported Learner: this runs code stored in the file, so use it only for files you trust",
    )
    parser.add_argument("--lang", help="spaCy language of the tokenizer of weights (default: en)")
    parser.add_argument(
        "--drop-mult",
        type=float,
        help="scale fastai's default dropouts (weights do not record them; default 1.0 LM, 0.5 classifier)",
    )
    parser.add_argument("--bptt", type=int, help="classifier chunk length (fastai's seq_len; default 72)")
    parser.add_argument("--max-len", type=int, help="classifier pooling length (fastai's max_len; default 1440)")
    parser.add_argument("--backwards", action="store_true", help="the model reads text backwards")
    parser.add_argument("--overwrite", action="store_true", help="replace the model already in output_dir")
    parser.set_defaults(func=run_convert_fastai)
    return parser


def run_convert_fastai(args: argparse.Namespace) -> int:
    """Run `convert-fastai` with parsed arguments; returns the exit status (errors are printed, not raised)."""
    # Only the settings given on the command line: an exported Learner refuses any, weights take them all.
    config_kwargs = {
        name: value
        for name, value in (("bptt", args.bptt), ("max_len", args.max_len), ("backwards", args.backwards or None))
        if value is not None
    }
    output_dir = Path(args.output_dir)
    refusal = _refusal(output_dir, args.overwrite)
    if refusal:
        print(f"convert-fastai: error: {refusal}", file=sys.stderr)
        return 2
    # Written under a temporary name and moved into place whole: a failed conversion leaves no half-written folder.
    partial = output_dir.with_name(f".{output_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        convert_fastai(
            args.checkpoint,
            partial,
            vocab=args.vocab,
            labels=args.labels,
            trust_pickle=args.trust_remote_pickle,
            lang=args.lang,
            drop_mult=args.drop_mult,
            **config_kwargs,
        )
    except FastaiConversionError as error:
        shutil.rmtree(partial, ignore_errors=True)
        print(f"convert-fastai: error: {error}", file=sys.stderr)
        return 2
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(partial, output_dir)
    print(f"Wrote {output_dir}")
    return 0


def _refusal(output_dir: Path, overwrite: bool) -> str | None:
    """Why converting into `output_dir` would lose files, or None: only an empty folder, or a model folder with
    --overwrite, is written (a trained stage is never replaced unasked, nor stale files mixed with new ones)."""
    if not output_dir.exists():
        return None
    if not output_dir.is_dir():
        return f"{output_dir} is a file: choose a folder to write."
    names = sorted(path.name for path in output_dir.iterdir())
    if not names:
        return None
    listed = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    if not (output_dir / "config.json").is_file():
        return f"{output_dir} holds files that are not a model ({listed}): choose a new or empty folder."
    if not overwrite:
        return f"{output_dir} already holds a model ({listed}): choose a new folder, or pass --overwrite to replace it."
    return None


__all__ = ["add_convert_fastai_arguments", "run_convert_fastai"]
