"""
Learning-rate schedules of ULMFiT and fastai, as `torch.optim.lr_scheduler.LambdaLR`s.

A `LambdaLR` sets each parameter group's rate to its own initial rate times a multiplier, so the ratios between the
layer groups set by discriminative fine-tuning are kept at every step.

- `get_stlr_schedule`: slanted triangular learning rates (Howard & Ruder 2018, eq. 3).
- `get_one_cycle_schedule`: fastai's `fit_one_cycle` (cosine warm-up and annealing, with Adam's beta1 cycling the
  other way).
- `get_fine_tune_schedule`: fastai's `fine_tune` (a one-cycle with only the top group trained, then a one-cycle over
  all groups with their own discriminative rates); pair it with gradual unfreezing `[(0, 1), (freeze_epochs, None)]`.

Every multiplier is a plain function bound with `functools.partial`, so a scheduler's `state_dict` holds only
numbers and a checkpoint reloads with `torch.load(weights_only=True)`, as the Trainer does.
"""

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from .optim import discriminative_learning_rates, even_mults

# fastai's `Learner.moms`: beta1 goes 0.95 -> 0.85 -> 0.95 over a one-cycle.
ONE_CYCLE_MOMS = (0.95, 0.85, 0.95)


# ----------------------------------------------------------------------------------------------------------------------
# Multipliers: functions of the step (0 = the first optimizer step)
# ----------------------------------------------------------------------------------------------------------------------
def slanted_triangular(step: int, num_training_steps: int, cut_frac: float = 0.1, ratio: float = 32.0) -> float:
    """
    STLR (ULMFiT, eq. 3): rises linearly from `1 / ratio` to 1 over the first `cut_frac` of the steps, then falls
    linearly back to `1 / ratio` at step `num_training_steps`.

    `cut = floor(T * cut_frac)` is at least 1, and `p` is kept at or above 0 (with the floor, eq. 3 would otherwise dip
    below `1 / ratio` on the last steps of a short run).
    """
    cut = max(1, math.floor(num_training_steps * cut_frac))
    if step < cut:
        p = step / cut
    else:
        p = 1 - (step - cut) / (cut * (1 / cut_frac - 1))
    return (1 + max(p, 0.0) * (ratio - 1)) / ratio


def cosine_anneal(start: float, end: float, pos: float) -> float:
    """From `start` (pos 0) to `end` (pos 1) along half a cosine (fastai's `sched_cos`)."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def one_cycle(step: int, num_training_steps: int, start: float, middle: float, end: float, pct_start: float) -> float:
    """fastai's `combined_cos`: `start` -> `middle` over the first `pct_start` of the steps, then -> `end`."""
    pos = step / num_training_steps
    if pos < pct_start:
        return cosine_anneal(start, middle, pos / pct_start)
    return cosine_anneal(middle, end, min((pos - pct_start) / (1 - pct_start), 1.0))


def phased(step: int, phases: Sequence[tuple[int, float, float, float, float]]) -> float:
    """
    One-cycles one after another. Each phase is `(num_steps, start, middle, end, pct_start)`; steps after the last
    phase keep its end value.
    """
    for num_steps, start, middle, end, pct_start in phases:
        if step < num_steps:
            return one_cycle(step, num_steps, start, middle, end, pct_start)
        step -= num_steps
    return phases[-1][3]


