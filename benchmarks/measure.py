"""Timing and memory helpers shared by both sides (no fastai or transformers import here)."""

import contextlib
import math
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch


class Stopwatch:
    """Wall time and this process's CPU time (all threads) since it was made. On a machine that other jobs share,
    CPU time barely moves when the wall time stretches, so ratios of CPU times show what contention hides."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


@dataclass
class BatchClock:
    """Wall and CPU time of each step, with the documents and tokens it processed."""

    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    docs: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    _watch: Stopwatch | None = None

    def start(self) -> None:
        self._watch = Stopwatch()

    def stop(self, docs: int = 0, tokens: int = 0) -> None:
        assert self._watch is not None, "stop() without start()"
        wall, cpu = self._watch.read()
        self.times.append(wall)
        self.cpu.append(cpu)
        self.docs.append(docs)
        self.tokens.append(tokens)
        self._watch = None

    def after(self, skip: int) -> dict:
        """The steps after the first `skip` (warm-up) ones."""
        return {
            "times": self.times[skip:], "cpu": self.cpu[skip:], "docs": self.docs[skip:], "tokens": self.tokens[skip:]
        }


def peak_rss_mb() -> float:
    """This process's peak resident memory so far: `VmHWM`, which starts afresh with the program (`ru_maxrss` keeps
    the high-water mark of the parent at fork time across exec, so it cannot go below the launcher's memory)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def autocast(precision: str):
    """bf16 autocast on CPU for "bf16" (matmuls and the LSTM kernels in bf16, softmax and losses in fp32)."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"Unknown precision {precision!r}.")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def nll_to_ppl(total_nll: float, count: int) -> float:
    return math.exp(total_nll / count)
