"""Conversion of real fastai 2.8.12 ULMFiT models, trained here on real IMDb reviews and saved the ways fastai users
save them: the converted folders give fastai's token ids, logits, probabilities and accuracy on held-out reviews."""

import argparse
import hashlib
import os
import pickle
import warnings
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from conftest import read_imdb
from modeling_awd_lstm import AwdLstmConfig, AwdLstmForCausalLM, AwdLstmForSequenceClassification
from modeling_awd_lstm.tokenization_awd_lstm import AwdLstmTokenizer
from ulmfit.convert import add_convert_fastai_arguments, run_convert_fastai
from ulmfit.convert_fastai import (
    FastaiConversionError,
    convert_fastai,
    convert_fastai_state_dict,
    fastai_learner_to_transformers,
    fastai_weights_to_transformers,
    load_fastai_vocab,
    read_fastai_checkpoint,
    transfer_vocab,
)

# Small enough to train in seconds; three layers so that the middle layer's sizes are checked too.
FASTAI_CONFIG = dict(emb_sz=16, n_hid=24, n_layers=3)
BPTT, MAX_LEN = 36, 360


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: a second thread costs more than it saves, a lot more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fastai_run(tmp_path_factory):
    """A fastai language model and classifier trained for a few batches, saved every usual way."""
    warnings.filterwarnings("ignore")
    from fastai.text.all import (
        AWD_LSTM,
        Numericalize,
        ShortEpochCallback,
        TextDataLoaders,
        awd_lstm_lm_config,
        language_model_learner,
        text_classifier_learner,
        tokenize_texts,
    )

    path = tmp_path_factory.mktemp("fastai")
    rows = read_imdb("train", limit=200)
    df = pd.DataFrame({"text": [r["text"] for r in rows], "label": [("neg", "pos")[r["label"]] for r in rows]})
    torch.manual_seed(0)

    lm_dls = TextDataLoaders.from_df(df[:120], text_col="text", is_lm=True, valid_pct=0.1, seed=0, bs=8, seq_len=24)
    lm = language_model_learner(
        lm_dls, AWD_LSTM, config={**awd_lstm_lm_config, **FASTAI_CONFIG}, pretrained=False, path=path, model_dir="."
    )
    # Discriminative learning rates, as in ULMFiT: fastai then saves numpy scalars in the optimizer state.
    with lm.no_bar(), lm.no_logging():
        lm.fit_one_cycle(1, slice(1e-3, 1e-2), cbs=ShortEpochCallback(pct=0.05))
    vocab = list(lm.dls.vocab)

    clas_dls = TextDataLoaders.from_df(
        df, text_col="text", label_col="label", valid_pct=0.2, seed=0, bs=16, seq_len=BPTT, text_vocab=vocab
    )
    clas = text_classifier_learner(
        clas_dls, AWD_LSTM, config=FASTAI_CONFIG, seq_len=BPTT, max_len=MAX_LEN, pretrained=False, path=path,
        model_dir=".",
    )
    clas.model[0].module.load_state_dict(lm.model[0].state_dict())
    with clas.no_bar(), clas.no_logging():
        clas.fit(1, 1e-2, cbs=ShortEpochCallback(pct=0.5))

    lm.save("lm")  # {"model": ..., "opt": ...}
    lm.save_encoder("encoder")
    lm.export("lm_export.pkl")
    clas.save("clas")
    clas.export("clas_export.pkl")
    torch.save(lm.model.state_dict(), path / "lm_state_dict.pth")
    # The layout of older fastai checkpoints such as the WikiText-103 `.pth`: a bare state dict that also holds the
    # weight-dropped copies of the hidden-to-hidden matrices.
    legacy = dict(lm.model.state_dict())
    for i in range(FASTAI_CONFIG["n_layers"]):
        legacy[f"0.rnns.{i}.module.weight_hh_l0"] = torch.zeros_like(legacy[f"0.rnns.{i}.weight_hh_l0_raw"])
    torch.save(legacy, path / "wt103_style.pth")
    with open(path / "itos.pkl", "wb") as f:
        pickle.dump(vocab, f)

    held_out = read_imdb("test", limit=48)
    texts = [r["text"] for r in held_out]
    # fastai's ids as its training data gets them (rules, spaCy, `replace_space`, Numericalize). Its `test_dl` and
    # `predict` on raw strings skip `replace_space`, so they are not the reference.
    numericalize = Numericalize(vocab=vocab)
    ids = [numericalize(tokens).tolist() for tokens in tokenize_texts(texts, n_workers=0)]
    lm.model.eval()
    clas.model.eval()
    return SimpleNamespace(
        path=path, lm=lm, clas=clas, vocab=vocab, texts=texts, ids=ids,
        labels=torch.tensor([r["label"] for r in held_out]),
    )


