"""Layer groups, discriminative learning rates, the ULMFiT optimizer, STLR, and fastai's one-cycle and fine_tune."""

import io
import warnings

import pytest
import torch
from torch import nn
from transformers import HfArgumentParser, Trainer, TrainingArguments

from modeling_awd_lstm import AwdLstmConfig, AwdLstmForCausalLM, AwdLstmForSequenceClassification
from ulmfit.optim import (
    ULMFiTOptimizerFactory,
    create_optimizer,
    discriminative_learning_rates,
    layer_groups,
    no_decay_parameter_ids,
)
from ulmfit.schedules import get_fine_tune_schedule, get_one_cycle_schedule, get_stlr_schedule, slanted_triangular
from ulmfit.trainer import ULMFiTTrainingArguments
from ulmfit.unfreezing import set_trainable_groups

TINY = dict(vocab_size=60, emb_size=16, hidden_size=24, num_layers=3)


@pytest.fixture
def lm() -> AwdLstmForCausalLM:
    return AwdLstmForCausalLM(AwdLstmConfig(**TINY))


@pytest.fixture
def classifier() -> AwdLstmForSequenceClassification:
    return AwdLstmForSequenceClassification(AwdLstmConfig(**TINY, num_labels=3))


def ids(parameters) -> set[int]:
    return {id(p) for p in parameters}


def lrs_by_layer_group(optimizer) -> list[float]:
    rates = {}
    for group in optimizer.param_groups:
        assert rates.setdefault(group["layer_group"], group["lr"]) == group["lr"]
    return [rates[index] for index in sorted(rates)]


# ----------------------------------------------------------------------------------------------------------------------
# Layer groups (fastai's awd_lstm_lm_split and awd_lstm_clas_split)
# ----------------------------------------------------------------------------------------------------------------------
def test_language_model_groups_are_the_lstms_then_embedding_with_tied_decoder(lm):
    groups = layer_groups(lm)
    assert len(groups) == 4
    for group, layer in zip(groups, lm.model.layers):
        assert ids(group) == ids(layer.lstm.parameters())
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert ids(groups[3]) == ids([lm.model.embed_tokens.weight, lm.lm_head.bias])
    assert sum(len(g) for g in groups) == len(list(lm.parameters()))  # each parameter once, the tied weight too


def test_classifier_groups_are_embedding_lstms_then_head(classifier):
    groups = layer_groups(classifier)
    assert len(groups) == 5
    assert ids(groups[0]) == ids(classifier.model.embed_tokens.parameters())
    for group, layer in zip(groups[1:4], classifier.model.layers):
        assert ids(group) == ids(layer.parameters())
    assert ids(groups[4]) == ids(classifier.classifier.parameters())
    assert sum(len(g) for g in groups) == len(list(classifier.parameters()))


def test_layer_groups_rejects_other_models():
    with pytest.raises(TypeError, match="AwdLstmForCausalLM and AwdLstmForSequenceClassification"):
        layer_groups(nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------------------------------
# Discriminative learning rates
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_fixture, num_groups", [("lm", 4), ("classifier", 5)])
def test_each_group_trains_at_the_rate_above_divided_by_2_6(model_fixture, num_groups, request):
    optimizer = create_optimizer(request.getfixturevalue(model_fixture), lr=1e-2)
    rates = lrs_by_layer_group(optimizer)
    assert len(rates) == num_groups
    assert rates[-1] == pytest.approx(1e-2)
    for lower, upper in zip(rates, rates[1:]):
        assert upper / lower == pytest.approx(2.6)


def test_slice_rates_are_fastai_s():
    from fastcore.basics import even_mults as fastai_even_mults

    assert discriminative_learning_rates(slice(1e-5, 1e-2), 5) == pytest.approx(fastai_even_mults(1e-5, 1e-2, 5))
    rates = discriminative_learning_rates(slice(1e-5, 1e-2), 5)
    ratios = [upper / lower for lower, upper in zip(rates, rates[1:])]
    assert ratios == pytest.approx([1000 ** 0.25] * 4)
    # fastai's `slice(hi)`: hi / 10 everywhere but the top group.
    assert discriminative_learning_rates(slice(1e-2), 4) == pytest.approx([1e-3, 1e-3, 1e-3, 1e-2])
    assert discriminative_learning_rates([1.0, 2.0, 3.0], 3) == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="one per group"):
        discriminative_learning_rates([1.0, 2.0], 3)


def test_every_group_is_in_the_optimizer_while_frozen(classifier, tmp_path):
    set_trainable_groups(classifier, 1)
    assert not all(p.requires_grad for p in classifier.parameters())
    optimizer = create_optimizer(classifier, lr=1e-3)
    assert ids(p for group in optimizer.param_groups for p in group["params"]) == ids(classifier.parameters())

    # The same through the Trainer's `optimizer_cls_and_kwargs`, whose default selection would drop frozen parameters.
    trainer = Trainer(
        model=classifier,
        args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
        optimizer_cls_and_kwargs=(ULMFiTOptimizerFactory, {"lr": 1e-3}),
    )
    optimizer = trainer.create_optimizer()
    assert ids(p for group in optimizer.param_groups for p in group["params"]) == ids(classifier.parameters())
    assert lrs_by_layer_group(optimizer)[-1] == pytest.approx(1e-3)


