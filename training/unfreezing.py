"""
Gradual unfreezing (ULMFiT, section 3.3): train the top layer group first, then one more group at a time.

`GradualUnfreezingCallback` decides from the global step alone how many groups train, so a run resumed from a
checkpoint freezes the same groups as the run it continues. Frozen parameters get `requires_grad=False`: they get no
gradient, and the optimizer (which holds every group from the start) leaves them untouched.

Under DistributedDataParallel the model must reach DDP with every parameter trainable: DDP only synchronises the
gradients of parameters that required one when it wrapped the model, so a group frozen then would train apart on each
process once unfrozen. The callback therefore freezes after the Trainer has wrapped the model (at `on_train_begin`),
and DDP must be told that some parameters go without gradients (`find_unused_parameters=True`, the Trainer's
default).
"""

import math
from collections.abc import Sequence

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .optim import layer_groups, norm_parameter_ids

logger = logging.get_logger(__name__)

# `(start, num_trainable)`: from epoch (or step) `start` on, the top `num_trainable` layer groups train; None = all.
UnfreezeSchedule = list[tuple[int, int | None]]
_NOT_APPLIED = object()  # no freezing applied yet in this run


def set_trainable_groups(model: nn.Module, num_trainable: int | None, train_bn: bool = True) -> None:
    """
    Train the top `num_trainable` layer groups of `model` and freeze the others (fastai's `freeze_to(-num_trainable)`;
    None trains every group).

    With `train_bn` (fastai's default) normalization layers stay trainable inside frozen groups.
    """
    groups = layer_groups(model)
    if num_trainable is not None and num_trainable < 1:
        raise ValueError(f"At least one layer group must train; got num_trainable={num_trainable}.")
    first_trainable = 0 if num_trainable is None else max(0, len(groups) - num_trainable)
    always_trainable = norm_parameter_ids(model) if train_bn else set()
    for index, group in enumerate(groups):
        for parameter in group:
            parameter.requires_grad_(index >= first_trainable or id(parameter) in always_trainable)


def parse_unfreeze_schedule(text: str) -> UnfreezeSchedule | None:
    """
    Read a schedule written `"start:groups,start:groups,..."`, e.g. `"0:1,1:2,2:3,3:all"` (fastai's `freeze()`,
    `freeze_to(-2)`, `freeze_to(-3)`, `unfreeze()` at epochs 0 to 3). `"gradual"` is the paper's schedule (one more
    group each epoch) and returns None.
    """
    text = text.strip()
    if text == "gradual":
        return None
    schedule = []
    for entry in text.split(","):
        start, sep, groups = entry.partition(":")
        try:
            if not sep:
                raise ValueError
            schedule.append((int(start), None if groups.strip() == "all" else int(groups)))
        except ValueError:
            raise ValueError(
                f"Cannot read the unfreezing schedule {text!r}: write 'gradual', or 'start:groups' entries separated "
                "by commas, e.g. '0:1,1:2,3:all' (groups is a count of top layer groups, or 'all')."
            ) from None
    return check_unfreeze_schedule(schedule)


def check_unfreeze_schedule(schedule: Sequence[tuple[int, int | None]]) -> UnfreezeSchedule:
    """Validate a schedule: it starts at 0, its starts increase, and each entry trains at least one group."""
    schedule = [(int(start), None if groups is None else int(groups)) for start, groups in schedule]
    starts = [start for start, _ in schedule]
    if not schedule or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"An unfreezing schedule must start at 0 and its starts must increase; got {schedule}.")
    if any(groups is not None and groups < 1 for _, groups in schedule):
        raise ValueError(f"Each entry of an unfreezing schedule must train at least one group; got {schedule}.")
    return schedule