@pytest.fixture(scope="module")
def lm_folder(fastai_run):
    run = fastai_run
    return convert_fastai(run.path / "lm.pth", run.path / "hf_lm", vocab=run.path / "itos.pkl")


@pytest.fixture(scope="module")
def classifier_folder(fastai_run):
    run = fastai_run
    return convert_fastai(
        run.path / "clas.pth", run.path / "hf_clas", vocab=run.path / "itos.pkl", labels=["neg", "pos"],
        bptt=BPTT, max_len=MAX_LEN,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------------------------
def test_tokenizer_gives_fastai_ids(fastai_run, lm_folder):
    tokenizer = AwdLstmTokenizer.from_pretrained(lm_folder)
    assert tokenizer(fastai_run.texts).input_ids == fastai_run.ids


@pytest.mark.parametrize("source", ["lm.pth", "lm_state_dict.pth", "wt103_style.pth", "lm_export.pkl"])
def test_language_model_logits_match_fastai(fastai_run, tmp_path, source):
    run = fastai_run
    if source.endswith(".pkl"):
        folder = convert_fastai(run.path / source, tmp_path, trust_pickle=True)
    else:
        folder = convert_fastai(run.path / source, tmp_path, vocab=run.path / "itos.pkl")
    model = AwdLstmForCausalLM.from_pretrained(folder).eval()
    batch = torch.tensor([ids[:60] for ids in run.ids if len(ids) >= 60][:6])
    run.lm.model.reset()
    with torch.no_grad():
        expected = run.lm.model(batch)[0]
        logits = model(batch).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_exported_language_model_keeps_the_learner_settings(fastai_run, tmp_path):
    folder = convert_fastai(fastai_run.path / "lm_export.pkl", tmp_path, trust_pickle=True)
    config = AwdLstmConfig.from_pretrained(folder)
    encoder = fastai_run.lm.model[0]
    sizes = (config.vocab_size, config.emb_size, config.hidden_size, config.num_layers)
    assert sizes == (len(fastai_run.vocab), 16, 24, 3)
    assert (config.input_p, config.hidden_p, config.embed_p, config.weight_p, config.output_p) == (
        encoder.input_dp.p, encoder.hidden_dps[0].p, encoder.encoder_dp.embed_p, encoder.rnns[0].weight_p,
        fastai_run.lm.model[1].output_dp.p,
    )
    assert config.tie_word_embeddings and config.output_bias and not config.backwards


@pytest.mark.parametrize("source", ["clas.pth", "clas_export.pkl"])
def test_classifier_probabilities_and_accuracy_match_fastai(fastai_run, classifier_folder, tmp_path, source):
    from fastai.metrics import accuracy

    run = fastai_run
    if source == "clas.pth":
        folder = classifier_folder
    else:
        folder = convert_fastai(run.path / source, tmp_path, trust_pickle=True)
    model = AwdLstmForSequenceClassification.from_pretrained(folder).eval()
    # fastai reads each document alone (no padding); ours reads them in one padded batch.
    lengths = torch.tensor([len(ids) for ids in run.ids])
    batch = torch.nn.utils.rnn.pad_sequence([torch.tensor(ids) for ids in run.ids], batch_first=True, padding_value=1)
    attention_mask = (torch.arange(batch.size(1))[None, :] < lengths[:, None]).long()
    assert lengths.max() > MAX_LEN  # long reviews pool over their last chunks only
    with torch.no_grad():
        expected = torch.cat([run.clas.model(torch.tensor([ids]))[0] for ids in run.ids]).softmax(-1)
        probabilities = model(batch, attention_mask=attention_mask).logits.softmax(-1)
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=0)
    assert accuracy(probabilities, run.labels) == accuracy(expected, run.labels)
    config = AwdLstmConfig.from_pretrained(folder)
    assert config.id2label == {0: "neg", 1: "pos"}
    assert (config.bptt, config.max_len, config.classifier_hidden_sizes) == (BPTT, MAX_LEN, [50])


