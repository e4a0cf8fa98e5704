"""Smoke tests of `python -m experiments.run`: every command end to end in `--quick` mode, on a copy of the bundled
real data laid out as the shared data folder, from a tiny stage-1 model (random weights, a real vocabulary). The
numbers mean nothing; the tests check that each command runs, writes what it should and skips what is done. One unit
test checks that the fastai side of stage 3 follows our trainer's schedule, group by group."""

import gzip
import json
import os
import shutil
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DEMO_DATA
from experiments.run import ABLATIONS, LOWSHOT_METHODS, main
from modeling_awd_lstm import AwdLstmConfig, AwdLstmForCausalLM, cpu_has_bf16_kernels
from ulmfit.tokenizer_training import train_fastai_tokenizer

# bf16 runs where the CPU has the kernels; elsewhere oneDNN has no bf16 LSTM, and fastai's side cannot run in it.
FAST_PRECISION = "bf16" if cpu_has_bf16_kernels() else "fp32"


def _lines(name: str, limit: int) -> list[str]:
    with gzip.open(DEMO_DATA / name, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[:limit]


def _write_jsonl(path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The shared data layout (trec/, imdb/) from the bundled subsets, a general corpus and a tiny stage 1."""
    root = tmp_path_factory.mktemp("experiments")
    data = root / "data"
    (data / "trec").mkdir(parents=True)
    (data / "imdb").mkdir()
    for name in ("train_5500.label", "TREC_10.label"):
        (data / "trec" / name).write_bytes(gzip.decompress((DEMO_DATA / f"trec_{name}.gz").read_bytes()))
    for split in ("train", "test", "unsup"):
        shutil.copy(DEMO_DATA / f"imdb_{split}.jsonl.gz", data / "imdb" / f"{split}.jsonl.gz")
    general = root / "general"
    train_lines = _lines("wikitext2_valid.txt.gz", 300)
    _write_jsonl(general / "train.jsonl.gz", train_lines)
    _write_jsonl(general / "valid.jsonl.gz", _lines("wikitext2_test.txt.gz", 60))

    stage1 = root / "work" / "general_lm" / "pretrain"
    tokenizer = train_fastai_tokenizer(train_lines, max_vocab=2000, min_freq=2, show_progress=False)
    config = AwdLstmConfig(
        vocab_size=len(tokenizer), emb_size=16, hidden_size=32, num_layers=3, bptt=20, max_len=60,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AwdLstmForCausalLM(config).save_pretrained(stage1)
    tokenizer.save_pretrained(stage1)
    return SimpleNamespace(root=root, data=data, general=general, stage1=stage1, work=root / "work",
                           results=root / "results")


def run(env, command: str, *options: str) -> None:
    assert main([
        command, "--quick", "--threads", "1", "--data-dir", str(env.data), "--work-dir", str(env.work),
        "--results-dir", str(env.results), "--stage1", str(env.stage1), *options,
    ]) == 0


@pytest.fixture(scope="module")
def compared(env):
    run(env, "compare", "--task", "trec6", "--seeds", "0,1", "--precision", FAST_PRECISION)
    run(env, "compare", "--task", "imdb", "--seeds", "0", "--precision", "fp32")  # reviews cut to their last tokens
    return env


@pytest.fixture(scope="module")
def lowshot(compared):
    run(compared, "lowshot", "--seeds", "0", "--precision", "fp32")
    return compared


@pytest.fixture(scope="module")
def ablations(compared):
    run(compared, "ablations", "--task", "trec6", "--seeds", "0", "--precision", FAST_PRECISION, "--pretrain-backward",
        "--general-corpus", str(compared.general))
    return compared


@pytest.fixture(scope="module")
def timed(compared):
    before = sorted(compared.work.rglob("*"))
    run(compared, "stage2_timing", "--task", "trec6", "--rounds", "2", "--precision", FAST_PRECISION)
    compared.work_files_timing_added = sorted(set(compared.work.rglob("*")) - set(before))
    return compared


def _result(env, experiment: str, name: str, seed: int) -> dict:
    return json.loads((env.results / experiment / f"{name}_seed{seed}.json").read_text())


# ----------------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------------
def test_compare_runs_both_implementations_from_one_stage2_per_side(compared):
    records = {(impl, seed): _result(compared, "compare_trec6", impl, seed)
               for impl in ("ours", "fastai") for seed in (0, 1)}
    for (impl, seed), record in records.items():
        assert record["impl"] == impl and record["seed"] == seed and record["task"] == "trec6"
        assert 0 <= record["test_accuracy"] <= 1 and record["n_test"] == 60
        stage2, stage3 = record["stage2"], record["stage3"]
        assert stage2["shared_across_seeds"] and stage2["seed"] == 0
        for key in ("valid_perplexity", "valid_perplexity_own", "seconds", "train_seconds", "tokens_per_second"):
            assert stage2[key] > 0, (impl, key)
        for key in ("seconds", "train_seconds", "tokens_per_second"):
            assert stage3[key] > 0, (impl, key)
        assert len(stage3["test_probabilities"]) == 60 and stage3["curve"]
        assert record["settings"]["precision"] == FAST_PRECISION
        assert record["command"].startswith("python -m experiments.run")
        assert record["hardware"]["versions"]["torch"]
    # Each side's stage 2 ran once, for every seed; both sides read the same vocabulary and take the same steps.
    for impl in ("ours", "fastai"):
        assert records[impl, 0]["stage2"] == records[impl, 1]["stage2"]
    assert records["ours", 0]["stage2"]["vocab_size"] == records["fastai", 0]["stage2"]["vocab_size"]
    assert records["ours", 0]["stage3"]["steps"] == records["fastai", 0]["stage3"]["steps"]
    assert records["ours", 0]["stage3"]["test_labels"] == records["fastai", 0]["stage3"]["test_labels"]

    imdb = {impl: _result(compared, "compare_imdb", impl, 0) for impl in ("ours", "fastai")}
    assert imdb["ours"]["settings"]["max_tokens"] == 120 and imdb["ours"]["n_test"] == 40
    assert imdb["ours"]["stage2"]["vocab_size"] == imdb["fastai"]["stage2"]["vocab_size"]
    assert imdb["ours"]["stage3"]["steps"] == imdb["fastai"]["stage3"]["steps"] == 2 * (40 // 8)

    files = sorted(compared.results.glob("compare_trec6/*.json"))
    stamps = [path.stat().st_mtime_ns for path in files]
    run(compared, "compare", "--task", "trec6", "--seeds", "0,1", "--precision", FAST_PRECISION)  # resumable: all done
    assert [path.stat().st_mtime_ns for path in files] == stamps


def test_lowshot_runs_ulmfit_scratch_and_tfidf(lowshot):
    for n in (10, 20):
        for method in LOWSHOT_METHODS:
            record = _result(lowshot, "lowshot", f"{method}_n{n}", 0)
            assert record["labels"] == n and record["method"] == method and record["n_test"] == 40
            assert 0 <= record["test_accuracy"] <= 1
        assert _result(lowshot, "lowshot", f"scratch_n{n}", 0)["stage3"]["random_init"]
        assert _result(lowshot, "lowshot", f"tfidf_n{n}", 0)["baseline"]["cv_folds"] == 5
    ulmfit = _result(lowshot, "lowshot", "ulmfit_n20", 0)
    assert not ulmfit["stage3"]["random_init"]
    assert ulmfit["stage2"] == _result(lowshot, "compare_imdb", "ours", 0)["stage2"]  # the LM of `compare`, reused
    assert ulmfit["stage3"]["training"]["discriminative_lr_factor"] == 2.6
    # Few labels train more epochs, to the step floor (4 in --quick): 10 reviews at batch 8 are one step an epoch.
    for method in ("ulmfit", "scratch"):
        record = _result(lowshot, "lowshot", f"{method}_n10", 0)
        assert record["stage3"]["steps"] == 4 and record["stage3"]["epochs"] == record["settings"]["clas_epochs"] == 4
    assert ulmfit["stage3"]["epochs"] == 2  # 20 reviews: the recipe's 2 epochs already reach the floor
    one_rate = _result(lowshot, "lowshot", "ulmfit_one_rate_n20", 0)
    assert not one_rate["stage3"]["random_init"] and one_rate["stage2"] == ulmfit["stage2"]
    assert one_rate["stage3"]["training"]["discriminative_lr_factor"] == 1.0
    assert one_rate["stage3"]["training"]["unfreeze_schedule"] is None
    all_layers = _result(lowshot, "lowshot", "ulmfit_no_unfreezing_n20", 0)
    assert not all_layers["stage3"]["random_init"] and all_layers["stage2"] == ulmfit["stage2"]
    assert all_layers["stage3"]["training"]["discriminative_lr_factor"] == 2.6
    assert all_layers["stage3"]["training"]["unfreeze_schedule"] is None
    assert ulmfit["stage3"]["training"]["unfreeze_schedule"] == "gradual"
    lm_one_rate = _result(lowshot, "lowshot", "ulmfit_lm_one_rate_n20", 0)
    assert lm_one_rate["stage2"]["kind"] == "ours_one_rate"
    assert lm_one_rate["stage2"]["parent"] == ulmfit["stage2"]["parent"]
    assert lm_one_rate["stage3"]["training"] == ulmfit["stage3"]["training"]
    scratch = _result(lowshot, "lowshot", "scratch_n20", 0)
    assert scratch["stage3"]["training"]["learning_rate"] == 2e-3 != ulmfit["stage3"]["training"]["learning_rate"]
    # The pretrained twin of `scratch`: the one-rate LM, trained exactly as the classifier from random weights.
    twin = _result(lowshot, "lowshot", "ulmfit_scratch_schedule_n20", 0)
    assert not twin["stage3"]["random_init"] and twin["stage2"] == lm_one_rate["stage2"]
    assert twin["stage3"]["training"] == scratch["stage3"]["training"]
    # Its twin without stage 1: the stage-2 LM trained from random weights, the same classifier schedule.
    no_stage1 = _result(lowshot, "lowshot", "no_stage1_scratch_schedule_n20", 0)
    assert no_stage1["stage2"]["kind"] == "ours_scratch" and no_stage1["stage2"]["schedule"].startswith("one_cycle")
    assert not no_stage1["stage3"]["random_init"] and no_stage1["stage3"]["training"] == scratch["stage3"]["training"]
    assert "stage2" not in scratch


def test_lowshot_starts_its_classifiers_from_a_stage2_of_ulmfit_finetune_lm(env, tmp_path, capsys):
    """`lowshot --stage2`: the classifiers start from a stage 2 that `ulmfit finetune-lm` trained (and can resume),
    the from-scratch one from its shape and vocabulary; a method that needs its own stage 2 is refused."""
    from ulmfit.cli import main as ulmfit
    from ulmfit.hub import StageRecord

    recipe = tmp_path / "imdb_lm.yaml"
    recipe.write_text(f"""
name: tiny-imdb-lm
stages:
  finetune_lm:
    parent: {env.stage1}
    data: {{path: "{env.data}/imdb/[tu][rn]*.jsonl.gz", format: json, label_column: null}}
    max_documents: 200
    drop_mult: 0.3
    tokenizer: {{kind: fastai, max_vocab: 3000, min_freq: 2, rebuild: true}}
    training: {{max_steps: 3, per_device_train_batch_size: 8}}
""")
    assert ulmfit(["finetune-lm", str(recipe), "--output-dir", str(tmp_path / "runs")]) == 0
    stage2 = tmp_path / "runs" / "finetune_lm"
    results = tmp_path / "results"
    options = ("--quick", "--threads", "1", "--data-dir", str(env.data), "--work-dir", str(env.work),
               "--results-dir", str(results), "--stage2", str(stage2), "--label-counts", "10", "--seeds", "0",
               "--precision", "fp32")
    assert main(["lowshot", *options, "--methods", "ulmfit,scratch,tfidf"]) == 0

    ulmfit_run = json.loads((results / "lowshot" / "ulmfit_n10_seed0.json").read_text())
    assert ulmfit_run["stage2"]["folder"] == str(stage2) and ulmfit_run["stage2"]["seconds"] is None
    assert ulmfit_run["stage2"]["valid_perplexity"] == StageRecord.load(stage2).metrics["eval_perplexity"]
    assert ulmfit_run["stage2"]["parent"] == str(env.stage1)
    scratch = json.loads((results / "lowshot" / "scratch_n10_seed0.json").read_text())
    assert scratch["stage3"]["random_init"] and "stage2" not in scratch
    assert (results / "lowshot" / "tfidf_n10_seed0.json").is_file()
    assert main(["lowshot", *options, "--methods", "ulmfit,no_stage1_scratch_schedule"]) != 0
    assert "no_stage1_scratch_schedule trains its own stage 2 from random weights" in capsys.readouterr().err


def test_ablations_run_every_variant_with_a_backward_stage1(ablations):
    records = {variant: _result(ablations, "ablations_trec6", variant, 0) for variant in ABLATIONS}
    assert records["full"]["reused_from"].endswith("compare_trec6/ours_seed0.json")
    assert records["tfidf"]["baseline"]["cv_folds"] == 5 and "stage3" not in records["tfidf"]  # the no-network row
    assert records["backward"]["stage3"]["backwards"] and records["backward"]["stage2"]["backwards"]
    assert not records["no_pretraining"]["stage3"]["backwards"]
    assert records["no_pretraining"]["stage2"]["schedule"].startswith("one_cycle")
    assert "random" not in records["lm_one_rate"]["stage2"]["schedule"]
    gentle = records["lm_one_rate_gentle"]
    assert gentle["stage2"] == records["lm_one_rate"]["stage2"]
    assert (
        gentle["stage3"]["training"]["learning_rate"] == 2e-3 != records["full"]["stage3"]["training"]["learning_rate"]
    )
    assert gentle["stage3"]["training"]["discriminative_lr_factor"] == 1.0
    assert records["full"]["stage2"]["schedule"].startswith("fine_tune")
    for variant, schedule, factor in (("lm_one_rate", "one_cycle", 1.0), ("lm_discr", "one_cycle", 2.6),
                                      ("lm_discr_stlr", "stlr", 2.6)):
        stage2 = records[variant]["stage2"]
        assert stage2["kind"] == f"ours_{variant[3:]}" and stage2["parent"] == records["full"]["stage2"]["parent"]
        assert stage2["training"]["ulmfit_schedule"] == schedule and stage2["schedule"].startswith(schedule)
        assert stage2["training"]["discriminative_lr_factor"] == factor
        assert stage2["training"]["unfreeze_schedule"] is None
    assert "stage2" not in records["no_lm_finetuning"]
    assert records["no_discriminative"]["stage3"]["training"]["discriminative_lr_factor"] == 1.0
    assert records["last_layer"]["stage3"]["training"]["unfreeze_schedule"] == "0:1"
    assert records["cosine_lr"]["stage3"]["training"]["ulmfit_schedule"] == "cosine"
    assert set(records["ensemble"]["parts"]) == {"full", "backward"}
    assert (ablations.work / "general_lm_backward" / "pretrain" / "config.json").is_file()


def test_stage2_timing_alternates_the_implementations_and_keeps_no_model(timed):
    timing = json.loads((timed.results / "stage2_timing_trec6.json").read_text())
    assert [r["impl"] for r in timing["runs"]] == ["ours", "fastai", "fastai", "ours"]  # ABBA: drift cancels
    for impl in ("ours", "fastai"):
        seconds = sorted(r["seconds"] for r in timing["runs"] if r["impl"] == impl)
        assert timing["median"]["seconds"][impl] == pytest.approx(sum(seconds) / 2)
    assert timing["speedup"] == pytest.approx(
        timing["median"]["seconds"]["fastai"] / timing["median"]["seconds"]["ours"]
    )
    # Each run of a side is the same training: it reaches the same perplexity every time.
    perplexities = {impl: {round(r["valid_perplexity"], 6) for r in timing["runs"] if r["impl"] == impl}
                    for impl in ("ours", "fastai")}
    assert all(len(values) == 1 for values in perplexities.values()), perplexities
    assert timing["settings"]["precision"] == FAST_PRECISION and timing["command"].startswith(
        "python -m experiments.run stage2_timing")
    # Timing runs train in temporary folders: no model left in the work folder, no result file for the report to
    # count as runs.
    assert timed.work_files_timing_added == []
    assert not list(timed.results.glob("stage2_timing*/"))


def test_report_writes_results_md_and_plots(compared, lowshot, ablations, timed, tmp_path):
    output = tmp_path / "RESULTS.md"
    assert main(["report", "--results-dir", str(compared.results), "--output", str(output)]) == 0
    text = output.read_text()
    for heading in ("## The same recipe in both implementations", "### TREC-6", "### IMDb",
                    "## Low-shot learning (IMDb)", "## Ablations (ours)", "## What explains the differences",
                    "## Every run", "## Hardware and software", "## Commands"):
        assert heading in text, heading
    assert "3.6% test error" in text and "4.6% test error" in text and "--quick" in text
    assert "| fastai | " in text and "| ours | " in text and "| backward | " in text
    assert "| test error % | stage-2 perplexity |" in text and "| lm_discr_stlr | " in text
    assert "python -m experiments.run ablations --quick" in text
    assert "Stage 2 timed side by side, 2 run(s) per side alternating in one process" in text
    assert f"from the result files of `{compared.results.resolve()}/`" in text  # the folder it read, not a fixed one
    assert "Classifier epochs (steps) by labels: 10: 4 (4), 20: 2 (4)." in text
    assert "from scratch peak rate 0.002" in text
    # What our side does differently from the `ulmfit` stages is named, with the value it ran with.
    assert "except: `max_grad_norm=0.0`: no gradient clipping" in text
    assert _result(compared, "compare_trec6", "ours", 0)["stage3"]["training"]["max_grad_norm"] == 0.0
    for plot in ("lowshot.png", "compare_trec6_curves.png", "compare_imdb_curves.png"):
        assert (compared.results / plot).stat().st_size > 10_000
        assert f"]({os.path.relpath(compared.results / plot, output.parent)})" in text  # linked from RESULTS.md


def test_lowshot_table_marks_runs_that_predict_one_class(tmp_path):
    from experiments.report import _lowshot_section

    def record(method, seed, probabilities, labels):
        accuracy = float(np.mean(np.argmax(probabilities, 1) == labels))
        stage3 = {"epochs": 10, "steps": 150, "training": {"learning_rate": 1e-2}, "test_probabilities": probabilities}
        return {"method": method, "labels": 500, "seed": seed, "n_test": len(labels), "test_accuracy": accuracy,
                "test_error": 1 - accuracy, "stage3": stage3}

    labels = np.array([0, 1] * 100)
    constant = [[0.52, 0.48]] * 200  # every review "neg": the collapse
    spread = [[0.9, 0.1], [0.2, 0.8]] * 99 + [[0.6, 0.4]] * 2  # 99% right, and 99% is no single class
    lines = _lowshot_section([record("ulmfit", 0, spread, labels), record("ulmfit_one_rate", 0, constant, labels),
                              record("ulmfit_one_rate", 1, spread, labels)], tmp_path / "R.md", tmp_path)
    row = next(line for line in lines if line.startswith("| 500 |"))
    assert row == "| 500 | 0.50 (n=1) | 25.25 ± 35.00 (n=2; 1 one class) |"
    assert any(line.startswith("*one class*: runs that put at least 99%") for line in lines)


def test_bf16_on_a_cpu_without_bf16_kernels_is_refused_with_the_fix(env, monkeypatch, capsys):
    from experiments import settings

    monkeypatch.setattr(settings, "cpu_has_bf16_kernels", lambda: False)
    with pytest.raises(ValueError, match="Use --precision fp32"):
        settings.task_settings("trec6", quick=True, precision="bf16")
    assert main(["compare", "--quick", "--task", "trec6", "--precision", "bf16", "--data-dir", str(env.data),
                 "--work-dir", str(env.work), "--results-dir", str(env.results), "--stage1", str(env.stage1)]) == 2
    assert "--precision bf16 needs a CPU with bf16 kernels" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["lowshot", "--methods", "ulmfit,bert"], "argument --methods: unknown methods ['bert']; choose from ulmfit,"),
    (["lowshot", "--methods", " , "], "argument --methods: no methods given"),
    (["ablations", "--variants", "full,chain_thaw"], "argument --variants: unknown variants ['chain_thaw']"),
])
def test_method_and_variant_lists_are_checked_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# The fastai side's stage-3 schedule
# ----------------------------------------------------------------------------------------------------------------------
def test_fastai_stage3_schedule_is_our_trainers_group_by_group():
    """Discriminative rates x STLR per layer group, and which groups train, at every step of a 3-epoch run."""
    warnings.filterwarnings("ignore")
    from fastai.basics import Adam, Callback, Learner, MSELossFlat, params
    from fastai.test_utils import synth_dbunch

    from experiments.fastai_side import GradualUnfreezing, stlr_scheduler
    from ulmfit.schedules import get_stlr_schedule
    from ulmfit.unfreezing import GradualUnfreezingCallback

    num_groups, epochs, batches, lr = 4, 3, 7, 1e-2
    total = epochs * batches

    class Recorder(Callback):
        order = 100
        lrs, trainable = [], []

        def after_batch(self):
            if self.training:
                self.lrs.append([h["lr"] for h in self.opt.hypers])
                self.trainable.append([pg[0].requires_grad for pg in self.opt.param_lists])

    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(num_groups)])
    learner = Learner(synth_dbunch(n_train=batches), model, loss_func=MSELossFlat(), opt_func=Adam,
                      splitter=lambda m: [params(layer) for layer in m])
    with learner.no_logging(), learner.no_bar():
        schedule = stlr_scheduler(num_groups, lr, 2.6, total, 0.1, 32)
        learner.fit(epochs, lr, cbs=[GradualUnfreezing(), schedule, Recorder()])

    # Ours: the optimizer's rates per layer group as the trainer's STLR schedule sets them, and the groups that
    # GradualUnfreezingCallback trains in each epoch.
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr / 2.6 ** (num_groups - 1 - i), "layer_group": i}
              for i in range(num_groups)]
    optimizer = torch.optim.AdamW(groups, betas=(0.7, 0.99))
    scheduler = get_stlr_schedule(optimizer, total, 0.1, 32)
    ours_lrs = []
    for _ in range(total):
        ours_lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(torch.tensor(Recorder.lrs).double(), torch.tensor(ours_lrs).double(), rtol=1e-6, atol=0)
    assert max(step[-1] for step in ours_lrs) == pytest.approx(lr)

    unfreezing = GradualUnfreezingCallback()
    for step, trainable in enumerate(Recorder.trainable):
        top = min(unfreezing.num_trainable(step // batches), num_groups)
        assert trainable == [i >= num_groups - top for i in range(num_groups)], step


def test_stage1_evaluation_reports_perplexity_per_token_and_per_word(tmp_path):
    """`experiments.stage1_evaluate` on WikiText text as published (the bundled lines of WikiText-2 validation)."""
    from experiments.stage1_evaluate import evaluate_wikitext2

    lines = _lines("wikitext2_valid.txt.gz", 200)
    tokenizer = train_fastai_tokenizer(lines[:100], min_freq=2, show_progress=False)
    model = AwdLstmForCausalLM(
        AwdLstmConfig(vocab_size=len(tokenizer), emb_size=16, hidden_size=32, num_layers=2, bptt=20)
    )
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    text = tmp_path / "wiki.test.tokens"
    text.write_text("\n".join(lines[100:]) + "\n")

    result = evaluate_wikitext2(tmp_path / "lm", text, batch_size=4)
    words = sum(len(line.split()) for line in lines[100:])
    assert result["words"] == words
    # Random weights: near a uniform guess over the vocabulary, per token; per word, more tokens than words.
    assert 0.5 * len(tokenizer) < result["perplexity"] < 2 * len(tokenizer)
    assert result["word_perplexity"] > result["perplexity"]
    assert 0 < result["unknown_rate"] < 0.5


def test_ship_stage1_writes_a_bf16_folder_with_its_history_perplexity_and_card(tmp_path):
    """`experiments.ship_stage1` on a tiny finished stage 1 that continued an earlier run."""
    from safetensors import safe_open

    from experiments.ship_stage1 import ship
    from ulmfit.cli import main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("""
name: tiny
model: {emb_size: 16, hidden_size: 32, num_layers: 2, bptt: 20, max_len: 60}
tokenizer: {kind: fastai, max_vocab: 2000, min_freq: 2}
stages:
  pretrain:
    data: {path: "bundled:wikitext2_valid.txt.gz", format: text}
    max_documents: 300
    training: {max_steps: 3, per_device_train_batch_size: 8, save_strategy: steps, save_steps: 3, logging_steps: 1}
""")
    assert main(["pretrain", str(recipe), "--output-dir", str(tmp_path / "runs")]) == 0
    stage = tmp_path / "runs" / "pretrain"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "trainer_state.json").write_text(
        next((stage / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text()
    )
    data = tmp_path / "data" / "wikitext2"
    data.mkdir(parents=True)
    for split, name in (("valid", "wiki.valid.tokens"), ("test", "wiki.test.tokens")):
        with gzip.open(DEMO_DATA / f"wikitext2_{split}.txt.gz", "rt") as f:
            (data / name).write_text(f.read())

    target = ship(stage, [earlier], tmp_path / "data", tmp_path / "results", target=tmp_path / "en")
    with safe_open(str(target / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    results = json.loads((tmp_path / "results" / "stage1_wikitext2.json").read_text())
    assert [run["steps"] for run in results["runs"]] == [3, 3] and results["test"]["perplexity"] > 1
    card = (target / "README.md").read_text()
    assert "in\n2 runs" in card or "in 2 runs" in card.replace("\n", " ")
    assert f"{results['test']['perplexity']:.1f}" in card and "CC BY-SA 3.0" in card
    assert (target / "training_curves.png").is_file()
    assert (tmp_path / "results" / "stage1_training_curves.png").is_file()
