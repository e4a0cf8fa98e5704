"""ULMFiTTrainer: stateful LM batches and perplexity, exact resume, atomic checkpoints, bf16, DDP, and a real run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from modeling_awd_lstm import (
    AwdLstmConfig,
    AwdLstmForCausalLM,
    AwdLstmForSequenceClassification,
    cpu_has_bf16_kernels,
)
from scripts.ulmfit_tiny import (
    classification_dataset,
    lm_corpus,
    single_thread,  # noqa: F401  (a fixture, used by pytestmark)
    tiny_config,
    word_tokenizer,
)
from ulmfit.data import LanguageModelingStream, SortedBatchSampler
from ulmfit.trainer import COMPLETE_MARK, ULMFiTTrainer, ULMFiTTrainingArguments, last_complete_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")
SCRIPTS = Path(__file__).resolve().parent / "scripts"
NO_DROPOUT = dict(output_p=0.0, hidden_p=0.0, input_p=0.0, embed_p=0.0, weight_p=0.0)


@pytest.fixture(scope="module")
def tokenizer(imdb_texts):
    return word_tokenizer(imdb_texts, vocab_size=500)


@pytest.fixture(scope="module")
def corpus(tokenizer, imdb_texts):
    return lm_corpus(tokenizer, imdb_texts[:12])


@pytest.fixture(scope="module")
def eval_corpus(tokenizer, imdb_texts):
    return lm_corpus(tokenizer, imdb_texts[30:36])


@pytest.fixture(scope="module")
def reviews(tokenizer):
    return classification_dataset(tokenizer, "train", limit=48, max_length=40)


def lm_model(tokenizer, **config) -> AwdLstmForCausalLM:
    torch.manual_seed(0)
    return AwdLstmForCausalLM(tiny_config(tokenizer, **config))


def arguments(tmp_path, **settings) -> ULMFiTTrainingArguments:
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4, lm_bptt=24,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0,
    )
    values.update(settings)
    return ULMFiTTrainingArguments(**values)


class RecordingTrainer(ULMFiTTrainer):
    """Keeps each training batch and the loss the trainer computed on it."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        self.batches = getattr(self, "batches", []) + [(inputs, loss.item())]
        return (loss, outputs) if return_outputs else loss


# ----------------------------------------------------------------------------------------------------------------------
# Language-model stages: streams and the recurrent state
# ----------------------------------------------------------------------------------------------------------------------
def model_losses(model, batches, cache=None) -> list[float]:
    """The model's losses on consecutive stream batches, the state carried from `cache` (zeros when None)."""
    losses = []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            out = model(input_ids=batch["input_ids"], shift_labels=batch["shift_labels"], cache=cache, use_cache=True)
            cache = out.cache
            losses.append(out.loss.item())
    return losses


def test_lm_batches_continue_each_other_and_carry_the_state(tokenizer, corpus, tmp_path):
    # Without dropout, regularization or learning, the trainer's losses are the model's own on the stream.
    model = lm_model(tokenizer, **NO_DROPOUT)
    args = arguments(tmp_path, num_train_epochs=2, learning_rate=0.0, ar_alpha=0.0, tar_beta=0.0)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=corpus)
    trainer.train()
    steps_per_epoch = len(trainer.batches) // 2
    batches = [batch for batch, _ in trainer.batches]
    losses = [loss for _, loss in trainer.batches]

    # Row i of a batch continues row i of the batch before it, and each epoch reads its own shuffle of the documents.
    for before, after in zip(batches[:3], batches[1:4]):
        assert torch.equal(after["input_ids"][:, 0], before["shift_labels"][:, -1])
    stream = LanguageModelingStream(corpus, batch_size=4, bptt=24, shuffle=True, seed=args.seed)
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        assert torch.equal(batches[epoch * steps_per_epoch]["input_ids"], stream.batch(0)["input_ids"])
    assert not torch.equal(batches[0]["input_ids"], batches[steps_per_epoch]["input_ids"])
    # The state is carried from batch to batch, and starts from zeros again with the second epoch.
    assert losses[:3] == pytest.approx(model_losses(model, batches[:3]), abs=1e-6)
    epoch_2 = batches[steps_per_epoch : steps_per_epoch + 2]
    assert losses[steps_per_epoch : steps_per_epoch + 2] == pytest.approx(model_losses(model, epoch_2), abs=1e-6)
    # A reset (or a state carried across epochs) would show: the state changes the losses far beyond the tolerance.
    assert abs(model_losses(model, batches[1:2])[0] - losses[1]) > 1e-4
    carried_across = model_losses(model, batches[steps_per_epoch - 1 : steps_per_epoch + 1])[1]
    assert abs(carried_across - losses[steps_per_epoch]) > 1e-4