def test_live_learner_settings_carry_over(fastai_run):
    """A backwards classifier with a custom head (a p=0 block), no max_len and its own dropouts and AR/TAR."""
    from fastai.text.all import AWD_LSTM, TextDataLoaders, text_classifier_learner

    run = fastai_run
    df = pd.DataFrame({"text": run.texts[:16], "label": [("neg", "pos")[label] for label in run.labels[:16]]})
    dls = TextDataLoaders.from_df(
        df, text_col="text", label_col="label", valid_pct=0.25, seed=0, bs=4, seq_len=BPTT, text_vocab=run.vocab,
        backwards=True,
    )
    learn = text_classifier_learner(
        dls, AWD_LSTM, config=FASTAI_CONFIG, seq_len=BPTT, max_len=None, lin_ftrs=[20, 10], ps=[0.0, 0.3],
        drop_mult=0.7, alpha=3.0, beta=0.5, pretrained=False,
    )
    model, _ = fastai_learner_to_transformers(learn)
    config = model.config
    assert config.backwards and (config.ar_alpha, config.tar_beta) == (3.0, 0.5)
    assert config.classifier_hidden_sizes == [20, 10]
    assert config.classifier_dropouts == pytest.approx([0.4 * 0.7, 0.0, 0.3])
    assert (config.input_p, config.weight_p) == pytest.approx((0.4 * 0.7, 0.5 * 0.7))
    learn.model.eval()
    # Two reviews read as one document, longer than fastai's default max_len (1440): all of it is pooled.
    first, second = sorted(run.ids, key=len)[-2:]
    document = torch.tensor([first + second])
    assert document.size(1) > 72 * 20
    with torch.no_grad():
        # fastai's backwards data reverses the ids; our backward model takes them in reading order and reverses them.
        expected = learn.model(document.flip(1))[0]
        torch.testing.assert_close(model(document).logits, expected, atol=1e-5, rtol=0)


def test_model_card_names_the_source_and_its_sha256(fastai_run, lm_folder):
    card = (lm_folder / "README.md").read_text()
    for name in ("lm.pth", "itos.pkl"):
        digest = hashlib.sha256((fastai_run.path / name).read_bytes()).hexdigest()
        assert f"`{name}` | `{digest}`" in card
    assert "pipeline_tag: text-generation" in card


# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary transfer
# ----------------------------------------------------------------------------------------------------------------------
def test_transfer_vocab_matches_fastai_match_embeds(fastai_run):
    from fastai.text.all import match_embeds

    old_vocab = fastai_run.vocab
    # Another corpus' vocabulary: some tokens shared (in another order), some new, fastai's padding included.
    new_vocab = old_vocab[:9] + ["brand-new-token", "another-new-one"] + old_vocab[400:9:-3] + ["xxfake"] * 5
    fastai_state = {k: v.clone() for k, v in fastai_run.lm.model.state_dict().items()}
    expected, _ = convert_fastai_state_dict(match_embeds(dict(fastai_state), old_vocab, new_vocab))
    state_dict, _ = convert_fastai_state_dict(fastai_state)
    transferred = transfer_vocab(state_dict, old_vocab, new_vocab)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
        assert torch.equal(transferred[key], expected[key]), key

    model, _ = fastai_weights_to_transformers(fastai_state, old_vocab)
    new_model = transfer_vocab(model, old_vocab, new_vocab)
    assert new_model.config.vocab_size == len(new_vocab)
    assert torch.equal(new_model.get_input_embeddings().weight, expected["model.embed_tokens.weight"])
    assert torch.equal(new_model.lm_head.bias, expected["lm_head.bias"])

    with pytest.raises(FastaiConversionError, match="old_vocab` has 9 tokens"):
        transfer_vocab(state_dict, old_vocab[:9], new_vocab)


