"""
LM fine-tuning of a tiny AWD-LSTM with gradual unfreezing, on one process or under DDP.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/scripts/ddp_lm.py OUT.json 4 RUN_DIR
    python tests/scripts/ddp_lm.py OUT.json 8 RUN_DIR

The second argument is the per-process batch size: 2 x 4 rows read the same streams as 1 x 8. Process 0 writes what
the test checks to OUT.json: the world size, the rows each process read first, the evaluation perplexity before and
after training, a checksum of every process's weights, and which layer groups changed.
"""

import json
import sys

import torch
import torch.distributed as dist

from modeling_awd_lstm import AwdLstmForCausalLM
from ulmfit.cli import leave_process_group
from ulmfit.optim import layer_groups
from ulmfit.trainer import ULMFiTTrainer, ULMFiTTrainingArguments
from ulmfit_tiny import imdb_texts, lm_corpus, tiny_config, word_tokenizer


def gather(value):
    """Every process's `value`, in rank order."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def main(output_file: str, batch_size: int, run_dir: str) -> None:
    texts = imdb_texts("test", limit=60)
    tokenizer = word_tokenizer(texts, vocab_size=800)
    train, evaluation = lm_corpus(tokenizer, texts[:50]), lm_corpus(tokenizer, texts[50:])

    args = ULMFiTTrainingArguments(
        output_dir=run_dir, use_cpu=True, report_to=[],
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size, lm_bptt=20,
        num_train_epochs=2, learning_rate=3e-2, unfreeze_schedule="gradual", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0,
    )
    torch.manual_seed(0)
    model = AwdLstmForCausalLM(tiny_config(tokenizer))
    initial = [[p.detach().clone() for p in group] for group in layer_groups(model)]
    trainer = ULMFiTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation)

    first_rows = trainer.get_train_dataloader().dataset.batch(0)["input_ids"][:, :5].tolist()
    before = trainer.evaluate()["eval_perplexity"]
    trainer.train()
    after = trainer.evaluate()["eval_perplexity"]

    checksum = sum(float(p.detach().double().sum()) * (i + 1) for i, p in enumerate(model.parameters()))
    changed = [
        any(not torch.equal(p, q) for p, q in zip(group, start))
        for group, start in zip(layer_groups(model), initial)
    ]
    report = {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "trainer_world_size": args.world_size,
        "first_rows": gather(first_rows),
        "checksums": gather(checksum),
        "changed_groups": changed,
        "perplexity_before": before,
        "perplexity_after": after,
    }
    if args.process_index == 0:
        with open(output_file, "w") as file:
            json.dump(report, file)
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