def test_eval_perplexity_carries_the_state_and_weighs_tokens(tokenizer, eval_corpus, tmp_path):
    model = lm_model(tokenizer)
    trainer = ULMFiTTrainer(model=model, args=arguments(tmp_path), eval_dataset=eval_corpus)
    metrics = trainer.evaluate()

    stream = LanguageModelingStream(eval_corpus, batch_size=4, bptt=24)
    assert stream.seq_lens[-1] < 24  # a shorter last batch, so token weighting matters
    model.eval()
    total, count, cache = 0.0, 0, None
    with torch.no_grad():
        for batch in stream:
            out = model(**batch, cache=cache, use_cache=True)
            cache = out.cache
            total += out.loss.item() * batch["shift_labels"].numel()
            count += batch["shift_labels"].numel()
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-6)
    assert metrics["eval_perplexity"] == pytest.approx(float(torch.tensor(total / count).exp()), rel=1e-6)


class RecordRates(TrainerCallback):
    """The top group's rate each step: as scheduled, and as the optimizer step uses it."""

    def __init__(self):
        self.scheduled, self.used = [], []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        # Registered after the trainer's own hook, so it sees the rates the step uses.
        optimizer.optimizer.register_step_pre_hook(lambda opt, *_: self.used.append(opt.param_groups[-1]["lr"]))

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.scheduled.append(lr_scheduler.get_last_lr()[-1])


