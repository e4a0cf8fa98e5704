"""Peak memory of one classifier training step, ours or fastai, in this process (run each side in its own process).

    python -m benchmarks.clas_memory ours --longest 1900 --shortest 1400 --batch-size 8
    python -m benchmarks.clas_memory fastai --longest 1900 --shortest 1400 --batch-size 8

Full-size AWD-LSTM classifier (400/1152/3, vocab 30k, BPTT 72, max_len 1,440) in train mode, one batch of random
token ids whose lengths spread evenly from `--longest` down to `--shortest`, in fp32 or under bf16 autocast
(`--precision`); prints the growth of the process's peak RSS over the forward pass and over forward + backward.
"""

import argparse
import resource

import torch

VOCAB, BPTT, MAX_LEN = 30000, 72, 1440


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_step(side: str, docs: list[torch.Tensor]):
    """The model and a closure returning the step's loss, for each implementation's own batch layout."""
    batch, longest = len(docs), max(len(d) for d in docs)
    labels = torch.zeros(batch, dtype=torch.long)
    ids = torch.full((batch, longest), 1)
    if side == "ours":
        from modeling_awd_lstm import AwdLstmConfig, AwdLstmForSequenceClassification

        config = AwdLstmConfig(vocab_size=VOCAB, emb_size=400, hidden_size=1152, num_layers=3, bptt=BPTT,
                               max_len=MAX_LEN, num_labels=2)
        model = AwdLstmForSequenceClassification(config).train()
        mask = torch.zeros_like(ids)
        for row, doc in enumerate(docs):
            ids[row, : len(doc)], mask[row, : len(doc)] = doc, 1
        return lambda: model(ids, attention_mask=mask, labels=labels).loss
    from fastai.text.all import AWD_LSTM, get_text_classifier

    model = get_text_classifier(AWD_LSTM, VOCAB, 2, seq_len=BPTT, max_len=MAX_LEN).train()
    for row, doc in enumerate(docs):
        ids[row, longest - len(doc) :] = doc  # fastai pads classifier batches on the left
    return lambda: torch.nn.functional.cross_entropy(model(ids)[0], labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["ours", "fastai"])
    parser.add_argument("--longest", type=int, default=1900)
    parser.add_argument("--shortest", type=int, default=1400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: CPU autocast")
    args = parser.parse_args()
    torch.manual_seed(0)
    lengths = torch.linspace(args.longest, args.shortest, args.batch_size).long().tolist()
    step = training_step(args.side, [torch.randint(4, VOCAB, (n,)) for n in lengths])
    before = peak_mb()
    with torch.autocast("cpu", torch.bfloat16, enabled=args.precision == "bf16"):
        loss = step()
    forward = peak_mb()
    loss.backward()
    print(f"{args.side} {args.precision}: batch {args.batch_size}, lengths {args.longest}-{args.shortest}: peak RSS "
          f"+{forward - before:,.0f} MB after the forward pass, +{peak_mb() - before:,.0f} MB after the backward pass")


if __name__ == "__main__":
    main()
