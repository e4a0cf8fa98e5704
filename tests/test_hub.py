"""Every ULMFiT stage on the Hub: pushed over real HTTP to the loopback server, then loaded back where only
transformers is installed.

Client code runs in subprocesses because `huggingface_hub` reads `HF_ENDPOINT` when it is imported. The pushing
processes import this project; the loading processes cannot (they stand for a user who only has transformers) and
start with an empty cache.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, pipeline

from conftest import python_without_package
from hub_server import TOKEN, USER, HubServer
from modeling_awd_lstm import AwdLstmForCausalLM, AwdLstmForSequenceClassification
from test_modeling import tiny_config, word_level_tokenizer
from ulmfit.hub import CURVES_FILE, STAGE_FILE, StageRecord, write_model_card

ROOT = Path(__file__).resolve().parent.parent
KiB = 2**10
WORDS = "the movie was good bad great awful and i liked hated it plot acting".split()
REPOS = {
    "pretrain": f"{USER}/demo-lm",
    "finetune_lm": f"{USER}/demo-lm-imdb",
    "classifier": f"{USER}/demo-imdb-classifier",
}
RUN_TAG = "demo-run-1"
PROMPT = "the movie was"
REVIEWS = ["i liked the plot and the acting", "the movie was awful"]
IDS = [[4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 4, 5]]
WIKITEXT = {"description": "WikiText-2", "hub": "Salesforce/wikitext", "license": "CC BY-SA 3.0"}
IMDB = {"description": "IMDb reviews", "hub": "stanfordnlp/imdb", "license": "research use"}


# ----------------------------------------------------------------------------------------------------------------------
# A small ULMFiT run: three stage folders, as the training CLI leaves them
# ----------------------------------------------------------------------------------------------------------------------
def save_stage(folder: Path, model, tokenizer, record: StageRecord, repo_id: str) -> Path:
    """A stage folder: weights and model code, tokenizer, record, curves and card, plus files that must stay local."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record.save(folder)
    figure = pyplot.figure(figsize=(2, 1.5), dpi=40)
    figure.gca().plot([4.1, 3.2, 2.9])
    figure.savefig(folder / CURVES_FILE)
    pyplot.close(figure)
    write_model_card(folder, repo_id)
    (folder / "scratch.py").write_text("print('a local experiment')\n")
    (folder / "checkpoint-1").mkdir()
    shutil.copy(folder / "config.json", folder / "checkpoint-1" / "config.json")
    shutil.copy(folder / "model.safetensors", folder / "checkpoint-1" / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """The three stage folders of a run whose cards chain classifier -> domain LM -> general LM."""
    root = tmp_path_factory.mktemp("run")
    tokenizer = word_level_tokenizer(WORDS)
    torch.manual_seed(0)
    general = AwdLstmForCausalLM(tiny_config(len(tokenizer), pad_token_id=1, bos_token_id=2, eos_token_id=3))
    pretrain = save_stage(root / "pretrain", general, tokenizer, StageRecord(
        stage="pretrain", recipe="demo", model_name="demo-lm", metrics={"eval_perplexity": 91.5},
        # `hub_token` as TrainingArguments would give it: it must be left out of the record and the card.
        hyperparameters={"learning_rate": 5e-3, "num_train_epochs": 1, "hub_token": TOKEN},
        data=[{"role": "training data", **WIKITEXT}],
    ), REPOS["pretrain"])
    domain = AwdLstmForCausalLM.from_pretrained(pretrain)
    with torch.no_grad():  # stands for fine-tuning: the domain LM's weights differ from its parent's
        for parameter in domain.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    finetune_lm = save_stage(root / "finetune_lm", domain, tokenizer, StageRecord(
        stage="finetune_lm", recipe="demo", model_name="demo-lm-imdb", parent=REPOS["pretrain"],
        metrics={"eval_perplexity": 55.25}, hyperparameters={"learning_rate": 3e-3, "lr_schedule": "stlr"},
        data=[{"role": "training data", **IMDB}],
    ), REPOS["finetune_lm"])
    classifier = AwdLstmForSequenceClassification.from_pretrained(
        finetune_lm, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}
    )
    save_stage(root / "classifier", classifier, tokenizer, StageRecord(
        stage="classifier", recipe="demo", model_name="demo-imdb-classifier", parent=REPOS["finetune_lm"],
        metrics={"test_accuracy": 0.875, "test_f1": 0.8667}, eval_split="test",
        hyperparameters={"learning_rate": 1e-2, "gradual_unfreezing": True},
        data=[{"role": "training data", **IMDB}, {"role": "test data", **IMDB}],
    ), REPOS["classifier"])
    return {stage: root / stage for stage in REPOS}


