"""Held-out perplexity of a language model on WikiText-2, per token and per WikiText word, with its tokenizer's
unknown-token rate.

    python -m experiments.stage1_evaluate runs/wikipedia_en/pretrain --data-dir /work/shared/data \
        --out experiments/results-avx512/stage1_wikitext2.json

WikiText-2 is read as published (`wiki.valid.tokens`, `wiki.test.tokens`: one paragraph or heading per line, its
`<unk>` and `@-@` markers included) through the same language-model stream and evaluation as training, in bf16 where
the CPU has bf16 kernels. Perplexity per token depends on the vocabulary; per word it does not: exp(loss per predicted
token x predicted tokens / words), words being WikiText's whitespace tokens.
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_awd_lstm import cpu_has_bf16_kernels
from ulmfit.data import DataSpec, TokenizedCorpus, load_data, tokenize_for_lm
from ulmfit.trainer import ULMFiTTrainer, ULMFiTTrainingArguments

SPLITS = {"validation": "wikitext2/wiki.valid.tokens", "test": "wikitext2/wiki.test.tokens"}
EVAL_BATCH_SIZE = 128


def evaluate_wikitext2(folder: str | Path, text_file: Path, batch_size: int = EVAL_BATCH_SIZE) -> dict:
    """Loss, perplexity per token and per word, and the unknown-token rate of the model in `folder` on `text_file`."""
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    # fp32 weights under bf16 autocast, as in training: a bf16-stored model is upcast exactly.
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    lines = load_data(DataSpec(path=str(text_file), format="text"))
    tokens = tokenize_for_lm(lines, tokenizer, backwards=model.config.backwards)
    corpus = TokenizedCorpus.from_dataset(tokens, vocab_size=len(tokenizer))
    counts = corpus.num_tokens - batch_size  # each row's first token is not predicted
    unknown = int((corpus.tokens == tokenizer.unk_token_id).sum())
    words = sum(len(text.split()) for text in lines["text"])
    with tempfile.TemporaryDirectory() as scratch:
        args = ULMFiTTrainingArguments(
            output_dir=scratch, per_device_eval_batch_size=batch_size, lm_bptt=model.config.bptt,
            bf16=cpu_has_bf16_kernels(), report_to="none", disable_tqdm=True,
        )
        started = time.time()
        trainer = ULMFiTTrainer(model=model, args=args, eval_dataset=corpus, processing_class=tokenizer)
        loss = trainer.evaluate()["eval_loss"]
    return {
        "loss": round(loss, 5), "perplexity": round(math.exp(loss), 2),
        "word_perplexity": round(math.exp(loss * counts / words), 2), "predicted_tokens": counts, "words": words,
        "unknown_rate": round(unknown / corpus.num_tokens, 5), "seconds": round(time.time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="A language-model stage folder.")
    parser.add_argument("--data-dir", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--out", type=Path, default=None, help="Write the results here as JSON.")
    args = parser.parse_args()
    results = {split: evaluate_wikitext2(args.model, args.data_dir / file) for split, file in SPLITS.items()}
    results["model"] = str(args.model)
    print(json.dumps(results, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