def test_no_weight_decay_on_biases_and_batchnorm(classifier):
    optimizer = create_optimizer(classifier, lr=1e-3, weight_decay=0.1)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in classifier.named_parameters():
        in_batchnorm = isinstance(classifier.get_submodule(name.rsplit(".", 1)[0]), nn.BatchNorm1d)
        expected = 0.0 if ("bias" in name.rsplit(".", 1)[1] or in_batchnorm) else 0.1
        assert decay[id(parameter)] == expected, name
    recurrent_weights = ids(p for n, p in classifier.named_parameters() if "weight_hh" in n)
    assert recurrent_weights.isdisjoint(no_decay_parameter_ids(classifier))


def test_adam_defaults_are_ulmfit_s(lm):
    optimizer = create_optimizer(lm, lr=1e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["betas"] == (0.7, 0.99) for group in optimizer.param_groups)


def test_fused_adamw_on_cpu_steps_as_the_reference_adamw(classifier):
    import copy

    reference_model, start = copy.deepcopy(classifier), copy.deepcopy(classifier)
    for model in (classifier, reference_model):
        set_trainable_groups(model, 2)
    optimizer = create_optimizer(classifier, lr=slice(1e-3, 1e-2), weight_decay=0.1)
    reference = create_optimizer(reference_model, lr=slice(1e-3, 1e-2), weight_decay=0.1)
    for group in reference.param_groups:
        group["fused"] = False
    assert optimizer.defaults["fused"] and not reference.param_groups[0]["fused"]

    torch.manual_seed(0)
    for _ in range(3):
        for model in (classifier, reference_model):
            model.zero_grad()
        for p, q in zip(classifier.parameters(), reference_model.parameters()):
            if p.requires_grad:
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    frozen = 0
    for (name, p), q, initial in zip(classifier.named_parameters(), reference_model.parameters(), start.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        if not p.requires_grad:
            frozen += 1
            assert torch.equal(p, initial), name
    assert frozen > 0


# ----------------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------------
def run_schedule(optimizer, scheduler, num_steps: int) -> tuple[list[list[float]], list[float]]:
    """Each step's rate per parameter group and beta1, as the optimizer sees them when it steps."""
    lrs, betas = [], []
    for _ in range(num_steps):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        scheduler.step()
    return lrs, betas


def test_stlr_rises_for_cut_frac_of_the_steps_then_falls_to_lr_over_ratio(lm):
    total, lr = 1000, 1e-2
    optimizer = create_optimizer(lm, lr=lr)
    lrs, _ = run_schedule(optimizer, get_stlr_schedule(optimizer, total, cut_frac=0.1, ratio=32), total)
    top = [step[-1] for step in lrs]
    assert top[0] == pytest.approx(lr / 32)
    assert max(top) == pytest.approx(lr) and top.index(max(top)) == 100
    assert all(a < b for a, b in zip(top[:100], top[1:101]))
    assert all(a > b for a, b in zip(top[100:], top[101:]))
    assert slanted_triangular(total, total) == pytest.approx(1 / 32)
    # Every group follows the same curve: the discriminative ratios hold at every step.
    ratios = [group["initial_lr"] / lr for group in optimizer.param_groups]
    for step in lrs[::97]:
        assert [rate / step[-1] for rate in step] == pytest.approx(ratios)
    # Eq. 3 exactly, mid-decay: p = 1 - (t - cut) / (cut (1/cut_frac - 1)).
    p = 1 - (550 - 100) / (100 * 9)
    assert top[550] == pytest.approx(lr * (1 + p * 31) / 32)


def fastai_schedule(fit) -> tuple[list[list[float]], list[float]]:
    """The rates (every group) and momentums fastai itself uses over 3 layer groups, 7 batches an epoch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai's own deprecation warnings
        import fastai.callback.schedule  # noqa: F401  (adds fit_one_cycle and fine_tune to Learner)
        from fastai.basics import Adam, Callback, Learner, MSELossFlat, params
        from fastai.test_utils import synth_dbunch

    class Recorder(Callback):
        order = 100
        lrs, moms = [], []

        def after_batch(self):
            if self.training:
                self.lrs.append([h["lr"] for h in self.opt.hypers])
                self.moms.append(self.opt.hypers[0]["mom"])

    model = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 1))
    learner = Learner(
        synth_dbunch(n_train=7), model, loss_func=MSELossFlat(), opt_func=Adam,
        splitter=lambda m: [params(layer) for layer in m], cbs=[Recorder()],
    )
    with learner.no_logging(), learner.no_bar():
        fit(learner)
    return Recorder.lrs, Recorder.moms


def assert_same_rates(ours: list[list[float]], fastai: list[list[float]]) -> None:
    # fastai keeps the phase boundaries in float32: agreement to 1e-5 relative.
    torch.testing.assert_close(torch.tensor(ours).double(), torch.tensor(fastai).double(), rtol=1e-5, atol=0)


def three_group_optimizer(rates: list[float]) -> torch.optim.AdamW:
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr, "layer_group": i} for i, lr in enumerate(rates)]
    return torch.optim.AdamW(groups, betas=(0.7, 0.99))


def test_one_cycle_matches_fastai():
    fastai_lrs, fastai_moms = fastai_schedule(lambda learner: learner.fit_one_cycle(3, slice(1e-4, 1e-2)))
    optimizer = three_group_optimizer(discriminative_learning_rates(slice(1e-4, 1e-2), 3))
    lrs, betas = run_schedule(optimizer, get_one_cycle_schedule(optimizer, 21), 21)
    assert_same_rates(lrs, fastai_lrs)
    assert betas == pytest.approx(fastai_moms, rel=1e-6)
    assert max(betas) == pytest.approx(0.95) and min(betas) == pytest.approx(0.85, abs=1e-3)


def test_fine_tune_matches_fastai():
    fastai_lrs, fastai_moms = fastai_schedule(lambda learner: learner.fine_tune(2, 4e-3))
    # Whatever rates the optimizer starts with, fine_tune sets fastai's from the top group's.
    optimizer = three_group_optimizer(discriminative_learning_rates(4e-3, 3))
    lrs, betas = run_schedule(optimizer, get_fine_tune_schedule(optimizer, 21, num_frozen_steps=7), 21)
    # During the frozen epoch only the top group trains; fastai sets the others' rates anyway: compare all.
    assert_same_rates(lrs, fastai_lrs)
    assert betas == pytest.approx(fastai_moms, rel=1e-6)


def test_schedule_state_reloads_with_weights_only(lm):
    """The Trainer reloads a checkpoint's scheduler with torch.load(weights_only=True)."""
    optimizer = create_optimizer(lm, lr=1e-2)
    scheduler = get_fine_tune_schedule(optimizer, 40, num_frozen_steps=10)
    run_schedule(optimizer, scheduler, 15)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    expected, _ = run_schedule(optimizer, scheduler, 5)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_optimizer = create_optimizer(AwdLstmForCausalLM(AwdLstmConfig(**TINY)), lr=1e-2)
    resumed = get_fine_tune_schedule(resumed_optimizer, 40, num_frozen_steps=10)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    assert run_schedule(resumed_optimizer, resumed, 5)[0] == expected


def test_optimizer_and_schedule_plug_into_a_plain_trainer(classifier, tmp_path):
    import datasets

    generator = torch.Generator().manual_seed(0)
    rows = {"input_ids": torch.randint(4, 60, (16, 12), generator=generator).tolist(), "labels": [0, 1] * 8}  # unpadded
    optimizer = create_optimizer(classifier, lr=1e-2)
    scheduler = get_stlr_schedule(optimizer, 8)
    used = []
    optimizer.register_step_pre_hook(lambda opt, *_: used.append([group["lr"] for group in opt.param_groups]))
    trainer = Trainer(
        model=classifier,
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, report_to=[],
                               use_cpu=True, save_strategy="no", disable_tqdm=True),
        train_dataset=datasets.Dataset.from_dict(rows),
        optimizers=(optimizer, scheduler),
    )
    trainer.train()
    initial = [group["initial_lr"] for group in optimizer.param_groups]
    expected = [[lr * slanted_triangular(step, 8) for lr in initial] for step in range(8)]
    torch.testing.assert_close(torch.tensor(used), torch.tensor(expected))


