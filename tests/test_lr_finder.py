"""The learning-rate range test: fastai's `lr_find` step for step on the same model and batches, suggestions included,
and nothing of the stage changed by it."""

import warnings

import numpy as np
import pytest
import torch

from conftest import read_imdb
from modeling_awd_lstm import AwdLstmConfig, AwdLstmForCausalLM
from ulmfit.convert_fastai import to_fastai_state_dict
from ulmfit.data import LanguageModelingStream, TokenizedCorpus
from ulmfit.lr_finder import RangeTest, exponential_rates, find_learning_rate, minimum, smooth, valley
from ulmfit.tokenizer_training import train_fastai_tokenizer
from ulmfit.trainer import ULMFiTTrainer, ULMFiTTrainingArguments

BATCH, BPTT, STEPS = 8, 20, 40
SIZES = dict(emb_size=16, hidden_size=24, num_layers=3)


@pytest.fixture(scope="module")
def documents():
    texts = [row["text"] for row in read_imdb("train", limit=120)]
    tokenizer = train_fastai_tokenizer(texts, min_freq=2, show_progress=False)
    return tokenizer, [np.asarray(ids, dtype=np.int64) for ids in tokenizer(texts).input_ids]


def corpus_of(documents) -> TokenizedCorpus:
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in documents])])
    return TokenizedCorpus(np.concatenate(documents).astype(np.uint16), offsets)


def language_model(tokenizer, drop_mult: float) -> AwdLstmForCausalLM:
    torch.manual_seed(0)
    config = AwdLstmConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bptt=BPTT, ar_alpha=0.0, tar_beta=0.0,
        **SIZES, **AwdLstmConfig.dropouts("lm", drop_mult),
    )
    return AwdLstmForCausalLM(config)


def trainer_for(model, stream, tmp_path, **values) -> ULMFiTTrainer:
    args = ULMFiTTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, lm_bptt=BPTT, lm_variable_bptt=False,
        discriminative_lr_factor=1.0, adam_beta1=0.9, max_grad_norm=0.0, report_to="none", seed=0, **values,
    )
    return ULMFiTTrainer(model=model, args=args, train_dataset=stream)


def test_the_pieces_are_fastais():
    from fastai.callback.schedule import SchedExp
    from fastai.callback.schedule import minimum as fastai_minimum
    from fastai.callback.schedule import valley as fastai_valley
    from fastai.learner import AvgSmoothLoss

    assert exponential_rates(1e-7, 10, 100) == pytest.approx([SchedExp(1e-7, 10)(i / 100) for i in range(100)])
    rng = np.random.default_rng(0)
    raw = (5 - np.linspace(0, 3, 80) + np.linspace(0, 3, 80) ** 4 / 20 + rng.normal(0, 0.2, 80)).tolist()
    average, fastai_smoothed = AvgSmoothLoss(), []
    for loss in raw:
        average.accumulate(type("Learner", (), {"loss": torch.tensor(loss)}))
        fastai_smoothed.append(float(average.value))
    assert smooth(raw) == pytest.approx(fastai_smoothed, rel=1e-6)
    rates = exponential_rates(1e-7, 10, 80)
    losses = torch.tensor(smooth(raw))
    assert valley(rates, smooth(raw)) == pytest.approx(fastai_valley(torch.tensor(rates), losses, 80)[0])
    assert minimum(rates, smooth(raw)) == pytest.approx(fastai_minimum(torch.tensor(rates), losses, 80)[0])


