"""Runs that survive interruption: finished stages are kept, interrupted ones resume exactly, seeds reproduce, and
nothing a user trained is written over without `--overwrite`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ulmfit.cli import main

REPO = Path(__file__).resolve().parent.parent
# Stage 2 checkpoints every 10 of its 200 steps, so a run killed once a checkpoint appears is killed mid-stage.
TINY_RECIPE = """
name: tiny
seed: 7
model: {emb_size: 32, hidden_size: 64, num_layers: 2, drop_mult: 0.5, bptt: 20, max_len: 60}
tokenizer: {kind: fastai, max_vocab: 2000, min_freq: 2}
stages:
  pretrain:
    data: {path: "bundled:wikitext2_valid.txt.gz", format: text}
    max_documents: 300
    training: {max_steps: 6, learning_rate: 0.01, per_device_train_batch_size: 8, ulmfit_schedule: one_cycle,
               save_strategy: steps, save_steps: 3, logging_steps: 2}
  finetune_lm:
    parent: pretrain
    data: {path: "bundled:trec_train_5500.label.gz", format: trec, label_column: null}
    training: {max_steps: 200, learning_rate: 0.01, per_device_train_batch_size: 8, ulmfit_schedule: one_cycle,
               discriminative_lr_factor: 1.0, save_strategy: steps, save_steps: 10, logging_steps: 10}
