"""What each experiment trains: data sizes, epochs, rates, batch sizes, dropouts, for the full runs and `--quick`.

One `TaskSettings` fixes everything both implementations share for a task. Stage 2 (LM fine-tuning) is fastai's
`fine_tune` on both sides; stage 3 (classifier) is the paper's recipe: discriminative rates (factor 2.6), STLR
(cut_frac 0.1, ratio 32) over the whole run and gradual unfreezing (one more layer group per epoch). Model sizes, BPTT
and `max_len` come from the stage-1 model.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from modeling_awd_lstm import cpu_has_bf16_kernels

TASKS = ("trec6", "imdb")
# fastai's `TextLearner` cycles Adam's beta1 through these in `fit_one_cycle` (and so in `fine_tune`), not through
# `Learner`'s (0.95, 0.85, 0.95); they are also the trainer's default `one_cycle_moms`.
TEXT_LEARNER_MOMS = (0.8, 0.7, 0.8)
# Where the experiments' training differs from `ulmfit`'s stages, each setting with its reason; the report prints them.
DIFFERENCES_FROM_ULMFIT = {
    "max_grad_norm": (0.0, "no gradient clipping, as fastai's side (the `ulmfit` stages clip at 1.0)"),
    "save_strategy": ("no", "no checkpoints: a run is redone whole"),
}
# The paper's full-scale test errors (Howard & Ruder 2018, tables 2 and 3).
PAPER_ERRORS = {"imdb": 4.6, "trec6": 3.6}


@dataclass(frozen=True)
class TaskSettings:
    task: str
    quick: bool = False
    # Data. IMDb: a balanced random subset of `labels` train reviews and `test_docs` test reviews; the LM text is
    # `unsup_docs` unlabelled reviews + the labelled subset. TREC-6: every question of train_5500 (or `labels` of
    # them) and of TREC_10 (or `test_docs`). `max_tokens`: classifiers read only the last N tokens of a document.
    labels: int | None = None
    test_docs: int | None = None
    unsup_docs: int = 0
    max_tokens: int | None = None
    lm_valid_fraction: float = 0.1  # of the LM text, held out for the stage-2 perplexity
    data_seed: int = 0
    # Stage-2 vocabulary: fastai's `make_vocab` rule over the task's LM text.
    max_vocab: int = 60000
    min_freq: int = 3
    # Stage 2: fastai `fine_tune(lm_epochs, lm_lr)` = 1 frozen epoch + `lm_epochs` unfrozen.
    lm_epochs: int = 3
    lm_lr: float = 1e-2
    lm_batch_size: int = 32
    lm_drop_mult: float = 0.3
    # Stage 3.
    clas_epochs: int = 5
    clas_lr: float = 1e-2
    clas_batch_size: int = 32
    clas_drop_mult: float = 0.5
    discriminative_factor: float = 2.6
    stlr_cut_frac: float = 0.1
    stlr_ratio: float = 32.0
    # bf16 CPU autocast on both sides where the CPU has bf16 kernels (AVX-512 BF16 or AMX); fp32 elsewhere.
    precision: str = field(default_factory=lambda: "bf16" if cpu_has_bf16_kernels() else "fp32")

    @property
    def lm_total_epochs(self) -> int:
        return self.lm_epochs + 1

    def data_signature(self) -> dict:
        """What decides the documents and the stage-2 LM; a change gives a new stage-2 folder."""
        names = ("task", "quick", "labels", "test_docs", "unsup_docs", "max_tokens", "lm_valid_fraction", "data_seed",
                 "max_vocab", "min_freq", "lm_epochs", "lm_lr", "lm_batch_size", "lm_drop_mult", "precision")
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FULL = {
    "trec6": TaskSettings("trec6", min_freq=2, lm_epochs=5, lm_batch_size=32, clas_batch_size=32),
    "imdb": TaskSettings("imdb", labels=2000, test_docs=2000, unsup_docs=2000, min_freq=3, lm_epochs=3,
                         lm_batch_size=32, clas_batch_size=32),
}
QUICK = {
    "trec6": TaskSettings("trec6", quick=True, labels=240, test_docs=60, min_freq=2, lm_epochs=1, lm_batch_size=8,
                          clas_epochs=2, clas_batch_size=8),
    "imdb": TaskSettings("imdb", quick=True, labels=40, test_docs=40, unsup_docs=40, max_tokens=120, min_freq=2,
                         lm_epochs=1, lm_batch_size=8, clas_epochs=2, clas_batch_size=8),
}
LOWSHOT_LABELS = {False: (100, 500, 1000, 5000), True: (10, 20)}
# Low-shot classifiers train at least this many optimizer steps (more epochs on fewer labels): 5 epochs of 100 reviews
# at batch 32 are 15 steps, too few to leave chance; 150 steps is what 5 epochs of 1,000 reviews take.
LOWSHOT_MIN_STEPS = {False: 150, True: 4}
# The from-scratch classifier's peak rate: at the recipe's 1e-2 (tuned for pretrained encoders) it stays at chance.
LOWSHOT_SCRATCH_LR = 2e-3


def lowshot_settings(settings: TaskSettings, labels: int, use_scratch_lr: bool, min_steps: int, scratch_lr: float
                     ) -> TaskSettings:
    """`settings` for one low-shot classifier: enough epochs for `min_steps` steps, and the from-scratch classifier's
    peak rate where `use_scratch_lr`."""
    batch_size = min(settings.clas_batch_size, labels)
    steps_per_epoch = labels // batch_size  # the last partial batch is dropped, as fastai does
    epochs = max(settings.clas_epochs, -(-min_steps // steps_per_epoch))
    return dataclasses.replace(settings, clas_epochs=epochs, clas_lr=scratch_lr if use_scratch_lr else settings.clas_lr)


def task_settings(task: str, quick: bool, **overrides) -> TaskSettings:
    """The settings of `task`, with the command line's values (None: keep the default) put in."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if overrides.get("precision") == "bf16" and not cpu_has_bf16_kernels():
        raise ValueError(
            "--precision bf16 needs a CPU with bf16 kernels (AVX-512 BF16 or AMX), and this one has none: oneDNN has "
            "no bf16 LSTM here, so fastai's side cannot run. Use --precision fp32."
        )
    base = (QUICK if quick else FULL)[task]
    return dataclasses.replace(base, **{name: value for name, value in overrides.items() if value is not None})


def signature(values: dict) -> str:
    """A short stable hash of JSON-able values: names the folder of what they decide."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]
