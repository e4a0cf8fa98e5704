"""The English language model shipped with the package: named by its alias, loaded as transformers loads any model,
fine-tuned by stages in fp32 though stored in bf16, and pushed like any stage."""

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hub_server import USER
from test_hub import pusher_env, run_python
from ulmfit.cli import main
from ulmfit.hub import MODEL_CODE_FILES, STAGE_FILE
from ulmfit.pretrained import shipped_model_folder, shipped_models

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = shipped_model_folder("pretrained:en")
FINETUNE_RECIPE = """
name: from-shipped
seed: 3
model: {emb_size: 128, hidden_size: 512, num_layers: 3, drop_mult: 0.5, bptt: 70, max_len: 1400}
stages:
  finetune_lm:
    parent: pretrained:en
    data: {path: "bundled:trec_train_5500.label.gz", format: trec, label_column: null}
    max_documents: 1000
    training: {max_steps: 2, learning_rate: 0.001, per_device_train_batch_size: 4, ulmfit_schedule: one_cycle}
"""


def held_out_english(words: int) -> str:
    """The first `words` words of the bundled WikiText-2 test articles, which the shipped model never read."""
    with gzip.open(ROOT / "training" / "demo_data" / "wikitext2_test.txt.gz", "rt", encoding="utf-8") as file:
        return " ".join(file.read().split()[:words])


def test_the_package_ships_the_english_model_and_names_the_shipped_ones_for_an_unknown_alias():
    assert "pretrained:en" in shipped_models()
    with pytest.raises(FileNotFoundError, match="pretrained:en"):
        shipped_model_folder("pretrained:xx")


def test_the_shipped_folder_holds_bf16_weights_the_package_code_and_a_card_that_credits_its_data():
    with safe_open(str(SHIPPED / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    assert (SHIPPED / "model.safetensors").stat().st_size <= 60 * 2**20
    for name in MODEL_CODE_FILES:  # a `trust_remote_code` load of the folder runs exactly the package's code
        assert (SHIPPED / name).read_bytes() == (ROOT / "modeling_awd_lstm" / name).read_bytes(), name
    card = (SHIPPED / "README.md").read_text()
    assert "CC BY-SA" in card and "Wikipedia" in card and "WikiText-2" in card
    assert "ulmfit pretrain wikipedia_en" in card


def test_it_loads_with_the_auto_class_and_predicts_held_out_english_far_above_chance():
    model = AutoModelForCausalLM.from_pretrained(SHIPPED).eval()
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    assert model.dtype == torch.bfloat16  # as stored; stages ask for fp32
    ids = tokenizer(held_out_english(1500), return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.float()
    # A uniform guess over the 30k words is perplexity 30,000, unigram frequencies about 1,000.
    assert math.exp(loss) < 250

    generate = pipeline("text-generation", model=str(SHIPPED))
    text = generate("The history of the city", max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert text[0]["generated_text"].startswith("The history of the city ")


def test_a_stage_from_the_shipped_model_fine_tunes_fp32_weights_and_names_it_as_parent(tmp_path):
    recipe = tmp_path / "from_shipped.yaml"
    recipe.write_text(FINETUNE_RECIPE)
    assert main(["finetune-lm", str(recipe), "--output-dir", str(tmp_path / "run")]) == 0

    folder = tmp_path / "run" / "finetune_lm"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as tuned, \
            safe_open(str(SHIPPED / "model.safetensors"), framework="pt") as shipped:
        assert {tuned.get_slice(name).get_dtype() for name in tuned.keys()} == {"F32"}
        name = "model.embed_tokens.weight"
        assert not torch.equal(tuned.get_tensor(name), shipped.get_tensor(name).float())  # it trained
    assert json.loads((folder / STAGE_FILE).read_text())["parent"] == "pretrained:en"
    assert "**Parent stage:** `pretrained:en`, the language model shipped with `ulmfit-hf`" in (
        folder / "README.md"
    ).read_text()


def test_ulmfit_push_uploads_the_shipped_model_and_leaves_the_package_as_shipped(hub_server, tmp_path):
    shipped = {path.name: path.read_bytes() for path in SHIPPED.iterdir() if path.is_file()}
    repo = f"{USER}/ulmfit-en-wikipedia-lm"
    code = f"""
import json
from ulmfit.cli import main
print(json.dumps(main(["push", "pretrained:en", {repo!r}])))
"""
    assert run_python(code, pusher_env(hub_server, tmp_path / "pusher")) == 0
    pushed = hub_server.files(repo)
    for name in ("model.safetensors", "config.json", "vocab.json", STAGE_FILE, *MODEL_CODE_FILES):
        assert pushed[name].data == shipped[name], name
    assert f'from_pretrained("{repo}"' in pushed["README.md"].data.decode()
    assert {path.name: path.read_bytes() for path in SHIPPED.iterdir() if path.is_file()} == shipped


def test_the_demo_starts_from_the_shipped_model_and_says_so(tmp_path, capsys):
    """`ulmfit run demo` trains stages 2 and 3 from `pretrained:en` (here on a few reviews, for a few steps)."""
    small = [
        "--set", "stages.finetune_lm.max_documents=300", "--set", "stages.finetune_lm.max_eval_documents=20",
        "--set", "stages.classifier.max_documents=64", "--set", "stages.classifier.max_tokens=80",
        "--set", "stages.classifier.test_data=null",  # scored on its held-out tenth instead of 1,000 test reviews
        "--training", "max_steps=2", "--output-dir", str(tmp_path),
    ]
    assert main(["run", "demo", *small]) == 0
    printed = capsys.readouterr().out
    assert "Stage pretrain is not run: finetune_lm starts from pretrained:en" in printed
    assert not (tmp_path / "pretrain").exists()
    assert json.loads((tmp_path / "finetune_lm" / STAGE_FILE).read_text())["parent"] == "pretrained:en"
    record = json.loads((tmp_path / "classifier" / STAGE_FILE).read_text())
    assert {"from_scratch_eval_accuracy", "tfidf_eval_accuracy"} <= set(record["baselines"])
