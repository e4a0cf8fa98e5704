"""`ulmfit` end to end on the bundled demo data: run, predict, generate, and the `accelerate launch` path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline

from ulmfit.cli import main
from ulmfit.stages import last_checkpoint

# The demo recipe shrunk to CI time, with its own stage 1 instead of the shipped model: a small model, stage 1 on part
# of WikiText-2, and (through overrides) stages 2-3 on TREC-6 questions, whose classifier shows learning within
# seconds. A language model this small carries little, so the classifier trains every layer at one rate.
TREC_TRAIN = {"path": "bundled:trec_train_5500.label.gz", "format": "trec", "label_column": "coarse_label"}
TREC_TEST = {"path": "bundled:trec_TREC_10.label.gz", "format": "trec", "label_column": "coarse_label"}
SMALL = [
    "--set", "model.emb_size=48", "--set", "model.hidden_size=96", "--set", "model.bptt=40",
    "--set", "tokenizer.max_vocab=4000", "--set", "stages.finetune_lm.parent=pretrain",
    "--set", "stages.pretrain.max_documents=1200", "--set", "stages.pretrain.max_eval_documents=200",
    "--set", "stages.pretrain.training.num_train_epochs=1", "--set", "stages.finetune_lm.max_eval_documents=null",
    "--set", f"stages.finetune_lm.data={json.dumps(dict(TREC_TRAIN, label_column=None))}",
    "--set", f"stages.finetune_lm.eval_data={json.dumps(dict(TREC_TEST, label_column=None))}",
    "--set", "stages.finetune_lm.training.num_train_epochs=2",
    "--set", "stages.finetune_lm.training.learning_rate=0.01",
    "--set", f"stages.classifier.data={json.dumps(TREC_TRAIN)}",
    "--set", f"stages.classifier.test_data={json.dumps(TREC_TEST)}",
    "--set", "stages.classifier.training={num_train_epochs: 4, learning_rate: 0.01, per_device_train_batch_size: 32,"
    " ulmfit_schedule: stlr, discriminative_lr_factor: 1.0}",
    "--set", "stages.classifier.drop_mult=0.2",
    "--set", "stages.classifier.compare_from_scratch=false",
]
TREC_LABELS = {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("demo")
    assert main(["run", "demo", "--output-dir", str(output), *SMALL]) == 0
    return output


def test_run_writes_three_loadable_stages_and_the_classifier_beats_chance(demo_run, capsys):
    for stage in ("pretrain", "finetune_lm"):
        folder = demo_run / stage
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.config.vocab_size == len(tokenizer)
        record = json.loads((folder / "ulmfit_stage.json").read_text())
        assert record["metrics"]["eval_perplexity"] < len(tokenizer)  # far better than a uniform guess
        assert (folder / "training_curves.png").stat().st_size > 0
    record = json.loads((demo_run / "finetune_lm" / "ulmfit_stage.json").read_text())
    assert record["parent"] == str(demo_run / "pretrain")
    classifier = AutoModelForSequenceClassification.from_pretrained(demo_run / "classifier")
    assert set(classifier.config.id2label.values()) == TREC_LABELS
    record = json.loads((demo_run / "classifier" / "ulmfit_stage.json").read_text())
    # The 500 held-out TREC_10 questions: the most frequent class (NUM) is 22.6%, chance 1/6.
    assert record["metrics"]["test_accuracy"] > 0.5, record["metrics"]
    assert record["parent"] == str(demo_run / "finetune_lm")
    # The demo's honest baseline, fit on the same training split and scored on the same test questions.
    assert record["baselines"]["tfidf_test_accuracy"] > 0.5
    assert "tfidf_test_accuracy" not in record["metrics"]
    assert "tfidf_test_accuracy" in (demo_run / "classifier" / "README.md").read_text()


def test_predict_writes_labels_and_probabilities(demo_run, tmp_path):
    reviews = tmp_path / "reviews.csv"
    reviews.write_text('review\n"Who wrote Hamlet ?"\n"How many miles is it to the moon ?"\n', encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert main(
        ["predict", str(demo_run / "classifier"), str(reviews), "--text-column", "review", "--output", str(output)]
    ) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["text"] for row in rows] == ["Who wrote Hamlet ?", "How many miles is it to the moon ?"]
    for row in rows:
        assert row["label"] in TREC_LABELS
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)


def test_predict_names_a_missing_column(demo_run, tmp_path):
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("body\nfine\n", encoding="utf-8")
    assert main(["predict", str(demo_run / "classifier"), str(reviews), "--text-column", "review"]) == 2


def test_generate_continues_the_prompt(demo_run, capsys):
    assert main(
        ["generate", str(demo_run / "finetune_lm"), "What is the", "--max-new-tokens", "12", "--seed", "3"]
    ) == 0
    text = capsys.readouterr().out
    # The same sampling, seeded the same way, through the pipeline directly.
    torch.manual_seed(3)
    generator = pipeline("text-generation", model=str(demo_run / "finetune_lm"))
    expected = generator(
        "What is the", max_new_tokens=12, do_sample=True, temperature=0.8, top_k=40
    )[0]["generated_text"]
    assert expected.startswith("What is the") and expected in text


def test_a_single_stage_starts_from_a_given_parent(demo_run, tmp_path):
    code = main([
        "train-classifier", "demo", "--output-dir", str(tmp_path), "--parent", str(demo_run / "finetune_lm"),
        *SMALL, "--training", "max_steps=2",
    ])
    assert code == 0
    record = json.loads((tmp_path / "classifier" / "ulmfit_stage.json").read_text())
    assert record["parent"] == str(demo_run / "finetune_lm")


def test_a_stage_whose_parent_was_not_run_fails_clearly(tmp_path, capsys):
    assert main(["finetune-lm", "demo", "--set", "stages.finetune_lm.parent=pretrain",
                 "--output-dir", str(tmp_path)]) == 2
    assert "Stage 'pretrain' has not finished" in capsys.readouterr().err


def test_accelerate_launch_runs_two_processes(demo_run, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): both train the classifier stage; rank 0 writes it."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "ulmfit", "train-classifier", "demo", "--output-dir", str(tmp_path),
        "--parent", str(demo_run / "finetune_lm"), *SMALL, "--training", "max_steps=3",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes 2" in result.stdout
    assert result.stdout.count("ULMFiT run") == 1  # only the main process summarises
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier")
    assert torch.isfinite(next(model.parameters())).all()


def test_a_command_that_succeeded_in_a_process_group_ends_the_process_itself(tmp_path):
    """gloo's threads can abort a process during the interpreter's teardown, so after success `ulmfit` destroys the
    group, runs the exit handlers and exits; after a failure the group stays, as other processes may still wait on
    it."""
    program = f"""