"""


@pytest.fixture
def recipe(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return str(path)


def ulmfit(*args: str) -> list[str]:
    return [sys.executable, "-m", "training", *args]


def run_env() -> dict:
    # Every run on one thread: the same reduction order in every process, so weights compare exactly.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def stage_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_a_killed_run_resumes_to_the_uninterrupted_weights_and_keeps_finished_stages(recipe, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    subprocess.run(ulmfit("run", recipe, "--output-dir", str(uninterrupted)), env=run_env(), check=True,
                   capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(ulmfit("run", recipe, "--output-dir", str(killed)), env=run_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed / "finetune_lm" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "checkpoint-20").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "finetune_lm" / "ulmfit_stage.json").exists(), "the run finished before it was killed"
    assert (killed / "pretrain" / "ulmfit_stage.json").exists()
    pretrain_bytes = {p.name: p.read_bytes() for p in (killed / "pretrain").iterdir() if p.is_file()}

    again = subprocess.run(ulmfit("run", recipe, "--output-dir", str(killed)), env=run_env(), check=True,
                           capture_output=True, text=True)
    assert "reused (finished earlier)" in again.stdout
    assert "resumed from checkpoint-" in again.stdout
    assert {p.name: p.read_bytes() for p in (killed / "pretrain").iterdir() if p.is_file()} == pretrain_bytes
    # One seed gives one stage 1, and the resumed stage 2 ends where the uninterrupted one did.
    for stage in ("pretrain", "finetune_lm"):
        expected, got = stage_weights(uninterrupted / stage), stage_weights(killed / stage)
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(expected[name], got[name]), (stage, name)


def test_finished_stages_are_kept_unless_overwritten_and_then_replaced_whole(recipe, tmp_path, capsys):
    fast = ["--set", "stages.finetune_lm.training.max_steps=4"]
    assert main(["run", recipe, "--output-dir", str(tmp_path / "out"), *fast]) == 0
    pretrain = tmp_path / "out" / "pretrain"
    weights = (pretrain / "model.safetensors").read_bytes()
    (pretrain / "tokenizer.json").write_text("{}")  # as a subword run would leave beside a fastai vocabulary
    capsys.readouterr()

    assert main(["pretrain", recipe, "--output-dir", str(tmp_path / "out")]) == 0
    assert "reused (finished earlier)" in capsys.readouterr().out
    assert (pretrain / "model.safetensors").read_bytes() == weights

    assert main(["pretrain", recipe, "--output-dir", str(tmp_path / "out"), "--overwrite",
                 "--set", "seed=8"]) == 0
    assert not (pretrain / "tokenizer.json").exists()
    assert (pretrain / "model.safetensors").read_bytes() != weights
    assert json.loads((pretrain / "ulmfit_stage.json").read_text())["stage"] == "pretrain"


def test_an_interrupted_stage_resumes_only_with_its_own_settings(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    folder = out / "pretrain"
    # An interrupted stage: a checkpoint and no record.
    assert main(["pretrain", recipe, "--output-dir", str(out)]) == 0
    (folder / "ulmfit_stage.json").unlink()
    capsys.readouterr()

    assert main(
        ["pretrain", recipe, "--output-dir", str(out), "--set", "stages.pretrain.training.learning_rate=0.02"]
    ) == 2
    error = capsys.readouterr().err
    assert "interrupted run started with other settings" in error and "learning_rate" in error and "--restart" in error
    # A training argument the recipe does not set counts too.
    assert main(["pretrain", recipe, "--output-dir", str(out), "--training", "max_grad_norm=0.5"]) == 2
    assert "training.max_grad_norm differ" in capsys.readouterr().err

    assert main(["pretrain", recipe, "--output-dir", str(out), "--set", "stages.pretrain.training.learning_rate=0.02",
                 "--restart"]) == 0
    assert "| trained" in capsys.readouterr().out.replace("  ", "")


def test_a_folder_that_no_stage_wrote_is_never_cleared(recipe, tmp_path, capsys):
    (tmp_path / "out" / "pretrain").mkdir(parents=True)
    (tmp_path / "out" / "pretrain" / "notes.txt").write_text("mine")
    assert main(["pretrain", recipe, "--output-dir", str(tmp_path / "out")]) == 2
    assert "no ULMFiT stage wrote" in capsys.readouterr().err
    assert (tmp_path / "out" / "pretrain" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.pretrain.training.learning_rate=0", "learning_rate must be positive"),
        ("stages.pretrain.training.num_train_epochs=0", "num_train_epochs must be positive"),
        ("stages.pretrain.training.max_steps=many", "`stages.pretrain.training.max_steps` must be int"),
        ("stages.pretrain.training.resume_from_checkpoint=runs/x/checkpoint-3",
         "running a stage's command again resumes it"),
        ("stages.pretrain.data.label_names=negpos", "label_names must be a list of class names"),
    ],
)
def test_training_values_that_cannot_train_fail_at_validation(recipe, override, message, capsys):
    extra = ["--set", "stages.pretrain.training.max_steps=-1"] if "num_train_epochs" in override else []
    assert main(["validate", recipe, *extra, "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_numbers_written_as_1e_minus_3_are_numbers(recipe, capsys):
    from ulmfit.cli import _load, build_parser

    args = build_parser().parse_args(["validate", recipe, "--set", "stages.pretrain.training.learning_rate=1e-3"])
    assert _load(args).stages["pretrain"].training["learning_rate"] == 0.001


def test_a_classifier_needs_two_classes(recipe, tmp_path, capsys):
    data = tmp_path / "one_class.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"review number {i} was fine", "label": "pos"}) + "\n" for i in range(20))
    )
    assert main(["pretrain", recipe, "--output-dir", str(tmp_path / "out")]) == 0
    assert main([
        "train-classifier", recipe, "--output-dir", str(tmp_path / "out"),
        "--parent", str(tmp_path / "out" / "pretrain"),
        "--set", f"stages.classifier={{data: {{path: {data}, label_column: label}}, training: {{max_steps: 2}}}}",
    ]) == 2
    assert "needs at least two" in capsys.readouterr().err


def test_predict_refuses_a_language_model_and_a_bad_batch_size_and_keeps_earlier_predictions(recipe, tmp_path, capsys):
    assert main(["pretrain", recipe, "--output-dir", str(tmp_path / "out")]) == 0
    texts = tmp_path / "texts.txt"
    texts.write_text("a fine film\na dull film\n")
    earlier = tmp_path / "texts.txt.predictions.jsonl"
    earlier.write_text('{"label": "pos"}\n')
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "out" / "pretrain"), str(texts)]) == 2
    assert "not a classifier" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "out" / "pretrain"), str(texts), "--batch-size", "-1"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    assert earlier.read_text() == '{"label": "pos"}\n'
