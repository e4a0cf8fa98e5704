"""The side-by-side benchmarks: both sides get identical batches, and the quick run writes its reports.

No timing is asserted: the quick mode runs tiny models and its numbers mean nothing.
"""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from benchmarks.data import lm_batches, sorted_batches
from modeling_awd_lstm import cpu_has_bf16_kernels

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "training" / "demo_data"


def test_lm_batches_are_fastai_lm_data_loader_batches():
    warnings.filterwarnings("ignore")
    from fastai.text.all import LMDataLoader, TensorText

    from benchmarks.data import lm_stream

    torch.manual_seed(0)
    docs = [torch.randint(4, 100, (int(n),)) for n in torch.randint(5, 60, (30,))]
    batch_size, bptt, n_batches = 4, 7, 5
    ours = lm_batches(docs, batch_size, bptt, n_batches)
    stream_docs = lm_stream(docs, batch_size * n_batches * bptt + 1)
    fastai = list(LMDataLoader([TensorText(d) for d in stream_docs], bs=batch_size, seq_len=bptt, shuffle=False))
    assert len(ours) == len(fastai) == n_batches
    for (x, y), (fx, fy) in zip(ours, fastai):
        assert torch.equal(x, fx) and torch.equal(y, fy)


def test_sorted_batches_are_fastai_sorted_dl_batches():
    warnings.filterwarnings("ignore")
    import numpy as np
    from fastai.text.all import Pad_Chunk, SortedDL, TensorCategory, TensorText

    torch.manual_seed(0)
    lengths = [int(n) for n in torch.randint(3, 90, (37,))]
    items = [(TensorText(torch.full((n,), 5 + i)), TensorCategory(0)) for i, n in enumerate(lengths)]
    np.random.seed(0)
    dl = SortedDL(items, bs=8, shuffle=True, before_batch=Pad_Chunk(pad_idx=1, seq_len=10))
    fastai_batches = [sorted(int(row[row != 1][0]) - 5 for row in x) for x, _ in dl]
    ours = [sorted(batch) for batch in sorted_batches(lengths, 8, shuffle_seed=0)]
    assert fastai_batches[0] == ours[0] and fastai_batches[-1] == ours[-1]  # longest first, shortest last
    assert sorted(fastai_batches) == sorted(ours)  # the same batches, in another order


def test_quick_benchmark_runs_both_sides_and_writes_its_reports(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--data-dir", str(DEMO_DATA), "--out", str(out),
         "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "results_quick.json").read_text())
    assert summary["errors"] == []
    assert summary["machine"]["cores"] and summary["versions"]["fastai"] == "2.8.12"

    tasks = {row["task"] for row in summary["rows"]}
    assert tasks == {"lm_train", "clas_train", "clas_infer", "generate"}
    for row in summary["rows"]:
        assert row["fastai"] > 0 and row["ours"] > 0 and row["ratio"] > 0, row
        assert row["memory"]["fastai"]["peak_mb"] > 0 and row["memory"]["ours"]["peak_mb"] > 0
    assert {t["target"] for t in summary["targets"]} >= {"LM training throughput", "Generation", "Peak memory"}

    # Same initial weights, data and dropout draws: fp32 training ends at the same perplexity on both sides.
    quality = summary["quality"]
    precisions = ["fp32", "bf16"] if cpu_has_bf16_kernels() else ["fp32"]  # no bf16 LSTM without the kernels
    assert summary["settings"]["precisions"] == precisions
    assert set(quality) == {f"{impl} {precision}" for impl in ("fastai", "ours") for precision in precisions}
    assert abs(quality["ours fp32"]["valid_ppl"] / quality["fastai fp32"]["valid_ppl"] - 1) < 1e-3
    # Our classifier gives fastai's prediction for each review alone, in padded batches and through the pipeline.
    for name in ("ours fp32, sorted batches", "ours fp32, one at a time"):
        agreement = summary["predictions"][name]["vs_fastai_alone"]
        assert agreement["same_label"] == agreement["docs"] > 0
        assert agreement["max_abs_prob_diff"] < 1e-4

    markdown = (out / "results_quick.md").read_text()
    assert "| benchmark | setting | metric | fastai | ours | ours/fastai |" in markdown
    assert ("bf16 was not measured" in markdown) == (precisions == ["fp32"])
    assert (out / "results_quick.png").stat().st_size > 10_000

    # One benchmark run again, the others' measurements and prediction comparisons taken from the first report.
    rerun = tmp_path / "rerun"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--data-dir", str(DEMO_DATA), "--out", str(rerun),
         "--cache-dir", str(tmp_path / "cache"), "--only", "generate", "--reuse", str(out / "results_quick.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = json.loads((rerun / "results_quick.json").read_text())
    assert {row["task"] for row in again["rows"]} == tasks
    assert again["predictions"] == summary["predictions"] and again["quality"] == summary["quality"]
    # The report says which run measured what.
    assert set(again["measured"]) == tasks and again["measured"]["lm_train"] == summary["measured"]["lm_train"]
    assert again["measured"]["generate"] != summary["measured"]["generate"]
    report = (rerun / "results_quick.md").read_text()
    assert "Measured in more than one run (`--reuse`), started at: LM training " in report


def test_quick_lstm_kernel_benchmark_times_both_kernels(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.lstm_kernels", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if not cpu_has_bf16_kernels():  # no fused bf16 LSTM to compare: the benchmark says so
        assert proc.returncode != 0 and "no bf16 kernels" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "lstm_kernels_quick.json").read_text())
    assert [(row["input"], row["hidden"]) for row in report["rows"]] == [(16, 32), (32, 32)]
    assert all(row["fused_ms"] > 0 and row["stepwise_ms"] > 0 for row in report["rows"])
    assert "| input -> hidden | batch | fused (ms) | stepwise (ms) | stepwise / fused |" in (
        tmp_path / "lstm_kernels_quick.md").read_text()


def test_the_stages_benchmark_gives_both_sides_the_same_reviews_and_a_recipe_ulmfit_accepts(tmp_path):
    from benchmarks.stages import QUICK, prepare_data, write_recipe
    from ulmfit.recipes import load_recipe
    from ulmfit.stages import check_training_arguments

    paths = prepare_data(None, QUICK, tmp_path)
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    assert [len(rows[name]) for name in ("lm_train", "lm_valid", "clas_train", "clas_test")] == [
        QUICK.lm_docs, QUICK.lm_valid_docs, QUICK.clas_docs, QUICK.test_docs]
    for name in ("clas_train", "clas_test"):  # balanced, labelled with class names
        labels = [row["label"] for row in rows[name]]
        assert labels.count("neg") == labels.count("pos") == len(labels) // 2
    assert not {row["text"] for row in rows["lm_train"]} & {row["text"] for row in rows["lm_valid"]}

    recipe = load_recipe(str(write_recipe(paths, QUICK, "fp32", tmp_path)))
    check_training_arguments(recipe)
    lm, classifier = recipe.stages["finetune_lm"], recipe.stages["classifier"]
    assert (lm.parent, lm.training["ulmfit_schedule"], classifier.training["unfreeze_schedule"]) == (
        "pretrained:en", "fine_tune", "gradual")
    assert classifier.eval_fraction == 0.0  # the classifier trains on every labelled review, as fastai's side