# ----------------------------------------------------------------------------------------------------------------------
# Client processes
# ----------------------------------------------------------------------------------------------------------------------
def run_python(code: str, env: dict[str, str], *, without_package: bool = False, cwd: Path | None = None) -> object:
    """Run `code` and return the JSON value it prints last. Its stdout and stderr must never show the token."""
    command = python_without_package(code) if without_package else [sys.executable, "-c", code]
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"client exited with {result.returncode}:\n{result.stderr[-6000:]}"
    assert TOKEN not in result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def pusher_env(server: HubServer, home: Path, token: str | None = TOKEN, xet: bool = False) -> dict[str, str]:
    """A process that pushes: it imports `training` (and, for fixtures, the test modules) from this checkout."""
    env = server.client_env(home, token=token, xet=xet)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    return env


def push(server: HubServer, home: Path, pushes: list[dict], **env_options) -> list[dict]:
    """Run `push_stage(**kwargs)` for each of `pushes` in one process; each gives {"url"} or {"error", "on_disk"}."""
    code = f"""
import json, os
from ulmfit.hub import HubPushError, push_stage
outcomes = []
for kwargs in {pushes!r}:
    try:
        outcomes.append({{"url": push_stage(**kwargs)}})
    except HubPushError as error:
        outcomes.append({{"error": str(error), "on_disk": sorted(os.listdir(kwargs["folder"]))}})
print(json.dumps(outcomes))
"""
    return run_python(code, pusher_env(server, home, **env_options))


def assert_pushed(server: HubServer, repo_id: str, folder: Path) -> None:
    """The repository holds the stage's files byte for byte, and neither `scratch.py` nor `checkpoint-1/`."""
    expected = {path.name for path in folder.iterdir() if path.is_file()} - {"scratch.py"}
    assert {"model.safetensors", "config.json", "modeling_awd_lstm.py", "configuration_awd_lstm.py", "tokenizer.json",
            "README.md", STAGE_FILE, CURVES_FILE} <= expected
    pushed = server.files(repo_id)
    assert set(pushed) == expected | {".gitattributes"}
    for name in expected:
        assert pushed[name].data == (folder / name).read_bytes(), name
    assert TOKEN.encode() not in b"".join(stored.data for stored in pushed.values())


