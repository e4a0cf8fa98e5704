"""Token importance for a classifier's prediction (fastai v1's intrinsic attention), from Python and from
`ulmfit predict --explain`."""

import json

import pytest
import torch

from conftest import read_imdb
from modeling_awd_lstm import AwdLstmConfig, AwdLstmForSequenceClassification
from ulmfit.cli import main
from ulmfit.interpret import Explanation, explain, explanations_html
from ulmfit.tokenizer_training import train_fastai_tokenizer

BPTT, MAX_LEN = 8, 16


@pytest.fixture(scope="module")
def tokenizer():
    return train_fastai_tokenizer([row["text"] for row in read_imdb("train", limit=80)], show_progress=False)


@pytest.fixture(scope="module")
def classifier(tokenizer):
    torch.manual_seed(0)
    config = AwdLstmConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, emb_size=16, hidden_size=24, num_layers=2,
        bptt=BPTT, max_len=MAX_LEN, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
    )
    return AwdLstmForSequenceClassification(config).eval()


def test_importance_is_the_gradient_of_the_class_probability_by_each_token_embedding(classifier, tokenizer):
    text = " ".join([word for word in tokenizer.itos if word.isalpha() and not word.startswith("xx")][10:15])
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert len(set(ids[0].tolist())) == ids.shape[1] < BPTT  # distinct tokens, one chunk
    explanation = explain(classifier, tokenizer, text, label="pos")

    # The same derivative by another road: each token's row of the embedding matrix's gradient.
    classifier.zero_grad()
    classifier(ids).logits.softmax(dim=-1)[0, 1].backward()
    rows = classifier.get_input_embeddings().weight.grad[ids[0]].abs().sum(dim=-1)
    classifier.zero_grad()
    assert explanation.importance == pytest.approx((rows / rows.max()).tolist(), rel=1e-4)
    assert explanation.tokens == tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert explanation.label == "pos"
    with torch.no_grad():
        assert explanation.score == pytest.approx(float(classifier(ids).logits.softmax(-1)[0, 1]), rel=1e-5)


def test_long_texts_weigh_only_the_tokens_the_classifier_pools_over(classifier, tokenizer):
    text = read_imdb("test", limit=1)[0]["text"]
    explanation = explain(classifier, tokenizer, text)  # the predicted class
    assert len(explanation.importance) == len(explanation.tokens) > 3 * MAX_LEN
    assert max(explanation.importance) == 1.0
    pooled_from = len(explanation.tokens) - MAX_LEN - BPTT  # the chunks that reach the last max_len tokens
    assert all(weight == 0 for weight in explanation.importance[:pooled_from])
    assert explanation.label == classifier.config.id2label[int(classifier(
        tokenizer(text, return_tensors="pt").input_ids).logits.argmax())]
    with pytest.raises(ValueError, match="Unknown class 'happy'; the classifier's classes are"):
        explain(classifier, tokenizer, text, label="happy")


def test_predict_explain_writes_weights_and_a_page(classifier, tokenizer, tmp_path, capsys):
    folder = tmp_path / "classifier"
    classifier.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reviews = tmp_path / "reviews.txt"
    reviews.write_text("A moving, beautifully acted film.\nDull and predictable.\n")
    assert main(["predict", str(folder), str(reviews), "--explain", "--output", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [len(row["tokens"]) for row in rows] == [len(row["importance"]) for row in rows]
    assert all(max(row["importance"]) == 1.0 for row in rows)
    page = (tmp_path / "out.html").read_text()
    assert page.count("<span") == sum(len(row["tokens"]) for row in rows)
    assert "out.html" in capsys.readouterr().out
    escaped = explanations_html([Explanation(text="<b>", label="a&b", score=0.5, tokens=["<b>"], importance=[1.0])])
    assert "&lt;b&gt;</span>" in escaped and "<b>a&amp;b</b>" in escaped and "<b></span>" not in escaped