def test_the_range_test_is_fastais_lr_find_on_the_same_model_and_batches(documents, tmp_path):
    """Dropout off, so both sides compute the same thing: the curves agree to float precision (relative 1e-4) and
    the suggestions are the same step of the range."""
    from fastai.callback.schedule import minimum as fastai_minimum
    from fastai.callback.schedule import valley as fastai_valley
    from fastai.text.all import AWD_LSTM, DataLoaders, LMDataLoader, awd_lstm_lm_config, language_model_learner

    warnings.filterwarnings("ignore")
    tokenizer, docs = documents
    model = language_model(tokenizer, drop_mult=0.0)
    train = LMDataLoader([torch.from_numpy(d) for d in docs], bs=BATCH, seq_len=BPTT, shuffle=False)
    assert len(train) > STEPS  # one epoch: the recurrent state carries through every step on both sides
    dls = DataLoaders(train, train)
    dls.vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    learn = language_model_learner(
        dls, AWD_LSTM, config={**awd_lstm_lm_config, "emb_sz": 16, "n_hid": 24, "n_layers": 3}, drop_mult=0.0,
        pretrained=False, alpha=0.0, beta=0.0, path=tmp_path,
    )
    learn.model.load_state_dict(to_fastai_state_dict(model))
    with learn.no_bar():
        try:
            learn.lr_find(num_it=STEPS, show_plot=False, suggest_funcs=None)
        except TypeError as error:
            # fastai 2.8.12 with torch 2.13 fails once the test is over, restoring an AWD-LSTM (its ModelResetter
            # after reloading the saved weights), whatever the weights. Its recorder holds the whole curve; the
            # suggestions are taken from it below exactly as `lr_find` takes them.
            assert "weight_hh_l0" in str(error)
    fastai_rates = torch.tensor(learn.recorder.lrs[STEPS // 10 : -5])
    fastai_losses = torch.tensor([float(loss) for loss in learn.recorder.losses[STEPS // 10 : -5]])
    fastai = {name: suggest(fastai_rates, fastai_losses, STEPS)[0]
              for name, suggest in (("valley", fastai_valley), ("minimum", fastai_minimum))}

    stream = LanguageModelingStream(corpus_of(docs), batch_size=BATCH, bptt=BPTT)
    ours = find_learning_rate(trainer_for(model, stream, tmp_path), num_steps=STEPS)

    assert len(ours.losses) == len(learn.recorder.losses)  # the same step ended the test (divergence or the last)
    assert ours.learning_rates == pytest.approx([float(r) for r in learn.recorder.lrs], rel=1e-6)
    assert ours.losses == pytest.approx([float(loss) for loss in learn.recorder.losses], rel=1e-4)
    assert (ours.valley, ours.minimum) == pytest.approx((fastai["valley"], fastai["minimum"]), rel=1e-6)


def test_the_stage_trains_afterwards_as_if_no_test_had_run(documents, tmp_path):
    """Weights, trainable layers, the stream's position and the random generators come back: the training that
    follows ends at the weights it reaches without a range test (dropout on, so the generators matter)."""
    tokenizer, docs = documents

    def trained(with_range_test: bool) -> dict[str, torch.Tensor]:
        model = language_model(tokenizer, drop_mult=0.5)
        stream = LanguageModelingStream(corpus_of(docs), batch_size=BATCH, bptt=BPTT, shuffle=True, seed=0)
        trainer = trainer_for(model, stream, tmp_path / str(with_range_test), max_steps=5, learning_rate=3e-3,
                              save_strategy="no")
        if with_range_test:
            before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
            result = find_learning_rate(trainer, num_steps=30)
            assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
            assert 1e-7 <= result.minimum < result.learning_rates[-1] and 1e-7 <= result.valley
        trainer.train()
        return model.state_dict()

    plain, after_test = trained(False), trained(True)
    for name, tensor in plain.items():
        assert torch.equal(after_test[name], tensor), name


def test_divergence_stops_the_test_and_too_short_a_curve_is_explained(documents, tmp_path):
    tokenizer, docs = documents
    stream = LanguageModelingStream(corpus_of(docs), batch_size=BATCH, bptt=BPTT)
    result = find_learning_rate(trainer_for(language_model(tokenizer, 0.0), stream, tmp_path), num_steps=60,
                                end_lr=1e4)
    assert len(result.losses) < 60 and result.losses[-1] > 4 * min(result.losses)
    assert result.plot(tmp_path / "lr_find.png").stat().st_size > 0
    with pytest.raises(ValueError, match="diverged after 8 steps, too few to suggest a rate"):
        RangeTest.from_curve(exponential_rates(1e-7, 10, 100)[:8], [3.0] * 7 + [20.0], 100)
    with pytest.raises(ValueError, match="0 < start_lr < end_lr"):
        find_learning_rate(trainer_for(language_model(tokenizer, 0.0), stream, tmp_path), start_lr=1.0, end_lr=0.1)


TINY_RECIPE = """
name: tiny
seed: 7
model: {emb_size: 32, hidden_size: 64, num_layers: 2, drop_mult: 0.5, bptt: 20, max_len: 60}
tokenizer: {kind: fastai, max_vocab: 2000, min_freq: 2}
stages:
  pretrain:
    data: {path: "bundled:wikitext2_valid.txt.gz", format: text}
    max_documents: 300
    training: {max_steps: 4, learning_rate: RATE, per_device_train_batch_size: 8, ulmfit_schedule: one_cycle}
"""


def tiny_recipe(tmp_path, rate: str) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.replace("RATE", rate))
    return str(path)


def test_ulmfit_lr_find_suggests_rates_and_writes_the_plot_without_training_the_stage(tmp_path, capsys):
    from ulmfit.cli import main

    output = tmp_path / "runs"
    assert main(["lr-find", tiny_recipe(tmp_path, "0.01"), "--stage", "pretrain", "--num-steps", "30",
                 "--output-dir", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "Suggested learning rates for pretrain: valley " in printed and "minimum/10 " in printed
    assert (output / "pretrain-lr_find.png").stat().st_size > 0
    assert not (output / "pretrain").exists()  # nothing trained, no stage started


def test_learning_rate_find_trains_at_the_valley_and_says_so_in_the_card(tmp_path):
    import json

    from ulmfit.cli import main
    from ulmfit.recipes import load_recipe

    recipe = tiny_recipe(tmp_path, "find")
    assert main(["validate", recipe]) == 0
    assert load_recipe(recipe).stages["pretrain"].training["learning_rate"] == "find"
    assert main(["pretrain", recipe, "--output-dir", str(tmp_path / "runs")]) == 0
    folder = tmp_path / "runs" / "pretrain"
    found = json.loads((folder / "lr_find.json").read_text())
    record = json.loads((folder / "ulmfit_stage.json").read_text())
    assert record["hyperparameters"]["learning_rate"] == found["valley"]
    assert f"fastai's range test chose {found['valley']:.2e}" in (folder / "README.md").read_text()
    assert (folder / "lr_find.png").is_file()
    assert main(["validate", tiny_recipe(tmp_path, "fnd")]) == 2
