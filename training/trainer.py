"""
ULMFiT on the transformers Trainer.

`ULMFiTTrainingArguments` adds ULMFiT's settings to `TrainingArguments` (so they are saved with the run and listed
by an `HfArgumentParser` CLI), and `ULMFiTTrainer` trains with them:

- the optimizer and schedule come from `ulmfit.optim` and `ulmfit.schedules` (discriminative rates over the
  layer groups, STLR, one-cycle or fastai's `fine_tune`), with gradual unfreezing from `ulmfit.unfreezing`;
- language-model stages read a `LanguageModelingStream` (built per process from a `TokenizedCorpus`) and carry the
  recurrent state from one batch to the next, as fastai does; evaluation reports perplexity computed the same way;
- classifier stages read length-grouped batches (`SortedBatchSampler`, `ClassificationCollator`);
- checkpoints hold the recurrent state too, and only appear under their final name once complete, so resuming an
  interrupted run ends where the uninterrupted run ends.
"""

import math
import os
import re
from dataclasses import dataclass, field
from typing import Literal

import datasets
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments, get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from modeling_awd_lstm import AwdLstmCache, AwdLstmForSequenceClassification, kernels_awd_lstm

from .data import ClassificationCollator, LanguageModelingStream, SortedBatchSampler, TokenizedCorpus
from .metrics import load_metric
from .optim import LearningRates, create_optimizer
from .schedules import get_fine_tune_schedule, get_one_cycle_schedule, get_stlr_schedule
from .unfreezing import GradualUnfreezingCallback, parse_unfreeze_schedule, set_trainable_groups

