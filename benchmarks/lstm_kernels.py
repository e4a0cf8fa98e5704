"""Where oneDNN's fused bf16 LSTM trains faster than ours stepwise one, by layer size: the evidence for
`FUSED_BF16_TRAINING_MAX_HIDDEN`.

    python -m benchmarks.lstm_kernels                    # results in benchmarks/results/lstm_kernels.{md,json}
    python -m benchmarks.lstm_kernels --quick --out /tmp/k

Times forward and backward of one `AwdLstmLayer` over BPTT 70 under bf16 autocast, with weight dropout, for each
(input, hidden, batch) size and each kernel, alternating the kernels so that drift cancels; reports the median and the
ratio stepwise / fused (above 1: the fused kernel is faster).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from modeling_awd_lstm import kernels_awd_lstm
from modeling_awd_lstm.kernels_awd_lstm import cpu_has_bf16_kernels
from modeling_awd_lstm.modeling_awd_lstm import AwdLstmLayer

from .report import machine_info

# (input, hidden, batch): the experiments' 128/512 model (its first and middle layers), sizes between it and the full
# size, and the full size 400/1152 (its first and middle layers).
SIZES = [
    (128, 512, 64), (512, 512, 64), (128, 512, 32),
    (256, 640, 32), (640, 640, 32), (384, 768, 32), (768, 768, 32),
    (400, 1024, 32), (1024, 1024, 32), (400, 1152, 32), (1152, 1152, 32),
]
QUICK_SIZES = [(16, 32, 4), (32, 32, 4)]
BPTT = 70
KERNELS = {"fused": 1 << 30, "stepwise": 0}  # FUSED_BF16_TRAINING_MAX_HIDDEN that selects each


def time_step(layer: AwdLstmLayer, inputs: torch.Tensor, kernel: str) -> float:
    """Seconds for one forward and backward through `layer` under bf16 autocast, checking that `kernel` ran."""
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _ = layer(inputs)
    ran = "stepwise" if output.grad_fn.name() == "StepwiseLstmBackward" else "fused"
    if ran != kernel:
        raise RuntimeError(f"asked for the {kernel} kernel, the {ran} one ran")
    output.float().sum().backward()
    return time.perf_counter() - started


def measure(input_size: int, hidden_size: int, batch: int, rounds: int, warmup: int = 2) -> dict:
    torch.manual_seed(0)
    layer = AwdLstmLayer(input_size, hidden_size, weight_p=0.2).train()
    inputs = torch.randn(batch, BPTT, input_size, requires_grad=True)
    times = {kernel: [] for kernel in KERNELS}
    for round_index in range(warmup + rounds):
        order = list(KERNELS) if round_index % 2 == 0 else list(reversed(KERNELS))
        for kernel in order:
            kernels_awd_lstm.FUSED_BF16_TRAINING_MAX_HIDDEN = KERNELS[kernel]
            seconds = time_step(layer, inputs, kernel)
            layer.zero_grad(set_to_none=True)
            inputs.grad = None
            if round_index >= warmup:
                times[kernel].append(seconds)
    fused, stepwise = (statistics.median(times[kernel]) * 1000 for kernel in ("fused", "stepwise"))
    return {"input": input_size, "hidden": hidden_size, "batch": batch, "fused_ms": fused, "stepwise_ms": stepwise,
            "stepwise_over_fused": stepwise / fused}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="two tiny sizes, two rounds: a smoke test")
    args = parser.parse_args(argv)
    if not cpu_has_bf16_kernels():
        raise SystemExit("This CPU has no bf16 kernels (AVX-512 BF16 or AMX): there is no fused bf16 LSTM to compare.")
    threshold = kernels_awd_lstm.FUSED_BF16_TRAINING_MAX_HIDDEN
    sizes, rounds = (QUICK_SIZES, 2) if args.quick else (SIZES, args.rounds)
    rows = []
    try:
        for input_size, hidden_size, batch in sizes:
            rows.append(measure(input_size, hidden_size, batch, rounds))
            row = rows[-1]
            print(f"{input_size}->{hidden_size}, batch {batch}: fused {row['fused_ms']:.0f} ms, stepwise "
                  f"{row['stepwise_ms']:.0f} ms ({row['stepwise_over_fused']:.2f}x)", flush=True)
    finally:
        kernels_awd_lstm.FUSED_BF16_TRAINING_MAX_HIDDEN = threshold
    machine = {**machine_info(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    cpu = f"{machine['cpu']} ({', '.join(machine['bf16_hardware'])})"
    args.out.mkdir(parents=True, exist_ok=True)
    name = "lstm_kernels_quick" if args.quick else "lstm_kernels"
    (args.out / f"{name}.json").write_text(json.dumps({"machine": machine, "bptt": BPTT, "rounds": rounds,
                                                        "threshold": threshold, "rows": rows}, indent=1))
    lines = [
        "# Fused against stepwise bf16 LSTM training, by layer size",
        "",
        f"{cpu}, {machine['threads']} threads, torch {machine['torch']}. One `AwdLstmLayer` (weight dropout 0.2), "
        f"forward and backward over BPTT {BPTT} under bf16 autocast; medians of {rounds} alternating rounds. "
        f"`python -m benchmarks.lstm_kernels`. Layers up to hidden {threshold} train fused "
        "(`FUSED_BF16_TRAINING_MAX_HIDDEN`).",
        "",
        "| input -> hidden | batch | fused (ms) | stepwise (ms) | stepwise / fused |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['input']} -> {r['hidden']} | {r['batch']} | {r['fused_ms']:.0f} | {r['stepwise_ms']:.0f} | "
              f"{r['stepwise_over_fused']:.2f} |" for r in rows]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"Wrote {args.out / name}.md and .json")


if __name__ == "__main__":
    main()