def test_variable_bptt_scales_each_step_by_its_length(tokenizer, corpus, tmp_path):
    rates = RecordRates()
    args = arguments(tmp_path, num_train_epochs=2, lm_bptt=12, lm_variable_bptt=True)
    trainer = ULMFiTTrainer(model=lm_model(tokenizer), args=args, train_dataset=corpus, callbacks=[rates])
    lengths = []
    for epoch in range(2):
        trainer.train_dataset.set_epoch(epoch)
        lengths.append(list(trainer.train_dataset.seq_lens))
    assert len(lengths[0]) != len(lengths[1])  # the epochs differ; the trainer counts the shorter one's batches
    steps_per_epoch = min(len(epoch_lengths) for epoch_lengths in lengths)

    trainer.train()
    assert trainer.state.global_step == 2 * steps_per_epoch
    seq_lens = lengths[0][:steps_per_epoch] + lengths[1][:steps_per_epoch]
    assert rates.used == pytest.approx([lr * n / 12 for lr, n in zip(rates.scheduled, seq_lens)], rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Classifier stages
# ----------------------------------------------------------------------------------------------------------------------
def test_classifier_batches_are_grouped_by_length(tokenizer, tmp_path):
    reviews = classification_dataset(tokenizer, "train", limit=96)
    torch.manual_seed(0)
    model = AwdLstmForSequenceClassification(tiny_config(tokenizer, num_labels=2))
    trainer = ULMFiTTrainer(model=model, args=arguments(tmp_path, per_device_train_batch_size=8),
                            train_dataset=reviews, processing_class=tokenizer)
    loader = trainer.get_train_dataloader()
    assert isinstance(trainer._train_sampler, SortedBatchSampler)
    padding = sum(int((batch["attention_mask"] == 0).sum()) for batch in loader)
    lengths = reviews["length"]
    unsorted = sum(max(lengths[i : i + 8]) * len(lengths[i : i + 8]) - sum(lengths[i : i + 8]) for i in range(0, 96, 8))
    assert padding < unsorted / 4
    assert sum(len(batch["labels"]) for batch in loader) == 96


# ----------------------------------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------------------------------
class Crash(Exception):
    pass


class CrashAt(TrainerCallback):
    """Stops the run like a crash once `step` steps are done (and saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run_interrupted_and_resumed(make_trainer, crash_step: int) -> tuple[dict, dict, ULMFiTTrainer]:
    uninterrupted = make_trainer("full")
    uninterrupted.train()

    interrupted = make_trainer("resumed", callbacks=[CrashAt(crash_step)])
    with pytest.raises(Crash):
        interrupted.train()
    resumed = make_trainer("resumed")
    resumed.train(resume_from_checkpoint=True)
    return weights(uninterrupted.model), weights(resumed.model), resumed


def test_resumed_lm_run_ends_at_the_same_weights(tokenizer, corpus, tmp_path):
    """Mid-epoch, with dropout, AR/TAR, variable BPTT, STLR and gradual unfreezing: exact on one process."""

    def make_trainer(name, callbacks=None):
        args = arguments(
            tmp_path / name, num_train_epochs=3, lm_variable_bptt=True, unfreeze_schedule="gradual",
            save_strategy="steps", save_steps=5,
        )
        return ULMFiTTrainer(model=lm_model(tokenizer), args=args, train_dataset=corpus, callbacks=callbacks)

    steps_per_epoch = len(make_trainer("probe").get_train_dataloader())
    crash_step = next(step for step in range(5, 3 * steps_per_epoch, 5) if step > steps_per_epoch)
    assert crash_step < 2 * steps_per_epoch  # a saved step inside the second epoch
    expected, got, resumed = run_interrupted_and_resumed(make_trainer, crash_step)
    assert resumed.state.global_step == 3 * steps_per_epoch
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_resumed_classifier_run_freezes_the_same_groups(tokenizer, reviews, tmp_path):
    def make_trainer(name, callbacks=None):
        args = arguments(
            tmp_path / name, per_device_train_batch_size=12, num_train_epochs=3, unfreeze_schedule="gradual",
            save_strategy="steps", save_steps=2,
        )
        torch.manual_seed(0)
        model = AwdLstmForSequenceClassification(tiny_config(tokenizer, num_labels=2))
        return ULMFiTTrainer(model=model, args=args, train_dataset=reviews, processing_class=tokenizer,
                             callbacks=callbacks)

    # 4 steps an epoch: resume at step 6, in the middle of the second epoch (two groups trainable).
    expected, got, _ = run_interrupted_and_resumed(make_trainer, crash_step=6)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_a_crash_while_saving_leaves_no_checkpoint_to_resume(tokenizer, corpus, tmp_path):
    class CrashWhileSaving(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 10:
                raise Crash  # the Trainer's files are written, the recurrent state and the mark are not

    args = arguments(tmp_path, max_steps=12, save_strategy="steps", save_steps=5, save_total_limit=None)
    with pytest.raises(Crash):
        ULMFiTTrainer(model=lm_model(tokenizer), args=args, train_dataset=corpus, callbacks=[CrashWhileSaving]).train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-5"]
    assert not (tmp_path / "checkpoint-10" / COMPLETE_MARK).exists()
    assert last_complete_checkpoint(tmp_path).endswith("checkpoint-5")

    resumed = ULMFiTTrainer(model=lm_model(tokenizer), args=args, train_dataset=corpus)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 12
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-12", "checkpoint-5"]
    assert all((tmp_path / name / COMPLETE_MARK).exists() for name in os.listdir(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# Mixed precision, arguments
# ----------------------------------------------------------------------------------------------------------------------
def test_bf16_on_cpu_trains_and_evaluates_under_autocast(tokenizer, corpus, eval_corpus, tmp_path, bf16_kernels):
    has_kernels = cpu_has_bf16_kernels()
    bf16_kernels(True)  # training in bf16 runs on any CPU (stepwise, and slowly, without the kernels)
    model = lm_model(tokenizer)
    lstm_dtypes, decoder_dtypes = [], []
    model.model.layers[-1].register_forward_hook(lambda module, inputs, output: lstm_dtypes.append(output[0].dtype))
    model.lm_head.register_forward_hook(lambda module, inputs, output: decoder_dtypes.append(output.dtype))
    args = arguments(tmp_path, max_steps=4, bf16=True)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=corpus, eval_dataset=eval_corpus)
    trainer.train()
    assert set(lstm_dtypes) == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in trainer.batches)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # autocast, not a bf16 model
    bf16_kernels(has_kernels)  # evaluation runs oneDNN's LSTM, which has a bf16 version only where the kernels are
    lstm_dtypes.clear()
    assert 1 < trainer.evaluate()["eval_perplexity"] < len(tokenizer)
    assert set(lstm_dtypes) == {torch.bfloat16 if has_kernels else torch.float32}
    assert set(decoder_dtypes) == {torch.bfloat16}  # evaluation computes the logits (training only the loss)


def test_bf16_on_a_cpu_without_bf16_kernels_trains_in_fp32_and_says_so(tmp_path, bf16_kernels, caplog):
    bf16_kernels(False)
    with caplog.at_level("WARNING"):
        args = arguments(tmp_path, bf16=True)
    assert not args.bf16 and args.use_cpu
    assert "no bf16 kernels" in caplog.text


def test_the_trainer_checks_what_it_is_given(tokenizer, corpus, tmp_path):
    with pytest.raises(TypeError, match="ULMFiTTrainingArguments"):
        ULMFiTTrainer(model=lm_model(tokenizer), args=TrainingArguments(output_dir=str(tmp_path)))
    stream = LanguageModelingStream(corpus, batch_size=2, bptt=24, rank=1, world_size=2)
    with pytest.raises(ValueError, match="process 1 of 2"):
        ULMFiTTrainer(model=lm_model(tokenizer), args=arguments(tmp_path), train_dataset=stream)
    args = arguments(tmp_path, ar_alpha=0.5, tar_beta=0.0)
    model = lm_model(tokenizer)
    ULMFiTTrainer(model=model, args=args, train_dataset=corpus)
    assert (model.config.ar_alpha, model.config.tar_beta) == (0.5, 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Two processes
# ----------------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_on_two_cpu_processes(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    script = str(SCRIPTS / "ddp_lm.py")
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), script, str(tmp_path / "two.json"), "4", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, script, str(tmp_path / "one.json"), "8", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two, one = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("two", "one"))

    assert two["world_size"] == two["trainer_world_size"] == 2
    # Each process reads its own 4 rows; together they are the 8 rows one process reads.
    rank_0, rank_1 = two["first_rows"]
    assert rank_0 != rank_1 and rank_0 + rank_1 == one["first_rows"][0]
    # Gradients are averaged across processes, unfrozen groups included: the copies stay identical.
    assert two["checksums"][0] == two["checksums"][1]
    # Gradual unfreezing over 2 epochs trains the top two of the LM's four groups, on both setups.
    assert two["changed_groups"] == one["changed_groups"] == [False, False, True, True]
    assert two["perplexity_before"] == pytest.approx(one["perplexity_before"], rel=1e-5)
    assert two["perplexity_after"] < 0.5 * two["perplexity_before"]
    assert two["perplexity_after"] == pytest.approx(one["perplexity_after"], rel=0.05)


# ----------------------------------------------------------------------------------------------------------------------
# A real run: LM fine-tuning, then the classifier, on the bundled IMDb reviews
# ----------------------------------------------------------------------------------------------------------------------
def test_lm_then_classifier_on_imdb_improves_both(tmp_path):
    from scripts.ulmfit_tiny import imdb_texts
    from ulmfit.metrics import classification_compute_metrics

    unlabelled = imdb_texts("unsup", limit=1000)
    tokenizer = word_tokenizer(unlabelled + imdb_texts("train", limit=1000), vocab_size=3000)
    tokenizer.truncation_side = "left"  # reviews end on their verdict: keep the last 128 tokens

    # Stage 2: LM fine-tuning (here from scratch: the test has no pretrained LM) with fastai's one-cycle.
    torch.manual_seed(0)
    lm = AwdLstmForCausalLM(tiny_config(tokenizer))
    args = arguments(tmp_path / "lm", per_device_train_batch_size=32, per_device_eval_batch_size=32, lm_bptt=48,
                     num_train_epochs=1, learning_rate=3e-3, ulmfit_schedule="one_cycle")
    trainer = ULMFiTTrainer(model=lm, args=args, train_dataset=lm_corpus(tokenizer, unlabelled[:900]),
                            eval_dataset=lm_corpus(tokenizer, unlabelled[900:]))
    perplexity_before = trainer.evaluate()["eval_perplexity"]
    trainer.train()
    perplexity_after = trainer.evaluate()["eval_perplexity"]
    assert perplexity_after < 0.25 * perplexity_before
    trainer.save_model(str(tmp_path / "lm" / "final"))

    # Stage 3: the classifier starts from the LM's encoder. One rate for every group: a tiny LM trained for a few
    # seconds has little worth protecting with lower rates. (Measured over seeds 0-3: 0.76-0.80; at a rate of 1e-2
    # some seeds stay at chance.)
    torch.manual_seed(0)
    classifier = AwdLstmForSequenceClassification.from_pretrained(
        str(tmp_path / "lm" / "final"), num_labels=2, **AwdLstmConfig.dropouts("classifier", 0.1)
    )
    args = arguments(tmp_path / "classifier", per_device_train_batch_size=16, per_device_eval_batch_size=64,
                     num_train_epochs=8, learning_rate=5e-3, discriminative_lr_factor=1.0)
    trainer = ULMFiTTrainer(
        model=classifier, args=args, processing_class=tokenizer, compute_metrics=classification_compute_metrics(),
        train_dataset=classification_dataset(tokenizer, "train", limit=1000, max_length=128),
        eval_dataset=classification_dataset(tokenizer, "test", limit=500, max_length=128),
    )
    accuracy_before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    accuracy_after = trainer.evaluate()["eval_accuracy"]
    print(f"perplexity {perplexity_before:.0f} -> {perplexity_after:.0f}")
    print(f"accuracy {accuracy_before} -> {accuracy_after}")
    # 500 balanced test reviews: chance is 0.5, give or take 0.02.
    assert accuracy_before < 0.55
    assert accuracy_after > 0.65