# ----------------------------------------------------------------------------------------------------------------------
# The arguments
# ----------------------------------------------------------------------------------------------------------------------
def test_ulmfit_settings_are_training_arguments(tmp_path):
    parser = HfArgumentParser(ULMFiTTrainingArguments)
    help_text = parser.format_help()
    for name in ("--discriminative_lr_factor", "--ulmfit_schedule", "--stlr_cut_frac", "--unfreeze_schedule",
                 "--ar_alpha", "--lm_variable_bptt"):
        assert name in help_text
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--ulmfit_schedule", "one_cycle", "--unfreeze_schedule", "0:1,2:all",
         "--one_cycle_moms", "0.9", "0.8", "0.9", "--report_to", "none"]
    )
    assert (args.adam_beta1, args.adam_beta2, args.discriminative_lr_factor) == (0.7, 0.99, 2.6)
    assert args.one_cycle_moms == [0.9, 0.8, 0.9]
    saved = args.to_dict()
    assert saved["ulmfit_schedule"] == "one_cycle" and saved["unfreeze_schedule"] == "0:1,2:all"

    with pytest.raises(ValueError, match="start:groups"):
        ULMFiTTrainingArguments(output_dir=str(tmp_path), unfreeze_schedule="1,2")
    with pytest.raises(ValueError, match="fine_tune sets its own unfreezing"):
        ULMFiTTrainingArguments(output_dir=str(tmp_path), ulmfit_schedule="fine_tune", unfreeze_schedule="gradual")
