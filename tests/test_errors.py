"""Bad input ends in one line that names the problem and the fix (exit code 2), never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_awd_lstm import AwdLstmConfig, AwdLstmForCausalLM
from ulmfit import cli
from ulmfit.cli import main

PRETRAIN_ONLY = """
name: tiny
model: {emb_size: 16, hidden_size: 32, num_layers: 2, bptt: 10, max_len: 30}
tokenizer: {kind: fastai, max_vocab: 500, min_freq: 1}
stages:
  pretrain:
    data: {path: DATA}
    eval_fraction: 0
    training: {max_steps: 2, per_device_train_batch_size: 2}
"""


def recipe_reading(tmp_path: Path, data: Path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(PRETRAIN_ONLY.replace("DATA", str(data)))
    return str(path)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "", "empty.txt' holds no data"),
    ("header.csv", "text,label\n", "header.csv' holds no data"),
    ("broken.jsonl", '{"text": "fine"}\n{"text": "broken\n{"text": "fine"}\n',
     "broken.jsonl' could not be read as json"),
])
def test_unreadable_data_files_are_named(tmp_path, capsys, name, content, message):
    data = tmp_path / name
    data.write_text(content)
    assert main(["pretrain", recipe_reading(tmp_path, data), "--output-dir", str(tmp_path / "out")]) == 2
    assert message in one_line_error(capsys)


def test_evaluating_a_stage_without_evaluation_data_is_named(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("A few words of text.\n" * 20)
    recipe = recipe_reading(tmp_path, data)
    assert main(["validate", recipe, "--set", "stages.pretrain.training.eval_strategy=steps"]) == 2
    assert "eval_strategy 'steps' needs evaluation data" in one_line_error(capsys)


def test_the_range_test_chooses_the_stage_s_rate_not_the_twin_s(capsys):
    assert main(["validate", "demo", "--set", "stages.classifier.from_scratch_training.learning_rate=find"]) == 2
    assert "stages.classifier.from_scratch_training.learning_rate" in one_line_error(capsys)


def test_a_misspelt_stage_is_named_before_its_missing_keys(capsys):
    assert main(["validate", "demo", "--set", "stages.pretrian.max_documents=1"]) == 2
    assert "Unknown stage `stages.pretrian`" in one_line_error(capsys)


@pytest.mark.parametrize("command", [
    ["finetune-lm", "demo", "--parent", "/no/such/dir"],
    ["generate", "/no/such/dir", "The movie"],
    ["predict", "/no/such/dir", "texts.txt"],
])
def test_a_missing_model_folder_is_named(tmp_path, capsys, command):
    (tmp_path / "texts.txt").write_text("A fine film.\n")
    command = [part.replace("texts.txt", str(tmp_path / "texts.txt")) for part in command]
    assert main(command + (["--output-dir", str(tmp_path)] if command[0] == "finetune-lm" else [])) == 2
    assert "/no/such/dir holds no model" in one_line_error(capsys)


@pytest.mark.parametrize("offline, message", [
    (False, "'someone/no-such-model' is neither a local folder nor a Hub model repository this token can see"),
    (True, "'someone/no-such-model' is not a local folder, and the Hub could not be reached to fetch it"),
])
def test_a_parent_that_is_no_folder_and_no_reachable_hub_model_is_named(hub_server, tmp_path, offline, message):
    """A name without a path prefix is a Hub id: looked up before any data is read, over HTTP to the loopback Hub."""
    env = {**hub_server.client_env(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    for command in (["generate", "someone/no-such-model", "The movie"],
                    ["finetune-lm", "demo", "--parent", "someone/no-such-model", "--output-dir", str(tmp_path)]):
        result = subprocess.run([sys.executable, "-m", "ulmfit", *command], env=env, capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "finetune_lm").exists()


def test_a_truncated_weights_file_is_named(tmp_path, capsys):
    model = AwdLstmForCausalLM(AwdLstmConfig(vocab_size=40, emb_size=8, hidden_size=16, num_layers=2))
    model.save_pretrained(tmp_path / "lm")
    weights = tmp_path / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["generate", str(tmp_path / "lm"), "The movie"]) == 2
    assert "model.safetensors is damaged" in one_line_error(capsys)


def test_token_ids_outside_the_vocabulary_are_named():
    model = AwdLstmForCausalLM(AwdLstmConfig(vocab_size=40, emb_size=8, hidden_size=16, num_layers=2))
    with pytest.raises(ValueError, match=r"Token ids must lie in 0\.\.39.*holds 3\.\.57.*this model's tokenizer"):
        model(torch.tensor([[3, 57]]))


def test_an_interrupted_command_says_how_to_continue(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "run", interrupted)
    assert main(["run", "demo"]) == 130
    assert "run the same command again to continue (it resumes from its last checkpoint)" in one_line_error(capsys)


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception, match="Unknown stage"):
        main(["--debug", "validate", "demo", "--set", "stages.pretrian.max_documents=1"])


MEASURE_RSS = """
import sys, torch
from ulmfit.stages import reuse_freed_memory
if sys.argv[1] == "reuse":
    reuse_freed_memory()
block = torch.ones(50_000_000)  # 200 MB, far above glibc's default mmap threshold
del block
print(int(open("/proc/self/statm").read().split()[1]) * 4096)
"""


def test_freed_blocks_stay_in_the_process_for_the_next_step():
    """By default glibc unmaps a freed large block at once; the stage keeps it for the next step to reuse."""
    def resident_after_free(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", MEASURE_RSS, mode], env=env, capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parent.parent)
        return int(out.stdout.split()[-1])

    assert resident_after_free("reuse") - resident_after_free("default") > 150_000_000