# ----------------------------------------------------------------------------------------------------------------------
# Safety
# ----------------------------------------------------------------------------------------------------------------------
class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_vocab_unpickler_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "itos.pkl"
    evil.write_bytes(pickle.dumps(["xxunk", _RunsACommand(marker)]))
    refused = r"not a plain pickled list of tokens \(refused to load `(posix|os)\.system`\)"
    with pytest.raises(FastaiConversionError, match=refused):
        load_fastai_vocab(evil)
    assert not marker.exists()


def test_weights_are_read_without_running_code(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "lm.pth"
    torch.save({"0.encoder.weight": torch.zeros(2, 2), "hook": _RunsACommand(marker)}, evil)
    with pytest.raises(FastaiConversionError, match=r"not a fastai checkpoint.*refers to \['(posix|os)\.system'\]"):
        read_fastai_checkpoint(evil, trust_pickle=True)  # trusting applies to exported Learners only
    assert not marker.exists()


def test_vocab_must_be_a_list_of_strings(tmp_path):
    from fastcore.foundation import L

    fastai_list = tmp_path / "vocab.pkl"
    fastai_list.write_bytes(pickle.dumps(L(["xxunk", "xxpad"])))
    with pytest.raises(FastaiConversionError, match=r"pickle\.dump\(list\(learn\.dls\.vocab\), f\)"):
        load_fastai_vocab(fastai_list)
    numbers = tmp_path / "numbers.pkl"
    numbers.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(FastaiConversionError, match="list of tokens .strings. in id order, got a list with non-string"):
        load_fastai_vocab(numbers)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(("xxunk", "the")))
    assert load_fastai_vocab(plain) == ["xxunk", "the"]


def test_exported_learner_is_opened_only_when_trusted(fastai_run, tmp_path, capsys):
    untrusted = "exported fastai Learner.*trust_pickle=True.*--trust-remote-pickle"
    with pytest.raises(FastaiConversionError, match=untrusted):
        read_fastai_checkpoint(fastai_run.path / "clas_export.pkl")
    parser = add_convert_fastai_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(fastai_run.path / "clas_export.pkl"), str(tmp_path / "out")])
    assert args.func(args) == 2
    assert "--trust-remote-pickle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_command_line_converts_weights(fastai_run, tmp_path, capsys):
    parser = add_convert_fastai_arguments(argparse.ArgumentParser())
    args = parser.parse_args([
        str(fastai_run.path / "clas.pth"), str(tmp_path), "--vocab", str(fastai_run.path / "itos.pkl"),
        "--labels", "neg", "pos", "--bptt", "36", "--max-len", "360", "--drop-mult", "0.3",
    ])
    assert run_convert_fastai(args) == 0
    assert str(tmp_path) in capsys.readouterr().out
    config = AwdLstmConfig.from_pretrained(tmp_path)
    assert (config.bptt, config.max_len, config.id2label[1]) == (36, 360, "pos")
    assert config.output_p == pytest.approx(0.4 * 0.3)  # fastai's classifier dropouts x drop_mult