# ----------------------------------------------------------------------------------------------------------------------
# A whole run on the Hub, loaded back without this package
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lfs", "inline"])
def test_three_stages_pushed_and_loaded_back_without_the_package(hub_server, stages, tmp_path, mode):
    if mode == "lfs":  # plain LFS (HF_HUB_DISABLE_XET=1); the weights (~48 KiB) go up in multipart chunks
        hub_server.lfs_threshold = KiB
        hub_server.multipart_threshold, hub_server.multipart_chunk_size = 32 * KiB, 16 * KiB
    pushes = [dict(folder=str(stages[stage]), repo_id=repo, tag=RUN_TAG) for stage, repo in REPOS.items()]
    outcomes = push(hub_server, tmp_path / "pusher", pushes, xet=mode == "inline")

    for (stage, repo), outcome in zip(REPOS.items(), outcomes):
        assert_pushed(hub_server, repo, stages[stage])
        head, initial = hub_server.commits(repo)
        assert outcome == {"url": f"{hub_server.url}/{repo}/commit/{head.oid}"}
        assert hub_server.commits(repo, revision=RUN_TAG)[0].oid == head.oid
        assert TOKEN not in (stages[stage] / STAGE_FILE).read_text() + (stages[stage] / "README.md").read_text()
    record = json.loads(hub_server.file_bytes(REPOS["pretrain"], STAGE_FILE))
    assert record["hyperparameters"] == {"learning_rate": 5e-3, "num_train_epochs": 1}
    uploads = [r for r in hub_server.requests if r.method == "PUT" and r.path.startswith("/_lfs/")]
    if mode == "lfs":
        assert hub_server.files(REPOS["classifier"])["model.safetensors"].lfs
        assert any(re.fullmatch(r"/_lfs/\w+/\d+", r.path) for r in uploads), "no multipart upload"
    else:
        assert uploads == [] and not any(f.lfs for f in hub_server.files(REPOS["classifier"]).values())

    # A user with transformers only, an empty cache and no token.
    output = tmp_path / "from_hub.pt"
    loaded = run_python(f"""
import importlib.util, json, torch
assert importlib.util.find_spec("modeling_awd_lstm") is None and importlib.util.find_spec("ulmfit") is None
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, pipeline
ids, logits, cards = torch.tensor({IDS}), {{}}, {{}}
for stage, repo in {REPOS!r}.items():
    auto = AutoModelForSequenceClassification if stage == "classifier" else AutoModelForCausalLM
    logits[stage] = auto.from_pretrained(repo, trust_remote_code=True).eval()(ids).logits
    cards[stage] = ModelCard.load(repo).data.to_dict()
torch.save(logits, {str(output)!r})
generate = pipeline("text-generation", model={REPOS["finetune_lm"]!r}, trust_remote_code=True)
classify = pipeline("text-classification", model={REPOS["classifier"]!r}, trust_remote_code=True)
print(json.dumps({{
    "cards": cards,
    "generated": generate({PROMPT!r}, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0]["generated_text"],
    "classified": classify({REVIEWS!r}),
}}))
""", hub_server.client_env(tmp_path / "loader", token=None), without_package=True, cwd=tmp_path)

    ids, from_hub = torch.tensor(IDS), torch.load(output)
    for stage, auto in [("pretrain", AutoModelForCausalLM), ("finetune_lm", AutoModelForCausalLM),
                        ("classifier", AutoModelForSequenceClassification)]:
        local = auto.from_pretrained(stages[stage]).eval()
        torch.testing.assert_close(from_hub[stage], local(ids).logits, rtol=0, atol=1e-6)
    generate = pipeline("text-generation", model=str(stages["finetune_lm"]))
    generated = generate(PROMPT, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert loaded["generated"] == generated and len(generated.split()) == len(PROMPT.split()) + 6
    classified = pipeline("text-classification", model=str(stages["classifier"]))(REVIEWS)
    assert [p["label"] for p in loaded["classified"]] == [p["label"] for p in classified]
    assert [p["score"] for p in loaded["classified"]] == pytest.approx([p["score"] for p in classified], abs=1e-6)

    cards = loaded["cards"]
    assert "base_model" not in cards["pretrain"]
    assert cards["finetune_lm"]["base_model"] == REPOS["pretrain"]
    assert cards["classifier"]["base_model"] == REPOS["finetune_lm"]
    assert [cards[stage]["pipeline_tag"] for stage in REPOS] == ["text-generation"] * 2 + ["text-classification"]
    assert {cards[stage]["library_name"] for stage in REPOS} == {"transformers"}
    assert [cards[stage]["datasets"] for stage in REPOS] == [["Salesforce/wikitext"]] + [["stanfordnlp/imdb"]] * 2
    body = hub_server.file_bytes(REPOS["classifier"], "README.md").decode()
    assert f"**Parent stage:** [{REPOS['finetune_lm']}](https://huggingface.co/{REPOS['finetune_lm']})" in body
    results = {stage: cards[stage]["model-index"][0]["results"] for stage in REPOS}
    assert results["pretrain"] == [{
        "task": {"type": "text-generation"},
        "dataset": {"name": "WikiText-2", "type": "Salesforce/wikitext", "split": "validation"},
        "metrics": [{"type": "perplexity", "value": 91.5}],
    }]
    assert results["classifier"] == [{
        "task": {"type": "text-classification"},
        "dataset": {"name": "IMDb reviews", "type": "stanfordnlp/imdb", "split": "test"},
        "metrics": [{"type": "accuracy", "value": 0.875}, {"type": "f1", "value": 0.8667}],
    }]


def test_trainer_push_to_hub_every_save(hub_server, tmp_path):
    """The plain transformers Trainer pushes our model at every save, with its code and the full `auto_map`: what
    the test above loads without the package."""
    repo, output_dir = f"{USER}/trainer-lm", tmp_path / "trainer"
    run_python(f"""
import json, torch
from transformers import Trainer, TrainingArguments
from modeling_awd_lstm import AwdLstmForCausalLM
from test_modeling import tiny_config, word_level_tokenizer
tokenizer = word_level_tokenizer({WORDS!r})
torch.manual_seed(0)
model = AwdLstmForCausalLM(tiny_config(len(tokenizer), pad_token_id=1, bos_token_id=2, eos_token_id=3))
data = [{{"input_ids": ids, "labels": ids}} for ids in torch.randint(4, len(tokenizer), (8, 12))]
args = TrainingArguments(
    output_dir={str(output_dir)!r}, max_steps=2, per_device_train_batch_size=4, save_strategy="steps", save_steps=1,
    push_to_hub=True, hub_model_id={repo!r}, hub_strategy="every_save", report_to=[], use_cpu=True,
)
trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
trainer.train()
print(json.dumps(trainer.push_to_hub()))
""", pusher_env(hub_server, tmp_path / "pusher"))

    titles = [commit.title for commit in hub_server.commits(repo)]
    assert titles[0] == "End of training" and titles[-1] == "initial commit"
    assert any(title.startswith("Training in progress") for title in titles[1:-1]), titles
    pushed = hub_server.files(repo)
    assert {
        "model.safetensors", "config.json", "modeling_awd_lstm.py", "kernels_awd_lstm.py", "configuration_awd_lstm.py"
    } <= set(pushed)
    assert not any(name.startswith("checkpoint-") for name in pushed)
    for name, stored in pushed.items():  # the final model, as the Trainer saved it
        assert name == ".gitattributes" or stored.data == (output_dir / name).read_bytes(), name
    auto_map = json.loads(pushed["config.json"].data)["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    assert TOKEN.encode() not in b"".join(stored.data for stored in pushed.values())


# ----------------------------------------------------------------------------------------------------------------------
# Failures: retried, explained, and never leaking the token
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["500 on commit", "connection cut mid-commit", "500 when tagging"])
def test_a_failed_push_run_again_finishes_the_job(hub_server, stages, tmp_path, fault):
    """Failures `huggingface_hub` does not retry itself (a commit with HF_HUB_DISABLE_XET=1, a tag) end the push with
    a HubPushError that leaves every file on disk; the same push run again finishes with exactly one commit."""
    folder, repo = stages["pretrain"], REPOS["pretrain"]
    if fault == "500 on commit":  # after the LFS uploads, one of which is cut (and retried by the client)
        hub_server.lfs_threshold = KiB
        hub_server.drop_next("PUT", r"^/_lfs/", after_bytes=512)
        hub_server.fail_next("POST", r"/commit/main$", status=500)
    elif fault == "connection cut mid-commit":  # inline uploads: the files travel in the commit's body
        hub_server.drop_next("POST", r"/commit/main$", after_bytes=2 * KiB)
    else:  # after the commit: the second run only has the tag left to make
        hub_server.fail_next("POST", r"/tag/", status=500)
    on_disk = sorted(os.listdir(folder))

    failed, finished, again = push(hub_server, tmp_path, [dict(folder=str(folder), repo_id=repo, tag=RUN_TAG)] * 3)

    assert "run the same push again" in failed["error"]
    assert ("interrupted" if fault == "connection cut mid-commit" else "500") in failed["error"]
    assert failed["on_disk"] == on_disk
    head, initial = hub_server.commits(repo)  # exactly one commit besides the repository's first
    assert initial.title == "initial commit"
    assert finished == again == {"url": f"{hub_server.url}/{repo}/commit/{head.oid}"}  # the third had nothing to do
    assert hub_server.commits(repo, revision=RUN_TAG)[0].oid == head.oid
    assert_pushed(hub_server, repo, folder)
    if fault == "500 on commit":  # each LFS object went up once: the second run found them on the server
        uploads = [r.status for r in hub_server.requests if r.method == "PUT" and r.path.startswith("/_lfs/")]
        assert uploads.count(0) == 1 and uploads.count(200) == sum(f.lfs for f in hub_server.files(repo).values()) >= 2


def test_the_default_client_retries_a_cut_or_failed_commit_itself(hub_server, stages, tmp_path):
    """With the default install (`hf_xet`, inline uploads here), the client retries the commit: one push suffices."""
    folder, repo = stages["pretrain"], REPOS["pretrain"]
    hub_server.drop_next("POST", r"/commit/main$", after_bytes=2 * KiB)
    hub_server.fail_next("POST", r"/commit/main$", status=500)

    [outcome] = push(hub_server, tmp_path, [dict(folder=str(folder), repo_id=repo, tag=RUN_TAG)], xet=True)

    assert [r.status for r in hub_server.requests if r.path.endswith("/commit/main")] == [0, 500, 200]
    head, initial = hub_server.commits(repo)
    assert outcome == {"url": f"{hub_server.url}/{repo}/commit/{head.oid}"} and initial.title == "initial commit"
    assert_pushed(hub_server, repo, folder)


def test_refused_pushes_and_missing_repos_and_revisions_are_explained(hub_server, stages, tmp_path):
    folder, repo = stages["pretrain"], REPOS["pretrain"]
    leaky = shutil.copytree(folder, tmp_path / "leaky")
    (leaky / "training_args.json").write_text(json.dumps({"learning_rate": 0.01, "hub_token": TOKEN}))
    retrained = shutil.copytree(folder, tmp_path / "retrained")
    record = StageRecord.load(retrained)
    record.metrics["eval_perplexity"] = 80.25
    record.save(retrained)
    outcomes = push(hub_server, tmp_path, [
        dict(folder=str(folder), repo_id=repo, token="hf_not_a_valid_token"),
        dict(folder=str(folder), repo_id=repo),
        dict(folder=str(folder), repo_id="bob/demo-lm", token=TOKEN),
        dict(folder=str(leaky), repo_id=repo, token=TOKEN),
        dict(folder=str(folder), repo_id=repo, token=TOKEN, revision="ablation", tag="ablation-1"),
        dict(folder=str(retrained), repo_id=repo, token=TOKEN, revision="ablation", tag="ablation-1"),
    ], token=None)
    bad_token, no_token, other_namespace, token_in_a_file, on_a_branch, same_tag = outcomes

    assert "rejected the token" in bad_token["error"] and "hf auth login" in bad_token["error"]
    assert "hf_not_a_valid_token" not in bad_token["error"]
    assert "No Hub token" in no_token["error"] and "HF_TOKEN" in no_token["error"]
    assert "may not write to 'bob'" in other_namespace["error"] and "own namespace" in other_namespace["error"]
    assert "training_args.json" in token_in_a_file["error"] and "contain(s) your Hub token" in token_in_a_file["error"]
    for refused in (bad_token, no_token, other_namespace, token_in_a_file):
        assert "scratch.py" in refused["on_disk"] and "model.safetensors" in refused["on_disk"]
    # The refused pushes made no commit; the others went to their own branch and left `main` as created.
    assert [commit.title for commit in hub_server.commits(repo)] == ["initial commit"]
    retrained_commit, first = hub_server.commits(repo, revision="ablation")[:2]
    assert on_a_branch == {"url": f"{hub_server.url}/{repo}/commit/{first.oid}"}
    # A second run under a run's tag is committed but never moves the tag.
    assert "tag 'ablation-1' already names an earlier commit" in same_tag["error"]
    assert hub_server.commits(repo, revision="ablation-1")[0].oid == first.oid != retrained_commit.oid

    errors = run_python(f"""
import json
from transformers import AutoModelForCausalLM
errors = {{}}
for name, kwargs in {{"repo": dict(pretrained_model_name_or_path="{USER}/no-such-model"),
                      "revision": dict(pretrained_model_name_or_path={repo!r}, revision="no-such-branch")}}.items():
    try:
        AutoModelForCausalLM.from_pretrained(trust_remote_code=True, **kwargs)
    except OSError as error:
        errors[name] = str(error)
print(json.dumps(errors))
""", hub_server.client_env(tmp_path / "loader", token=None), without_package=True, cwd=tmp_path)
    assert f"{USER}/no-such-model is not a local folder and is not a valid model identifier" in errors["repo"]
    assert "no-such-branch is not a valid git identifier" in errors["revision"]
