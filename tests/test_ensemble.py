"""Forward and backward classifiers from recipes, and `ulmfit predict` with both: the mean of their probabilities."""

import json
from pathlib import Path

import pytest

from modeling_awd_lstm import AwdLstmConfig
from ulmfit.cli import main
from ulmfit.ensemble import check_ensemble

RECIPE = """
name: tiny
seed: 5
model: {emb_size: 16, hidden_size: 32, num_layers: 2, bptt: 20, max_len: 60, backwards: BACKWARDS}
tokenizer: {kind: fastai, max_vocab: 2000, min_freq: 2}
stages:
  pretrain:
    data: {path: "bundled:trec_train_5500.label.gz", format: trec, label_column: null}
    max_documents: 600
    training: {max_steps: 3, per_device_train_batch_size: 8}
  classifier:
    parent: pretrain
    data: {path: "bundled:trec_train_5500.label.gz", format: trec, label_column: coarse_label}
    max_documents: 300
    training: {max_steps: 3, per_device_train_batch_size: 8}
"""


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, str]:
    folders = {}
    for direction in ("forward", "backward"):
        root = tmp_path_factory.mktemp(direction)
        recipe = root / "tiny.yaml"
        recipe.write_text(RECIPE.replace("BACKWARDS", str(direction == "backward").lower()))
        assert main(["run", str(recipe), "--output-dir", str(root / "runs")]) == 0
        folders[direction] = str(root / "runs" / "classifier")
    return folders


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "questions.txt"
    path.write_text("How far is it from Denver to Aspen ?\nWho wrote Hamlet ?\nWhat is a caldera ?\n")
    return path


def predictions(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_backward_recipe_trains_backward_stages_end_to_end(classifiers):
    for direction, folder in classifiers.items():
        config = json.loads((Path(folder) / "config.json").read_text())
        assert config["backwards"] is (direction == "backward")
        lm = json.loads((Path(folder).parent / "pretrain" / "config.json").read_text())
        assert lm["backwards"] is (direction == "backward")


def test_the_ensemble_predicts_the_mean_of_both_classifiers(classifiers, questions, tmp_path, capsys):
    outputs = {}
    for name, command in {
        "forward": [classifiers["forward"]],
        "backward": [classifiers["backward"]],
        "ensemble": [classifiers["forward"], "--backward", classifiers["backward"]],
    }.items():
        outputs[name] = tmp_path / f"{name}.jsonl"
        model, *rest = command
        assert main(["predict", model, str(questions), *rest, "--output", str(outputs[name])]) == 0
    assert "(forward + backward ensemble)" in capsys.readouterr().out
    forward, backward, ensemble = (predictions(outputs[name]) for name in ("forward", "backward", "ensemble"))
    for one, other, both in zip(forward, backward, ensemble):
        for label, p in both["probabilities"].items():
            assert p == pytest.approx((one["probabilities"][label] + other["probabilities"][label]) / 2, abs=2e-6)
        assert both["label"] == max(both["probabilities"], key=both["probabilities"].get)


@pytest.mark.parametrize("order, message", [
    (("backward", "backward"), "reads text backwards: give it as the backward classifier, and a forward one first"),
    (("forward", "forward"),
     "reads text forwards: the backward classifier is one trained with `model.backwards: true`"),
])
def test_a_backward_model_given_as_forward_is_named(classifiers, questions, capsys, order, message):
    first, second = (classifiers[name] for name in order)
    assert main(["predict", first, str(questions), "--backward", second]) == 2
    assert message in capsys.readouterr().err


def test_classifiers_of_different_classes_do_not_pair():
    forward = AwdLstmConfig(id2label={0: "neg", 1: "pos"})
    backward = AwdLstmConfig(id2label={0: "pos", 1: "neg"}, backwards=True)
    with pytest.raises(ValueError, match=r"different classes: fwd \['neg', 'pos'\], bwd \['pos', 'neg'\]"):
        check_ensemble(forward, backward, ("fwd", "bwd"))


def test_a_backward_recipe_from_a_forward_parent_is_refused(classifiers, tmp_path, capsys):
    recipe = tmp_path / "backward_from_forward.yaml"
    recipe.write_text(RECIPE.replace("BACKWARDS", "true"))
    forward_lm = str(Path(classifiers["forward"]).parent / "pretrain")
    assert main(["train-classifier", str(recipe), "--parent", forward_lm, "--output-dir", str(tmp_path)]) == 2
    assert "reads text forwards but the recipe reads it backwards (model.backwards: true)" in capsys.readouterr().err
    assert not (tmp_path / "classifier" / "ulmfit_stage.json").exists()