def test_command_line_never_writes_over_a_model_or_other_files_unasked(fastai_run, tmp_path, capsys):
    parser = add_convert_fastai_arguments(argparse.ArgumentParser())
    lm = [str(fastai_run.path / "lm.pth"), "--vocab", str(fastai_run.path / "itos.pkl")]
    clas = [str(fastai_run.path / "clas.pth"), "--vocab", str(fastai_run.path / "itos.pkl"), "--labels", "neg", "pos"]
    folder = tmp_path / "stage"

    def convert(source: list[str], *options: str) -> int:
        args = parser.parse_args([source[0], str(folder), *source[1:], *options])
        return run_convert_fastai(args)

    assert convert(clas) == 0
    (folder / "ulmfit_stage.json").write_text("{}")  # a trained stage's record
    weights = (folder / "model.safetensors").read_bytes()
    assert convert(lm) == 2
    error = capsys.readouterr().err
    assert "already holds a model" in error and "pass --overwrite to replace it" in error
    assert (folder / "model.safetensors").read_bytes() == weights
    assert convert(lm, "--overwrite") == 0  # replaced whole: nothing of the classifier stays
    assert not (folder / "ulmfit_stage.json").exists()
    assert AwdLstmConfig.from_pretrained(folder).architectures == ["AwdLstmForCausalLM"]
    assert not list(tmp_path.glob(".*partial"))

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    folder = notes
    assert convert(lm, "--overwrite") == 2
    assert "holds files that are not a model (todo.txt)" in capsys.readouterr().err
    assert (notes / "todo.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------------------
# Errors that name the problem and the fix
# ----------------------------------------------------------------------------------------------------------------------
def test_a_file_that_is_not_a_fastai_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(FastaiConversionError, match="is not a fastai checkpoint: pass the `.pth` written by"):
        read_fastai_checkpoint(text)
    other = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(FastaiConversionError, match="not a fastai AWD-LSTM state dict: expected keys like"):
        convert_fastai(other, tmp_path / "out", vocab=["xxunk"])


def test_weights_need_their_vocabulary_of_the_right_size(fastai_run, tmp_path):
    with pytest.raises(FastaiConversionError, match="holds weights only: pass the vocabulary"):
        convert_fastai(fastai_run.path / "lm.pth", tmp_path)
    vocab = fastai_run.vocab
    mismatch = f"has {len(vocab) - 8} tokens but the model's embedding has {len(vocab)} rows"
    with pytest.raises(FastaiConversionError, match=mismatch):
        convert_fastai(fastai_run.path / "lm.pth", tmp_path, vocab=vocab[:-8])


def test_classifier_labels_must_match_the_head(fastai_run, tmp_path):
    with pytest.raises(FastaiConversionError, match=r"3 labels .* for a classifier with 2 outputs"):
        convert_fastai(fastai_run.path / "clas.pth", tmp_path, vocab=fastai_run.vocab, labels=["a", "b", "c"])


def test_an_encoder_alone_is_refused(fastai_run, tmp_path):
    with pytest.raises(FastaiConversionError, match=r"encoder alone \(`learn.save_encoder`\).*learn.save\(name\)"):
        convert_fastai(fastai_run.path / "encoder.pth", tmp_path, vocab=fastai_run.vocab)


@pytest.mark.parametrize(
    "extra_key, architecture",
    [
        ("0.rnns.0.layers.0.linear.weight_raw", "a QRNN"),
        ("0.layers.0.mhra.attention.weight", "a Transformer or Transformer-XL"),
        ("0.rnns.0.module.weight_ih_l0_reverse", "a bidirectional AWD-LSTM"),
    ],
)
def test_unsupported_architectures_are_named(fastai_run, extra_key, architecture):
    state_dict = {**fastai_run.lm.model.state_dict(), extra_key: torch.zeros(1)}
    with pytest.raises(FastaiConversionError, match=f"holds {architecture}.*only fastai's AWD_LSTM"):
        convert_fastai_state_dict(state_dict)


def test_a_missing_key_is_named(fastai_run):
    state_dict = dict(fastai_run.clas.model.state_dict())
    del state_dict["0.module.rnns.1.module.bias_hh_l0"]
    with pytest.raises(FastaiConversionError, match=r"missing \['model.layers.1.lstm.bias_hh_l0'\]"):
        fastai_weights_to_transformers(state_dict, fastai_run.vocab)
    del state_dict["0.module.rnns.2.weight_hh_l0_raw"]
    with pytest.raises(FastaiConversionError, match="incomplete: it has no `model.layers.2.lstm.weight_hh_l0` weights"):
        fastai_weights_to_transformers(state_dict, fastai_run.vocab)