# ----------------------------------------------------------------------------------------------------------------------
# The scheduler
# ----------------------------------------------------------------------------------------------------------------------
class ULMFiTScheduler(LambdaLR):
    """
    A `LambdaLR` that can also schedule Adam's beta1 (fastai's momentum) with `beta1_lambda(step)`.

    The optimizer's state dict keeps the betas, so resuming from a checkpoint restores them.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_lambda: Callable[[int], float] | list[Callable[[int], float]],
        beta1_lambda: Callable[[int], float] | None = None,
        last_epoch: int = -1,
    ):
        # Set before LambdaLR's constructor, which takes the first step.
        self.beta1_lambda = beta1_lambda
        super().__init__(optimizer, lr_lambda, last_epoch)

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        if self.beta1_lambda is not None:
            beta1 = self.beta1_lambda(self.last_epoch)
            for group in self.optimizer.param_groups:
                group["betas"] = (beta1, group["betas"][1])

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("beta1_lambda", None)  # rebuilt by the constructor, like the lr lambdas
        return state


def _check_steps(num_training_steps: int) -> None:
    if num_training_steps < 1:
        raise ValueError(f"A schedule needs at least one training step; got num_training_steps={num_training_steps}.")


def get_stlr_schedule(
    optimizer: torch.optim.Optimizer, num_training_steps: int, cut_frac: float = 0.1, ratio: float = 32.0
) -> ULMFiTScheduler:
    """Slanted triangular learning rates: every group peaks at its own rate after `cut_frac` of the steps."""
    _check_steps(num_training_steps)
    if not 0 < cut_frac < 1 or ratio < 1:
        raise ValueError(f"STLR needs 0 < cut_frac < 1 and ratio >= 1; got cut_frac={cut_frac}, ratio={ratio}.")
    return ULMFiTScheduler(
        optimizer, partial(slanted_triangular, num_training_steps=num_training_steps, cut_frac=cut_frac, ratio=ratio)
    )


def _momentum(num_steps_and_pct: Sequence[tuple[int, float]], moms: Sequence[float]) -> Callable[[int], float]:
    return partial(phased, phases=tuple((n, *moms, pct) for n, pct in num_steps_and_pct))


def _check_one_cycle(pct_start: float, div: float, div_final: float, moms: Sequence[float]) -> None:
    if not 0 < pct_start < 1 or div <= 0 or div_final <= 0 or len(moms) != 3:
        raise ValueError(
            "A one-cycle needs 0 < pct_start < 1, div > 0, div_final > 0 and three moms (start, middle, end); got "
            f"pct_start={pct_start}, div={div}, div_final={div_final}, moms={tuple(moms)}."
        )


def get_one_cycle_schedule(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    pct_start: float = 0.25,
    div: float = 25.0,
    div_final: float = 1e5,
    moms: Sequence[float] = ONE_CYCLE_MOMS,
) -> ULMFiTScheduler:
    """
    fastai's `fit_one_cycle`: each group's rate goes from `lr / div` up to its `lr` over `pct_start` of the steps,
    then down to `lr / div_final`, along cosines; beta1 goes `moms[0]` -> `moms[1]` -> `moms[2]` at the same time.
    """
    _check_steps(num_training_steps)
    _check_one_cycle(pct_start, div, div_final, moms)
    lr_lambda = partial(phased, phases=((num_training_steps, 1 / div, 1.0, 1 / div_final, pct_start),))
    return ULMFiTScheduler(optimizer, lr_lambda, _momentum([(num_training_steps, pct_start)], moms))


def get_fine_tune_schedule(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_frozen_steps: int,
    lr_mult: float = 100.0,
    pct_start: float = 0.3,
    div: float = 5.0,
    div_final: float = 1e5,
    moms: Sequence[float] = ONE_CYCLE_MOMS,
) -> ULMFiTScheduler:
    """
    fastai's `Learner.fine_tune(epochs, base_lr, freeze_epochs, lr_mult, pct_start, div)`.

    `base_lr` is the top layer group's rate in `optimizer` (built by `ulmfit.optim.create_optimizer`, whose groups
    carry `"layer_group"`); the rates the optimizer gives the other groups are replaced by fastai's:

    1. `num_frozen_steps` (fastai's `freeze_epochs` epochs): a one-cycle with `pct_start=0.99` and `div=25` at
       `slice(base_lr)`, i.e. `base_lr` for the top group (the only one trained, apart from BatchNorm) and
       `base_lr / 10` below.
    2. The remaining steps, every group trained: a one-cycle with `pct_start` and `div` at
       `slice(base_lr / 2 / lr_mult, base_lr / 2)`.
    """
    _check_steps(num_training_steps)
    num_unfrozen_steps = num_training_steps - num_frozen_steps
    if num_frozen_steps < 1 or num_unfrozen_steps < 1:
        raise ValueError(
            f"fine_tune trains {num_frozen_steps} frozen step(s) then the rest unfrozen, but the run has "
            f"{num_training_steps} step(s) in all; train for more epochs than the frozen ones."
        )
    _check_one_cycle(pct_start, div, div_final, moms)
    if any("layer_group" not in group for group in optimizer.param_groups):
        raise ValueError(
            "fine_tune needs to know each parameter group's layer group: build the optimizer with "
            "ulmfit.optim.create_optimizer."
        )
    num_groups = 1 + max(group["layer_group"] for group in optimizer.param_groups)
    base_lr = max(group["lr"] for group in optimizer.param_groups if group["layer_group"] == num_groups - 1)
    frozen_lrs = discriminative_learning_rates(slice(base_lr), num_groups)
    unfrozen_lrs = even_mults(base_lr / 2 / lr_mult, base_lr / 2, num_groups)

    lr_lambdas = []
    for group in optimizer.param_groups:
        # LambdaLR multiplies the group's own initial rate: express fastai's rates relative to it.
        frozen_peak = frozen_lrs[group["layer_group"]] / group["lr"]
        unfrozen_peak = unfrozen_lrs[group["layer_group"]] / group["lr"]
        phases = (
            (num_frozen_steps, frozen_peak / 25.0, frozen_peak, frozen_peak / div_final, 0.99),
            (num_unfrozen_steps, unfrozen_peak / div, unfrozen_peak, unfrozen_peak / div_final, pct_start),
        )
        lr_lambdas.append(partial(phased, phases=phases))
    beta1_lambda = _momentum([(num_frozen_steps, 0.99), (num_unfrozen_steps, pct_start)], moms)
    return ULMFiTScheduler(optimizer, lr_lambdas, beta1_lambda)


__all__ = [
    "ONE_CYCLE_MOMS",
    "ULMFiTScheduler",
    "cosine_anneal",
    "get_fine_tune_schedule",
    "get_one_cycle_schedule",
    "get_stlr_schedule",
    "one_cycle",
    "phased",
    "slanted_triangular",
]