import atexit, sys
import torch.distributed as dist
from ulmfit.cli import main
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
atexit.register(lambda: open({str(tmp_path / 'exit-handler-ran')!r}, "w").close())
assert main(["finetune-lm", "demo", "--set", "stages.finetune_lm.parent=pretrain",
             "--output-dir", {str(tmp_path / 'no-parent')!r}]) == 2
assert dist.is_initialized()
main(["validate", "demo"])
sys.exit(7)
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "exit-handler-ran").exists()


def _initial_rates(stage_folder: Path) -> list[float]:
    """Each layer group's peak rate, bottom to top, from the optimizer the stage's last checkpoint saved."""
    checkpoint = Path(last_checkpoint(stage_folder))
    groups = torch.load(checkpoint / "optimizer.pt", weights_only=False)["param_groups"]
    return [rate for _, rate in sorted({(g["layer_group"], g["initial_lr"]) for g in groups})]


def test_pretraining_from_scratch_trains_every_layer_at_one_rate(demo_run, tmp_path):
    """Discriminative rates protect pretrained layers: stage 1 has none, so by default its LSTMs do not train 2.6^k
    slower. A recipe may still set the factor: the demo's stage 1 pins 2.6, its stage 2 one rate (a fine-tuning
    stage that sets nothing keeps 2.6: `test_paper_recipes_fine_tune_the_lm_as_the_paper_does`)."""
    unpinned = "{num_train_epochs: 1, learning_rate: 0.01, per_device_train_batch_size: 32, ulmfit_schedule: one_cycle}"
    assert main(["pretrain", "demo", "--output-dir", str(tmp_path), *SMALL,
                 "--set", f"stages.pretrain.training={unpinned}", "--training", "max_steps=2"]) == 0
    pretrain = _initial_rates(tmp_path / "pretrain")
    assert len(pretrain) == 4 and pretrain == pytest.approx([0.01] * 4)
    rates = _initial_rates(demo_run / "pretrain")
    assert rates == pytest.approx([rates[-1] / 2.6**k for k in (3, 2, 1, 0)])
    finetune = _initial_rates(demo_run / "finetune_lm")
    assert len(finetune) == 4 and finetune == pytest.approx([finetune[-1]] * 4)
