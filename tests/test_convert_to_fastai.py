"""Export to fastai 2.8.12: our weights load into fastai's own AWD_LSTM models (strictly, and by position through
`load_pretrained`) and give the same logits on real text tokenized by our tokenizer."""

import warnings

import pandas as pd
import pytest
import torch

from conftest import read_imdb
from modeling_awd_lstm import AwdLstmConfig, AwdLstmForCausalLM, AwdLstmForSequenceClassification
from ulmfit.convert_fastai import (
    FastaiConversionError,
    convert_fastai_state_dict,
    save_fastai_pretrained,
    to_fastai_state_dict,
    transfer_vocab,
)
from ulmfit.tokenizer_training import train_fastai_tokenizer

SIZES = dict(emb_size=16, hidden_size=24, num_layers=3)
FASTAI_SIZES = dict(emb_sz=16, n_hid=24, n_layers=3)
BPTT, MAX_LEN = 20, 60


@pytest.fixture(scope="module", autouse=True)
def quiet_fastai():
    warnings.filterwarnings("ignore")  # fastai's own deprecation warnings
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [row["text"] for row in read_imdb("train", limit=60)]
    return train_fastai_tokenizer(texts, min_freq=2, show_progress=False)


@pytest.fixture(scope="module")
def reviews(tokenizer):
    """Real held-out reviews as our tokenizer reads them (fastai's ids)."""
    return tokenizer([row["text"] for row in read_imdb("test", limit=8)]).input_ids


def _config(tokenizer, **values) -> AwdLstmConfig:
    return AwdLstmConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, bptt=BPTT, max_len=MAX_LEN, **SIZES, **values,
    )


def _language_model(tokenizer) -> AwdLstmForCausalLM:
    torch.manual_seed(0)
    model = AwdLstmForCausalLM(_config(tokenizer))
    with torch.no_grad():  # a decoder bias that is not all zeros, so that its transfer is checked
        model.lm_head.bias.normal_()
    return model.eval()


def _classifier(tokenizer) -> AwdLstmForSequenceClassification:
    """A head with a p=0 block, whose fastai `LinBnDrop` has no Dropout child."""
    torch.manual_seed(1)
    config = _config(tokenizer, num_labels=3, classifier_hidden_sizes=[20], classifier_dropouts=[0.2, 0.0])
    model = AwdLstmForSequenceClassification(config)
    with torch.no_grad():  # BatchNorm statistics as after training
        for module in model.classifier.layers:
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.mark.parametrize("kind", ["lm", "classifier"])
@pytest.mark.parametrize("legacy", [False, True])
def test_round_trip_gives_identical_tensors(tokenizer, kind, legacy):
    model = _language_model(tokenizer) if kind == "lm" else _classifier(tokenizer)
    back, back_kind = convert_fastai_state_dict(to_fastai_state_dict(model, legacy_dropped_weights=legacy))
    assert back_kind == kind
    ours = model.state_dict()
    assert set(back) == set(ours)
    for key, tensor in ours.items():
        assert torch.equal(back[key], tensor), key


def test_fastai_language_model_loads_strictly_and_gives_our_logits(tokenizer, reviews):
    from fastai.text.all import AWD_LSTM, awd_lstm_lm_config, get_language_model

    model = _language_model(tokenizer)
    fastai_model = get_language_model(AWD_LSTM, len(tokenizer), config={**awd_lstm_lm_config, **FASTAI_SIZES})
    exported = to_fastai_state_dict(model)
    assert list(exported) == list(fastai_model.state_dict())  # fastai's load_pretrained goes by position
    fastai_model.load_state_dict(exported, strict=True)
    fastai_model.eval()
    fastai_model.reset()
    batch = torch.tensor([ids[:50] for ids in reviews if len(ids) >= 50])
    assert len(batch) >= 4
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, fastai_model(batch)[0], atol=1e-5, rtol=0)


def test_fastai_classifier_loads_strictly_and_gives_our_logits(tokenizer, reviews):
    from fastai.text.all import AWD_LSTM, awd_lstm_clas_config, get_text_classifier

    model = _classifier(tokenizer)
    config = {**awd_lstm_clas_config, **FASTAI_SIZES, "output_p": 0.2}
    fastai_model = get_text_classifier(
        AWD_LSTM, len(tokenizer), 3, seq_len=BPTT, config=config, drop_mult=1.0, lin_ftrs=[20], ps=[0.0],
        max_len=MAX_LEN,
    )
    fastai_model.load_state_dict(to_fastai_state_dict(model), strict=True)
    fastai_model.eval()
    assert max(len(ids) for ids in reviews) > MAX_LEN  # long reviews pool over their last chunks only
    with torch.no_grad():
        # fastai reads each review alone (its padding would count towards max_len); ours in one padded batch.
        expected = torch.cat([fastai_model(torch.tensor([ids]))[0] for ids in reviews])
        padded = tokenizer.pad({"input_ids": reviews}, return_tensors="pt")
        torch.testing.assert_close(model(**padded).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("legacy", [False, True])
def test_fastai_load_pretrained_moves_the_vocabulary_as_transfer_vocab(tokenizer, tmp_path, legacy):
    """The saved pair starts a fastai LM on another corpus (its own vocabulary) exactly where ours starts."""
    from fastai.text.all import AWD_LSTM, TextDataLoaders, awd_lstm_lm_config, language_model_learner

    model = _language_model(tokenizer)
    model.save_pretrained(tmp_path / "stage")
    tokenizer.save_pretrained(tmp_path / "stage")
    weights, vocab = save_fastai_pretrained(tmp_path / "stage", tmp_path / "fastai", legacy_dropped_weights=legacy)
    assert torch.load(weights, weights_only=True).keys() == {"model"}

    other_text = pd.DataFrame({"text": [row["text"] for row in read_imdb("unsup", limit=30)]})
    dls = TextDataLoaders.from_df(other_text, text_col="text", is_lm=True, valid_pct=0.2, seed=0, bs=4, seq_len=BPTT)
    learn = language_model_learner(
        dls, AWD_LSTM, config={**awd_lstm_lm_config, **FASTAI_SIZES}, pretrained=False, path=tmp_path
    )
    learn.load_pretrained(weights, vocab)
    new_vocab = list(dls.vocab)
    assert new_vocab != tokenizer.itos
    expected = transfer_vocab(model, tokenizer.itos, new_vocab).state_dict()
    loaded, _ = convert_fastai_state_dict(learn.model.state_dict())
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


def test_only_word_level_models_of_this_package_are_exported(tokenizer, tmp_path):
    model = _language_model(tokenizer)
    model.save_pretrained(tmp_path)  # no vocab.json beside it
    with pytest.raises(FastaiConversionError, match="no vocab.json"):
        save_fastai_pretrained(tmp_path, tmp_path / "out")
    with pytest.raises(FastaiConversionError, match="Only AwdLstmForCausalLM"):
        to_fastai_state_dict(model.model)
