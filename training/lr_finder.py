"""fastai's learning-rate range test (`Learner.lr_find`) for a `ULMFiTTrainer`.

The stage's own trainer settings run for up to `num_steps` optimizer steps while the rate grows exponentially from
`start_lr` to `end_lr`; the loss is smoothed as fastai's recorder smooths it, and the test stops once the smoothed
loss exceeds four times its best. Suggestions are fastai's, computed on the same part of the curve (the first tenth
and the last five steps left out): `valley` (fastai's default) and `minimum` (a tenth of the rate at the lowest
loss). The model's weights, which layers train, the data position and the random generators are restored afterwards,
so the real training that follows is the one it would have been.

The rates are the top layer group's: lower groups keep the stage's ratios (`discriminative_lr_factor`), so a
suggestion is a stage's `learning_rate` as it stands. With one rate for every group it is fastai's test exactly.
"""

import copy
import dataclasses
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .trainer import ULMFiTTrainer

SMOOTHING = 0.98  # fastai's Recorder: AvgSmoothLoss(beta=0.98)
DIVERGENCE = 4.0  # stop once the smoothed loss exceeds this many times its best


def exponential_rates(start_lr: float, end_lr: float, num_steps: int) -> list[float]:
    """The rate of each step i < num_steps: start_lr * (end_lr / start_lr) ** (i / num_steps), fastai's SchedExp."""
    return [start_lr * (end_lr / start_lr) ** (i / num_steps) for i in range(num_steps)]


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """fastai's debiased exponential moving average of the losses."""
    smoothed, average = [], 0.0
    for count, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**count))
    return smoothed


def valley(rates: list[float], losses: list[float]) -> float:
    """fastai's `valley`: within the longest run of falling losses (a longest decreasing subsequence), the rate a
    third plus a sixth of the way along it, where the loss falls fastest rather than where it bottoms out."""
    n = len(losses)
    longest = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[end] < longest[i]:
                end = i
                start = end - longest[end]
    sections = (end - start) / 3
    return float(rates[start + int(sections) + int(sections / 2)])


def minimum(rates: list[float], losses: list[float]) -> float:
    """fastai's `minimum`: a tenth of the rate at the lowest loss."""
    return float(rates[int(np.argmin(losses))]) / 10


@dataclass
class RangeTest:
    """The rates tried, the smoothed loss after each, and fastai's suggestions."""

    learning_rates: list[float]
    losses: list[float]
    valley: float
    minimum: float

    @classmethod
    def from_curve(cls, rates: list[float], losses: list[float], num_steps: int) -> "RangeTest":
        # As fastai: suggestions skip the first tenth of the planned steps and the last five taken, and stop at a NaN.
        considered_rates, considered = rates[num_steps // 10 : -5], losses[num_steps // 10 : -5]
        finite = next((i for i, loss in enumerate(considered) if math.isnan(loss)), len(considered))
        considered_rates, considered = considered_rates[:finite], considered[:finite]
        if len(considered) < 2:
            raise ValueError(
                f"The range test diverged after {len(losses)} steps, too few to suggest a rate: lower start_lr, or "
                f"raise num_steps."
            )
        return cls(rates, losses, valley(considered_rates, considered), minimum(considered_rates, considered))

    def plot(self, path: str | Path, skip_end: int = 5) -> Path:
        """fastai's plot: smoothed loss against the rate on a log scale, the suggestions marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rates, losses = self.learning_rates[:-skip_end] or self.learning_rates, self.losses[:-skip_end] or self.losses
        figure, axis = plt.subplots(figsize=(5.5, 3.6))
        axis.plot(rates, losses)
        for name, rate, color in (("valley", self.valley, "tab:red"), ("minimum", self.minimum, "tab:green")):
            loss = float(np.interp(np.log(rate), np.log(self.learning_rates), self.losses))
            axis.plot(rate, loss, "o", color=color, label=f"{name}: {rate:.2e}")
        axis.set_xscale("log")
        axis.set_xlabel("learning rate (top layer group)")
        axis.set_ylabel("smoothed training loss")
        axis.legend()
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=90)
        plt.close(figure)
        return path


class _RangeTestTrainer(ULMFiTTrainer):
    """The stage's trainer, with each step's rate set from the range and its loss recorded."""

    def __init__(self, *args, rates: list[float], stop_div: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.rates, self.stop_div = rates, stop_div
        self.raw_losses, self.smoothed, self._step_losses = [], [], []
        self._ratios = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._ratios is None:  # the groups' rates relative to the top group's, as the optimizer was built
            top = self.optimizer.param_groups[-1]["lr"] or 1.0
            self._ratios = [group["lr"] / top for group in self.optimizer.param_groups]
        rate = self.rates[self.state.global_step]
        for group, ratio in zip(self.optimizer.param_groups, self._ratios):
            group["lr"] = rate * ratio
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_losses.append(float(loss))
        if len(self._step_losses) == self.args.gradient_accumulation_steps:
            self._record(sum(self._step_losses) / len(self._step_losses))
            self._step_losses = []
        return loss

    def _record(self, loss: float) -> None:
        self.raw_losses.append(loss)
        self.smoothed = smooth(self.raw_losses)
        current = self.smoothed[-1]
        if math.isnan(current) or (self.stop_div and current > DIVERGENCE * min(self.smoothed)):
            self.control.should_training_stop = True


def find_learning_rate(
    trainer: ULMFiTTrainer,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    stop_div: bool = True,
) -> RangeTest:
    """Runs fastai's learning-rate range test with `trainer`'s model, data and settings, and restores the model.

    `trainer` itself is left as it was (a copy of its arguments trains, without saving, evaluating or logging), so
    `trainer.train()` may follow with the suggested rate set in its arguments.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"The range test needs 0 < start_lr < end_lr; got start_lr={start_lr}, end_lr={end_lr}.")
    num_steps = max(num_steps, 6)  # as fastai
    model = trainer.model
    weights = copy.deepcopy(model.state_dict())
    trainable = [parameter.requires_grad for parameter in model.parameters()]
    stream_state = trainer.train_dataset.state_dict() if hasattr(trainer.train_dataset, "state_dict") else None
    generators = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    rates = exponential_rates(start_lr, end_lr, num_steps)
    with tempfile.TemporaryDirectory() as scratch:
        args = dataclasses.replace(
            trainer.args, output_dir=scratch, max_steps=num_steps, save_strategy="no", eval_strategy="no",
            logging_strategy="no", report_to=[], disable_tqdm=True, push_to_hub=False, load_best_model_at_end=False,
        )
        finder = _RangeTestTrainer(
            model=model, args=args, train_dataset=trainer.train_dataset, data_collator=trainer.data_collator,
            processing_class=trainer.processing_class, rates=rates, stop_div=stop_div,
        )
        try:
            finder.train()
        finally:
            model.load_state_dict(weights)
            for parameter, requires_grad in zip(model.parameters(), trainable):
                parameter.requires_grad_(requires_grad)
            if stream_state is not None:
                trainer.train_dataset.load_state_dict(stream_state)
            torch.set_rng_state(generators[0])
            np.random.set_state(generators[1])
            random.setstate(generators[2])
    taken = len(finder.smoothed)
    return RangeTest.from_curve(rates[:taken], finder.smoothed, num_steps)


__all__ = ["RangeTest", "exponential_rates", "find_learning_rate", "minimum", "smooth", "valley"]