class GradualUnfreezingCallback(TrainerCallback):
    """
    Freezes and unfreezes layer groups (see `ulmfit.optim.layer_groups`) as training goes.

    Args:
        schedule: `[(start, num_trainable), ...]`: from epoch (or step) `start` on, the top `num_trainable` groups
            train (None: all). The default is the paper's: the top group alone in the first epoch, one more group
            each epoch after. fastai's `fine_tune` is `[(0, 1), (freeze_epochs, None)]`.
        unit: whether `start` counts epochs or optimizer steps.
        train_bn: keep normalization layers trainable in frozen groups (fastai's `train_bn=True`).
        clear_optimizer_state: forget the optimizer's moments each time more groups train, as fastai's `freeze_to`
            and `unfreeze` do (the moments of the groups trained so far were gathered for a different problem).
    """

    def __init__(
        self,
        schedule: Sequence[tuple[int, int | None]] | None = None,
        unit: str = "epoch",
        train_bn: bool = True,
        clear_optimizer_state: bool = True,
    ):
        if unit not in ("epoch", "step"):
            raise ValueError(f"The unfreezing unit must be 'epoch' or 'step'; got {unit!r}.")
        self.schedule = None if schedule is None else check_unfreeze_schedule(schedule)
        self.unit = unit
        self.train_bn = train_bn
        self.clear_optimizer_state = clear_optimizer_state
        self._num_trainable = _NOT_APPLIED

    def num_trainable(self, index: int) -> int | None:
        """How many top groups train at epoch (or step) `index`; None means all."""
        if self.schedule is None:
            return index + 1
        return next(groups for start, groups in reversed(self.schedule) if start <= index)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if args.world_size > 1:
            if args.ddp_find_unused_parameters is False:
                raise ValueError(
                    "Gradual unfreezing leaves frozen parameters without gradients, which DDP rejects with "
                    "ddp_find_unused_parameters=False: leave it unset (or True)."
                )
            frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
            if frozen:
                raise ValueError(
                    f"Parameters {frozen[:3]}{'...' if len(frozen) > 3 else ''} were frozen before training started, "
                    "so DDP will never synchronise their gradients: pass the model with every parameter trainable and "
                    "let GradualUnfreezingCallback freeze it."
                )
        self._num_trainable = _NOT_APPLIED
        self._update(args, state, model, **kwargs)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs) -> None:
        self._update(args, state, model, **kwargs)

    def on_step_begin(self, args, state, control, model=None, **kwargs) -> None:
        if self.unit == "step":
            self._update(args, state, model, **kwargs)

    def _update(
        self, args: TrainingArguments, state: TrainerState, model: nn.Module, train_dataloader=None, optimizer=None,
        **kwargs,
    ):
        # Derived from the global step, like the Trainer's own position when it resumes a checkpoint.
        per_unit = 1 if self.unit == "step" else steps_per_epoch(args, train_dataloader)
        index = state.global_step // per_unit
        num_trainable = self.num_trainable(index)
        if num_trainable != self._num_trainable:
            # A phase starts here (also when a resumed run starts exactly where one began): fastai forgets the
            # optimizer's moments there.
            previous = self.num_trainable((state.global_step - 1) // per_unit) if state.global_step else num_trainable
            starts_phase = previous != num_trainable
            if self.clear_optimizer_state and starts_phase and optimizer is not None:
                getattr(optimizer, "optimizer", optimizer).state.clear()
            set_trainable_groups(model, num_trainable, self.train_bn)
            num_groups = len(layer_groups(model))
            shown = num_groups if num_trainable is None else min(num_trainable, num_groups)
            logger.info(f"Gradual unfreezing: from {self.unit} {index}, the top {shown} of {num_groups} groups train")
            self._num_trainable = num_trainable

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        # A trained model is handed back whole, trainable everywhere.
        set_trainable_groups(model, None)
        self._num_trainable = _NOT_APPLIED


def steps_per_epoch(args: TrainingArguments, train_dataloader) -> int:
    """Optimizer steps in an epoch, as the Trainer counts them."""
    if train_dataloader is None:
        raise ValueError("Counting epochs needs the training dataloader; use unit='step' where there is none.")
    return max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1)


__all__ = [
    "GradualUnfreezingCallback",
    "UnfreezeSchedule",
    "check_unfreeze_schedule",
    "parse_unfreeze_schedule",
    "set_trainable_groups",
    "steps_per_epoch",
]