SCHEDULES = ("stlr", "one_cycle", "fine_tune", "constant", "cosine")
RECURRENT_STATE_NAME = "recurrent_state"
# Written into a checkpoint once everything else is there: a checkpoint without it (a save cut short) is not resumed.
COMPLETE_MARK = "ulmfit_checkpoint_complete"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The latest checkpoint in `folder` that a `ULMFiTTrainer` finished writing, or None."""
    if not os.path.isdir(folder):
        return None
    steps = {
        int(match.group(1)): name
        for name in os.listdir(folder)
        if (match := _CHECKPOINT.match(name)) and os.path.isfile(os.path.join(folder, name, COMPLETE_MARK))
    }
    return os.path.join(folder, steps[max(steps)]) if steps else None

logger = logging.get_logger(__name__)


def _has_accelerator() -> bool:
    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return torch.cuda.is_available() or xpu or torch.backends.mps.is_available()


@dataclass
class ULMFiTTrainingArguments(TrainingArguments):
    r"""
    [`TrainingArguments`] with ULMFiT's settings. `learning_rate` is the top layer group's rate.

    The optimizer defaults follow ULMFiT and fastai: `adam_beta1=0.7`, `adam_beta2=0.99` (the paper),
    `adam_epsilon=1e-5` and `weight_decay=0.01` (fastai's Adam). `lr_scheduler_type` is not used: `ulmfit_schedule`
    picks the schedule.
    """

    adam_beta1: float = field(
        default=0.7, metadata={"help": "Adam's beta1 (ULMFiT: 0.7). One-cycle schedules cycle it."}
    )
    adam_beta2: float = field(default=0.99, metadata={"help": "Adam's beta2 (ULMFiT: 0.99)."})
    adam_epsilon: float = field(default=1e-5, metadata={"help": "Adam's epsilon (fastai: 1e-5)."})
    weight_decay: float = field(
        default=0.01, metadata={"help": "Decoupled weight decay (fastai: 0.01); never on biases and norms."}
    )
    use_cache: bool = field(
        default=True,
        metadata={"help": "Written to the model config; the recurrent state is the cache, so keep it on."},
    )

    # Discriminative fine-tuning
    discriminative_lr_factor: float = field(
        default=2.6,
        metadata={
            "help": "Each layer group trains at the rate of the group above divided by this (ULMFiT: 2.6). A recipe's "
            "stage from random weights defaults to 1.0."
        },
    )
    discriminative_lr_min: float | None = field(
        default=None,
        metadata={
            "help": "The bottom group's rate; rates then grow geometrically up to learning_rate (fastai's "
            "slice(min, lr)), replacing discriminative_lr_factor."
        },
    )
    layer_learning_rates: list[float] | None = field(
        default=None, metadata={"help": "One rate per layer group, bottom to top; replaces the two settings above."}
    )

    # Schedule
    ulmfit_schedule: Literal["stlr", "one_cycle", "fine_tune", "constant", "cosine"] = field(
        default="stlr",
        metadata={
            "help": "stlr: slanted triangular rates (ULMFiT); one_cycle: fastai's fit_one_cycle; fine_tune: fastai's "
            "fine_tune (frozen one-cycle, then unfrozen one-cycle with its own rates); constant; cosine (with "
            "warmup_steps / warmup_ratio)."
        },
    )
    stlr_cut_frac: float = field(default=0.1, metadata={"help": "STLR: fraction of the steps raising the rate."})
    stlr_ratio: float = field(default=32.0, metadata={"help": "STLR: how much lower the lowest rate is than the peak."})
    one_cycle_pct_start: float = field(default=0.25, metadata={"help": "One-cycle: fraction of the steps warming up."})
    one_cycle_div: float = field(default=25.0, metadata={"help": "One-cycle: starting rate = peak / one_cycle_div."})
    one_cycle_div_final: float = field(
        default=1e5, metadata={"help": "One-cycle and fine_tune: final rate = peak / one_cycle_div_final."}
    )
    one_cycle_moms: list[float] = field(
        default_factory=lambda: [0.8, 0.7, 0.8],
        metadata={"help": "One-cycle and fine_tune: Adam's beta1 at the start, the peak and the end (fastai's text "
                          "learners: 0.8, 0.7, 0.8)."},
    )
    fine_tune_freeze_epochs: int = field(
        default=1,
        metadata={"help": "fine_tune: epochs with only the top layer group trained (counted in num_train_epochs)."},
    )
    fine_tune_lr_mult: float = field(
        default=100.0, metadata={"help": "fine_tune: the unfrozen phase spans slice(lr / 2 / lr_mult, lr / 2)."}
    )
    fine_tune_pct_start: float = field(default=0.3, metadata={"help": "fine_tune: pct_start of the unfrozen phase."})
    fine_tune_div: float = field(default=5.0, metadata={"help": "fine_tune: div of the unfrozen phase."})

    # Gradual unfreezing
    unfreeze_schedule: str | None = field(
        default=None,
        metadata={
            "help": "'gradual' (ULMFiT: one more layer group each epoch) or 'start:groups,...' entries, e.g. "
            "'0:1,1:2,3:all'. Unset: every group trains throughout (fine_tune sets its own)."
        },
    )
    unfreeze_unit: Literal["epoch", "step"] = field(
        default="epoch", metadata={"help": "Whether unfreeze_schedule counts epochs or optimizer steps."}
    )
    train_bn: bool = field(
        default=True, metadata={"help": "Keep BatchNorm layers trainable in frozen groups (fastai)."}
    )

    # Regularization and language-model batches
    ar_alpha: float | None = field(
        default=None, metadata={"help": "Activation regularization coefficient; unset keeps the model config's."}
    )
    tar_beta: float | None = field(
        default=None, metadata={"help": "Temporal activation regularization coefficient; unset keeps the config's."}
    )
    lm_bptt: int = field(default=72, metadata={"help": "Language models: tokens per row of a batch (fastai: 72)."})
    lm_variable_bptt: bool = field(
        default=False,
        metadata={"help": "Language models: draw each batch's length around lm_bptt, as AWD-LSTM does."},
    )
    lm_scale_lr_by_seq_len: bool = field(
        default=True,
        metadata={"help": "With lm_variable_bptt, scale each step's rates by seq_len / lm_bptt (AWD-LSTM)."},
    )

    def __post_init__(self):
        if self.bf16 and not self.use_cpu and not _has_accelerator():
            # A recipe written for GPUs still runs here: bf16 on a CPU-only machine is CPU autocast, which
            # transformers only allows with `use_cpu`.
            self.use_cpu = True
        if self.bf16 and self.use_cpu and not kernels_awd_lstm.cpu_has_bf16_kernels():
            logger.warning(
                "bf16 was asked for, but this CPU has no bf16 kernels (AVX-512 or AMX): bf16 autocast would run "
                "hundreds of times slower than fp32 here, so this run trains in fp32."
            )
            self.bf16 = False
        super().__post_init__()
        if self.discriminative_lr_factor <= 0:
            raise ValueError(f"discriminative_lr_factor must be positive; got {self.discriminative_lr_factor}.")
        if self.discriminative_lr_min is not None and not 0 < self.discriminative_lr_min <= self.learning_rate:
            raise ValueError(
                f"discriminative_lr_min must lie in (0, learning_rate={self.learning_rate}]; "
                f"got {self.discriminative_lr_min}."
            )
        if self.ulmfit_schedule not in SCHEDULES:
            raise ValueError(f"ulmfit_schedule must be one of {', '.join(SCHEDULES)}; got {self.ulmfit_schedule!r}.")
        if self.ulmfit_schedule == "fine_tune" and self.unfreeze_schedule is not None:
            raise ValueError(
                "fine_tune sets its own unfreezing (the top group for fine_tune_freeze_epochs, then all): leave "
                "unfreeze_schedule unset, or use another schedule."
            )
        if self.unfreeze_schedule is not None:
            parse_unfreeze_schedule(self.unfreeze_schedule)  # fails now, naming the problem, rather than mid-run
        if self.lm_bptt < 1:
            raise ValueError(f"lm_bptt must be positive; got {self.lm_bptt}.")

    @property
    def learning_rates(self) -> LearningRates:
        """The rates as `ulmfit.optim.create_optimizer` takes them."""
        if self.layer_learning_rates is not None:
            return list(self.layer_learning_rates)
        if self.discriminative_lr_min is not None:
            return slice(self.discriminative_lr_min, self.learning_rate)
        return self.learning_rate


class _StreamLoader(DataLoader):
    """
    A `LanguageModelingStream` as the Trainer reads it: whole batches, in order, never re-batched, sharded or
    shuffled by accelerate (each process reads its own rows).

    With variable BPTT the number of batches changes from epoch to epoch, while the Trainer counts the same number of
    steps in every epoch: `num_batches` is the fewest any planned epoch has, and the Trainer reads no more.
    """

    def __init__(self, stream: LanguageModelingStream, num_epochs: int = 1):
        super().__init__(stream, batch_size=None)
        self.num_batches = _fewest_batches(stream, num_epochs)

    def __len__(self) -> int:
        return self.num_batches


def _fewest_batches(stream: LanguageModelingStream, num_epochs: int) -> int:
    if not stream.variable_bptt:
        return len(stream)
    position = stream.state_dict()
    counts = []
    for epoch in range(num_epochs):
        stream.load_state_dict({"epoch": epoch, "batch_index": 0})
        counts.append(len(stream))
    stream.load_state_dict(position)
    return min(counts)


class _CompleteCheckpointCallback(TrainerCallback):
    """Adds to each checkpoint the Trainer has written what it lacks (each process's recurrent state), then marks it
    complete, once every process has written its part."""

    def __init__(self, trainer: "ULMFiTTrainer"):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self.trainer._save_recurrent_state(checkpoint)
        self.trainer.accelerator.wait_for_everyone()
        if args.should_save:
            with open(os.path.join(checkpoint, COMPLETE_MARK), "w") as mark:
                mark.write(f"{state.global_step}\n")


class _EpochStartCallback(TrainerCallback):
    """Lets the trainer position its data and reset the recurrent state before each epoch's first batch is read."""

    def __init__(self, trainer: "ULMFiTTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer._start_epoch()


class ULMFiTTrainer(Trainer):
    """
    [`Trainer`] for the three ULMFiT stages. Takes [`ULMFiTTrainingArguments`].

    `train_dataset` / `eval_dataset` may be:
    - a `TokenizedCorpus` (language-model stages): read as a `LanguageModelingStream` with `lm_bptt`, the per-device
      batch size and this process's rows (shuffled documents for training);
    - a `LanguageModelingStream` built by the caller, for this process (`rank=args.process_index`,
      `world_size=args.world_size`);
    - a tokenized `datasets.Dataset` with `input_ids` and `labels` (classifier stages): read in length-grouped
      batches padded by `ClassificationCollator` (made from `processing_class` unless a `data_collator` is given).

    An optimizer or scheduler passed with `optimizers=` or `optimizer_cls_and_kwargs=` is used instead of the one
    the arguments describe.
    """

    def __init__(self, model=None, args: ULMFiTTrainingArguments | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            args = ULMFiTTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, ULMFiTTrainingArguments):
            raise TypeError(
                "ULMFiTTrainer takes ULMFiTTrainingArguments (which carry the ULMFiT settings); "
                f"got {type(args).__name__}."
            )
        self.args = args  # the streams below are built from it before the Trainer stores it
        train_dataset = self._as_stream(train_dataset, train=True)
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: self._as_stream(dataset, train=False) for name, dataset in eval_dataset.items()}
        else:
            eval_dataset = self._as_stream(eval_dataset, train=False)
        if isinstance(model, AwdLstmForSequenceClassification) and data_collator is None:
            if processing_class is None:
                raise ValueError(
                    "Classifier batches are padded: pass processing_class (the tokenizer, for its pad id) or a "
                    "data_collator such as ulmfit.data.ClassificationCollator."
                )
            data_collator = ClassificationCollator(processing_class)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)

        for name in ("ar_alpha", "tar_beta"):
            if getattr(args, name) is not None:
                setattr(self.model.config, name, getattr(args, name))

        self._unfreezing = self._unfreezing_callback()
        if self._unfreezing is not None:
            self.add_callback(self._unfreezing)
        self.add_callback(_EpochStartCallback(self))
        self.add_callback(_CompleteCheckpointCallback(self))

        self._steps_per_epoch = None
        self._train_sampler = None
        self._train_cache = self._resumed_cache = None
        self._eval_cache, self._eval_batches = None, None  # set while a language-model stream is evaluated
        self._seq_lens, self._unscaled_lrs, self._lr_scaling_hooks = [], None, None
        self._perplexity = None

    # ---- Data ----

    def _as_stream(self, dataset, train: bool):
        """Turn a `TokenizedCorpus` into this process's stream; check a stream given ready-made."""
        args = self.args
        if isinstance(dataset, TokenizedCorpus):
            return LanguageModelingStream(
                dataset,
                batch_size=args.per_device_train_batch_size if train else args.per_device_eval_batch_size,
                bptt=args.lm_bptt,
                shuffle=train,
                seed=args.data_seed if args.data_seed is not None else args.seed,
                variable_bptt=train and args.lm_variable_bptt,
                rank=args.process_index,
                world_size=args.world_size,
            )
        if isinstance(dataset, LanguageModelingStream) and (dataset.rank, dataset.world_size) != (
            args.process_index,
            args.world_size,
        ):
            raise ValueError(
                f"The language-model stream reads rows for process {dataset.rank} of {dataset.world_size}, but this is "
                f"process {args.process_index} of {args.world_size}: build it with rank=args.process_index and "
                "world_size=args.world_size, or pass the TokenizedCorpus and let the trainer build it."
            )
        return dataset

    @property
    def _is_lm_training(self) -> bool:
        return isinstance(self.train_dataset, LanguageModelingStream)

    def _planned_epochs(self, loader_length: int) -> int:
        args = self.args
        if args.max_steps > 0:
            return math.ceil(args.max_steps * args.gradient_accumulation_steps / max(loader_length, 1)) + 1
        return max(math.ceil(args.num_train_epochs), 1)

    def get_train_dataloader(self) -> DataLoader:
        if self._is_lm_training:
            return _StreamLoader(self.train_dataset, self._planned_epochs(len(self.train_dataset)))
        if self._is_classification(self.train_dataset):
            loader, self._train_sampler = self._classification_loader(
                self.train_dataset, self.args.per_device_train_batch_size, shuffle=True
            )
            return loader
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        if isinstance(eval_dataset, str):
            dataset = self.eval_dataset[eval_dataset]
        else:
            dataset = self._as_stream(eval_dataset if eval_dataset is not None else self.eval_dataset, train=False)
        if isinstance(dataset, LanguageModelingStream):
            return _StreamLoader(dataset)
        if self._is_classification(dataset):
            return self._classification_loader(dataset, self.args.per_device_eval_batch_size, shuffle=False)[0]
        return super().get_eval_dataloader(eval_dataset)

    def _is_classification(self, dataset) -> bool:
        return isinstance(dataset, datasets.Dataset) and isinstance(self.model, AwdLstmForSequenceClassification)

    def _classification_loader(self, dataset: datasets.Dataset, batch_size: int, shuffle: bool):
        column = self.args.length_column_name
        lengths = dataset[column] if column in dataset.column_names else [len(ids) for ids in dataset["input_ids"]]
        sampler = SortedBatchSampler(
            lengths,
            batch_size,
            shuffle=shuffle,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            drop_last=shuffle and self.args.dataloader_drop_last,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader), sampler

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self._steps_per_epoch = values[1]  # num_update_steps_per_epoch, as the Trainer resumes with it
        return values

    def _start_epoch(self) -> None:
        # The Trainer moves a loader prepared by accelerate to the next epoch, but not a stream it reads directly,
        # nor (under DDP) the sampler two wrappers deep in the loader it rebuilds to skip what a resumed run has seen.
        epoch = self.state.global_step // self._steps_per_epoch
        if self._is_lm_training:
            self.train_dataset.load_state_dict({"epoch": epoch, "batch_index": 0})
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(epoch)
        # The recurrent state starts from zeros each epoch, unless a resumed run continues one mid-epoch.
        resumed_mid_epoch = self.state.global_step % self._steps_per_epoch != 0
        self._train_cache = self._resumed_cache if resumed_mid_epoch else None
        self._resumed_cache = None

    # ---- Optimizer and schedule ----

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            args = self.args
            self.optimizer = create_optimizer(
                model if model is not None else self.model,
                lr=args.learning_rates,
                discriminative_factor=args.discriminative_lr_factor,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                weight_decay=args.weight_decay,
            )
        optimizer = super().create_optimizer(model)
        scale_lrs = self._is_lm_training and self.train_dataset.variable_bptt and self.args.lm_scale_lr_by_seq_len
        if scale_lrs and self._lr_scaling_hooks is None:
            self._lr_scaling_hooks = (
                optimizer.register_step_pre_hook(self._scale_lrs_by_seq_len),
                optimizer.register_step_post_hook(self._restore_lrs),
            )
        return optimizer

    def _scale_lrs_by_seq_len(self, optimizer, *_) -> None:
        # AWD-LSTM: a shorter batch moves the weights proportionally less.
        scale = sum(self._seq_lens) / max(len(self._seq_lens), 1) / self.train_dataset.bptt
        self._unscaled_lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] *= scale

    def _restore_lrs(self, optimizer, *_) -> None:
        for group, lr in zip(optimizer.param_groups, self._unscaled_lrs):
            group["lr"] = lr
        self._seq_lens = []

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            # The Trainer's own scheduler first, for its bookkeeping (a scheduler it made is dropped after `train()`),
            # then the ULMFiT one in its place: both are LambdaLRs over the same base rates, so the last one built sets
            # every group's rate.
            super().create_scheduler(num_training_steps, optimizer)
            args = self.args
            optimizer = optimizer if optimizer is not None else self.optimizer
            if args.ulmfit_schedule == "stlr":
                scheduler = get_stlr_schedule(optimizer, num_training_steps, args.stlr_cut_frac, args.stlr_ratio)
            elif args.ulmfit_schedule == "one_cycle":
                scheduler = get_one_cycle_schedule(
                    optimizer, num_training_steps, args.one_cycle_pct_start, args.one_cycle_div,
                    args.one_cycle_div_final, args.one_cycle_moms,
                )
            elif args.ulmfit_schedule == "fine_tune":
                scheduler = get_fine_tune_schedule(
                    optimizer, num_training_steps, args.fine_tune_freeze_epochs * self._steps_per_epoch,
                    args.fine_tune_lr_mult, args.fine_tune_pct_start, args.fine_tune_div, args.one_cycle_div_final,
                    args.one_cycle_moms,
                )
            else:
                # transformers' constant and cosine schedules are LambdaLRs too: the ratios between groups hold.
                scheduler = get_scheduler(
                    args.ulmfit_schedule,
                    optimizer,
                    num_warmup_steps=args.get_warmup_steps(num_training_steps),
                    num_training_steps=num_training_steps,
                )
            self.lr_scheduler = scheduler
        return self.lr_scheduler

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "learning_rate" in logs and self.lr_scheduler is not None:
            # The top layer group's rate (the base rate), not the bottom group's, is the run's `learning_rate`.
            logs["learning_rate"] = self.lr_scheduler.get_last_lr()[-1]
        super().log(logs, start_time)

    def _unfreezing_callback(self) -> GradualUnfreezingCallback | None:
        args = self.args
        if args.ulmfit_schedule == "fine_tune":
            schedule, unit = [(0, 1), (args.fine_tune_freeze_epochs, None)], "epoch"
        elif args.unfreeze_schedule is not None:
            schedule, unit = parse_unfreeze_schedule(args.unfreeze_schedule), args.unfreeze_unit
        else:
            return None
        if any(isinstance(callback, GradualUnfreezingCallback) for callback in self.callback_handler.callbacks):
            raise ValueError(
                "The arguments ask for gradual unfreezing and a GradualUnfreezingCallback was passed too: use one."
            )
        return GradualUnfreezingCallback(schedule, unit=unit, train_bn=args.train_bn)

    # ---- Training ----

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir}).")
        if resume_from_checkpoint:
            self._resumed_cache = self._load_recurrent_state(resume_from_checkpoint)
        if self._unfreezing is not None:
            # DDP only synchronises parameters that are trainable when it wraps the model; the callback freezes after.
            set_trainable_groups(self.model, None)
        if self.args.world_size > 1 and self.model_wrapped is self.model:
            # An `evaluate()` before training prepared the model for evaluation, and accelerate then marks it as
            # prepared: training would skip the DDP wrap and each process would train its own copy. Let it wrap
            # (neither accelerate nor the Trainer has a public way to undo the mark).
            self.model._is_accelerate_prepared = False
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        if not (self._is_lm_training and model.training):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Row i of this batch continues row i of the previous one: start from the state it ended in, detached
        # (truncated backpropagation through time).
        loss, outputs = super().compute_loss(
            model, {**inputs, "cache": self._train_cache, "use_cache": True}, return_outputs=True,
            num_items_in_batch=num_items_in_batch,
        )
        self._train_cache = outputs.cache.detach()
        self._seq_lens.append(inputs["input_ids"].shape[1])
        return (loss, outputs) if return_outputs else loss

    # ---- Evaluation ----

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        if not isinstance(dataloader, _StreamLoader):
            return super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        self._eval_cache, self._eval_batches = None, []
        output = super().evaluation_loop(dataloader, description, True, ignore_keys, metric_key_prefix)
        # Perplexity weighs each batch by its tokens (the last batch of a stream is shorter), over every process.
        losses = self.accelerator.gather(torch.stack([loss for loss, _ in self._eval_batches]))
        num_tokens = self.accelerator.gather(torch.stack([count for _, count in self._eval_batches]))
        if self._perplexity is None:
            self._perplexity = load_metric("perplexity", keep_in_memory=True)
        result = self._perplexity.compute(loss=losses.tolist(), num_tokens=num_tokens.tolist())
        output.metrics[f"{metric_key_prefix}_loss"] = result["loss"]
        output.metrics[f"{metric_key_prefix}_perplexity"] = result["perplexity"]
        self._eval_cache, self._eval_batches = None, None
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self._eval_batches is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        # A language-model stream: carry the state through the evaluation as through training.
        inputs = {name: value.to(self.args.device) if isinstance(value, torch.Tensor) else value
                  for name, value in inputs.items()}
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs, cache=self._eval_cache, use_cache=True)
        self._eval_cache = outputs.cache
        loss = outputs.loss.detach().float()
        self._eval_batches.append((loss, (inputs["shift_labels"] != -100).sum()))
        return loss, None, None

    # ---- Checkpoints ----

    def _recurrent_state_file(self, checkpoint_dir: str) -> str:
        suffix = f"_{self.args.process_index}" if self.args.world_size > 1 else ""
        return os.path.join(checkpoint_dir, f"{RECURRENT_STATE_NAME}{suffix}.pt")

    def _save_recurrent_state(self, checkpoint_dir: str) -> None:
        if self._train_cache is None:
            return
        os.makedirs(checkpoint_dir, exist_ok=True)
        states = [[h, c] for h, c in self._train_cache.states]
        torch.save({"states": states}, self._recurrent_state_file(checkpoint_dir))

    def _load_recurrent_state(self, checkpoint_dir: str) -> AwdLstmCache | None:
        path = self._recurrent_state_file(checkpoint_dir)
        if not os.path.isfile(path):
            return None
        saved = torch.load(path, map_location=self.args.device, weights_only=True)
        return AwdLstmCache([(h, c) for h, c in saved["states"]])


__all__ = ["SCHEDULES", "ULMFiTTrainer", "ULMFiTTrainingArguments", "last_complete_checkpoint"]
