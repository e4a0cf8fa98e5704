"""Gradual unfreezing: which parameters train during each epoch (or step), and fastai's freezing rules."""

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

from modeling_awd_lstm import AwdLstmForSequenceClassification
from scripts.ulmfit_tiny import (
    classification_dataset,
    single_thread,  # noqa: F401  (a fixture, used by pytestmark)
    tiny_config,
    word_tokenizer,
)
from ulmfit.optim import layer_groups
from ulmfit.trainer import ULMFiTTrainer, ULMFiTTrainingArguments
from ulmfit.unfreezing import GradualUnfreezingCallback, parse_unfreeze_schedule, set_trainable_groups

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokenizer(imdb_texts):
    return word_tokenizer(imdb_texts, vocab_size=500)


@pytest.fixture(scope="module")
def reviews(tokenizer):
    # 48 reviews cut to 40 tokens, 12 a batch: 4 optimizer steps an epoch.
    return classification_dataset(tokenizer, "train", limit=48, max_length=40)


def classifier(tokenizer) -> AwdLstmForSequenceClassification:
    torch.manual_seed(0)
    return AwdLstmForSequenceClassification(tiny_config(tokenizer, num_labels=2))


class ChangedGroups(TrainerCallback):
    """Records, for each epoch (or each step), the layer groups whose parameters changed."""

    def __init__(self, per: str = "epoch"):
        self.per, self.changed, self.frozen_equal = per, [], []

    def _begin(self, model):
        self.before = [[p.detach().clone() for p in group] for group in layer_groups(model)]

    def _end(self, model):
        changed = set()
        for index, (group, before) in enumerate(zip(layer_groups(model), self.before)):
            if not all(torch.equal(p, b) for p, b in zip(group, before)):
                changed.add(index)
        self.changed.append(changed)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if self.per == "epoch":
            self._begin(model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.per == "epoch":
            self._end(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.per == "step":
            self._begin(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.per == "step":
            self._end(model)


def train(tokenizer, reviews, tmp_path, recorder, **settings):
    args = ULMFiTTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=12, learning_rate=1e-2, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, **settings,
    )
    model = classifier(tokenizer)
    trainer = ULMFiTTrainer(
        model=model, args=args, train_dataset=reviews, processing_class=tokenizer, callbacks=[recorder]
    )
    trainer.train()
    return model


def test_the_paper_s_schedule_unfreezes_one_more_group_each_epoch(tokenizer, reviews, tmp_path):
    recorder = ChangedGroups()
    model = train(tokenizer, reviews, tmp_path, recorder, num_train_epochs=4, unfreeze_schedule="gradual")
    # Groups: 0 embedding, 1-3 LSTMs, 4 head. Frozen groups stay bit-identical (checked with torch.equal).
    assert recorder.changed == [{4}, {3, 4}, {2, 3, 4}, {1, 2, 3, 4}]
    assert all(p.requires_grad for p in model.parameters())  # handed back trainable


def test_fastai_style_schedule_in_steps(tokenizer, reviews, tmp_path):
    # fastai: freeze(), freeze_to(-3) after 2 steps, unfreeze() after 5.
    recorder = ChangedGroups(per="step")
    train(tokenizer, reviews, tmp_path, recorder, num_train_epochs=2, unfreeze_schedule="0:1,2:3,5:all",
          unfreeze_unit="step")
    assert recorder.changed == [{4}, {4}, {2, 3, 4}, {2, 3, 4}, {2, 3, 4}, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4},
                                {0, 1, 2, 3, 4}]


class AdamSteps(TrainerCallback):
    """Records, after each step, how many steps Adam's state of the head's last weight has seen."""

    steps: list[int]

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        head_weight = layer_groups(model)[-1][-1]
        self.steps.append(int(getattr(optimizer, "optimizer", optimizer).state[head_weight]["step"]))


def test_each_unfreezing_forgets_the_optimizer_moments_as_fastai_does(tokenizer, reviews, tmp_path):
    recorder = AdamSteps()
    train(tokenizer, reviews, tmp_path, recorder, num_train_epochs=2, unfreeze_schedule="0:1,2:3,5:all",
          unfreeze_unit="step")
    # fastai's freeze_to / unfreeze clear the optimizer's state: Adam starts afresh at steps 2 and 5.
    assert recorder.steps == [1, 2, 1, 2, 3, 1, 2, 3]


def test_fine_tune_trains_the_head_alone_for_its_frozen_epoch(tokenizer, reviews, tmp_path):
    recorder = ChangedGroups()
    train(tokenizer, reviews, tmp_path, recorder, num_train_epochs=3, ulmfit_schedule="fine_tune")
    assert recorder.changed == [{4}, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}]


def test_batchnorm_stays_trainable_in_frozen_groups_with_train_bn(tokenizer):
    model = classifier(tokenizer)
    # The AWD-LSTM's only BatchNorms sit in the head (the top group); put one in the bottom LSTM group to see it.
    model.model.layers[0].norm = nn.BatchNorm1d(4)
    set_trainable_groups(model, 1, train_bn=True)
    assert model.model.layers[0].norm.weight.requires_grad
    assert not model.model.layers[0].lstm.weight_hh_l0.requires_grad
    assert all(p.requires_grad for p in model.classifier.parameters())
    set_trainable_groups(model, 1, train_bn=False)
    assert not model.model.layers[0].norm.weight.requires_grad
    set_trainable_groups(model, None)
    assert all(p.requires_grad for p in model.parameters())


def test_schedules_are_read_and_checked():
    assert parse_unfreeze_schedule("0:1, 1:2,3:all") == [(0, 1), (1, 2), (3, None)]
    assert parse_unfreeze_schedule("gradual") is None
    callback = GradualUnfreezingCallback([(0, 1), (2, 3), (4, None)])
    assert [callback.num_trainable(i) for i in range(6)] == [1, 1, 3, 3, None, None]
    assert [GradualUnfreezingCallback().num_trainable(i) for i in range(3)] == [1, 2, 3]
    for bad in ("1:1,2:all", "0:1,0:2", "0:0", "0-1"):
        with pytest.raises(ValueError):
            parse_unfreeze_schedule(bad)
    with pytest.raises(ValueError, match="'epoch' or 'step'"):
        GradualUnfreezingCallback(unit="batch")


def test_unfreezing_needs_an_awd_lstm():
    with pytest.raises(TypeError, match="layer_groups"):
        set_trainable_groups(nn.Linear(2, 2), 1)
