"""Recipes: the shipped ones validate; every kind of mistake fails at once, naming the key or the file."""

import dataclasses
import glob
from pathlib import Path

import pytest
import yaml

from ulmfit.recipes import RecipeError, available_recipes, load_recipe
from ulmfit.stages import _provenance, _training_arguments
from ulmfit.trainer import ULMFiTTrainingArguments

RECIPES = Path(__file__).parent.parent / "hub_configs"

TRAINING_FIELDS = {f.name for f in dataclasses.fields(ULMFiTTrainingArguments)}


@pytest.mark.parametrize("name", ["demo", "paper_imdb", "trec6"])
def test_shipped_recipes_validate(name):
    assert name in available_recipes()
    recipe = load_recipe(name, training_fields=TRAINING_FIELDS)
    assert list(recipe.stages) == ["pretrain", "finetune_lm", "classifier"]
    assert recipe.stages["classifier"].parent == "finetune_lm"
    # The demo starts from the shipped English model; training its own stage 1 is one override away.
    first = "pretrained:en" if name == "demo" else "pretrain"
    assert recipe.stages["finetune_lm"].parent == first
    assert recipe.lineage() == (["finetune_lm", "classifier"] if name == "demo" else list(recipe.stages))
    from_scratch = load_recipe(name, overrides=["stages.finetune_lm.parent=pretrain"])
    assert from_scratch.lineage() == ["pretrain", "finetune_lm", "classifier"]


def test_demo_recipe_reads_bundled_files():
    recipe = load_recipe("demo")
    for stage in recipe.stages.values():
        assert glob.glob(stage.data.path), stage.data.path
    # A glob: stage 2 reads the unlabelled and the training reviews, never the test reviews.
    domain_text = sorted(Path(p).name for p in glob.glob(recipe.stages["finetune_lm"].data.path))
    assert domain_text == ["imdb_train.jsonl.gz", "imdb_unsup.jsonl.gz"]
    # The model card names the files the glob read, and does not take the local pattern for a Hub dataset.
    training_data = _provenance(recipe.stages["finetune_lm"])[0]
    assert training_data["description"] == "`imdb_train.jsonl.gz`, `imdb_unsup.jsonl.gz`"
    assert "hub" not in training_data


def test_paper_recipes_point_at_the_hub_datasets():
    imdb = load_recipe("paper_imdb")
    assert imdb.stages["pretrain"].data.path == "Salesforce/wikitext"
    assert imdb.stages["pretrain"].data.name == "wikitext-103-raw-v1"
    assert imdb.stages["classifier"].data.path == "stanfordnlp/imdb"
    assert (imdb.model.emb_size, imdb.model.hidden_size, imdb.model.num_layers) == (400, 1152, 3)
    assert load_recipe("trec6").stages["classifier"].data.label_column == "coarse_label"


def test_overrides_reach_any_value():
    recipe = load_recipe(
        "demo",
        overrides=["model.emb_size=64", "stages.classifier.training.learning_rate=0.002", "hub.organization=me"],
        training_fields=TRAINING_FIELDS,
    )
    assert recipe.model.emb_size == 64
    assert recipe.stages["classifier"].training["learning_rate"] == 0.002
    assert recipe.stage_repo_id("classifier") == "me/ulmfit-demo-imdb-classifier"


def write_recipe(tmp_path, mutate) -> Path:
    values = yaml.safe_load((RECIPES / "demo.yaml").read_text())
    mutate(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda v: v["model"].update(emb_sizes=3), "Unknown key 'model.emb_sizes'"),
        (lambda v: v["model"].update(num_layers="three"), "`model.num_layers` must be int"),
        (lambda v: v["stages"]["pretrain"].update(eval_fraction=1.5), "eval_fraction"),
        (lambda v: v["stages"]["pretrain"]["data"].update(path="no/such/file.txt"), "no/such/file.txt"),
        (lambda v: v["stages"]["pretrain"]["data"].update(path="bundled:nothing_*.txt.gz"),
         "no data file matches 'bundled:nothing_"),
        (lambda v: v["stages"]["pretrain"]["data"].update(columns="text"), "columns"),
        (lambda v: v["stages"].pop("finetune_lm"), "names stage 'finetune_lm', which this recipe does not define"),
        (lambda v: v["stages"].update(evaluate={"data": {"path": "x"}}), "Unknown stage `stages.evaluate`"),
        (lambda v: v["stages"]["classifier"]["training"].update(learning_rat=0.1), "training.learning_rat"),
        (lambda v: v["stages"]["classifier"].update(from_scratch_training={"learning_rat": 0.1}),
         "from_scratch_training.learning_rat"),
        (lambda v: v["stages"]["classifier"].update(compare_from_scratch=False,
                                                    from_scratch_training={"learning_rate": 0.002}),
         "runs only with `stages.classifier.compare_from_scratch: true`"),
        (lambda v: v["tokenizer"].update(kind="bytes"), "`tokenizer.kind` must be one of"),
        (lambda v: v["stages"]["classifier"]["data"].update(label_column=None), "label_column` is required"),
        (lambda v: v.pop("name"), "Missing key 'name'"),
    ],
)
def test_broken_recipes_fail_with_a_message_naming_the_problem(tmp_path, mutate, message):
    path = write_recipe(tmp_path, mutate)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_recipe(str(path), training_fields=TRAINING_FIELDS)


def test_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(RecipeError, match="demo, paper_imdb, trec6, wikipedia_en"):
        load_recipe("no-such-recipe")


def test_the_english_stage1_recipe_reads_50m_tokens_and_checkpoints_often(tmp_path):
    """Hours of pretraining: a checkpoint every few minutes, so an interrupted run loses little."""
    recipe = load_recipe("wikipedia_en", training_fields=TRAINING_FIELDS, check_files=False)
    args = _training_arguments(recipe, recipe.stages["pretrain"], tmp_path, {}, from_scratch=True)
    assert args.max_steps * args.per_device_train_batch_size * recipe.model.bptt >= 50_000_000
    assert (args.save_strategy, args.save_steps) == ("steps", 200)


def test_bad_override_syntax():
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_recipe("demo", overrides=["model.emb_size"])


@pytest.mark.parametrize("name", ["paper_imdb", "trec6"])
def test_paper_recipes_fine_tune_the_lm_as_the_paper_does(name, tmp_path):
    """Stage 2 trains every layer from the start, each group 2.6 times slower than the one above, along STLR."""
    recipe = load_recipe(name)
    args = _training_arguments(recipe, recipe.stages["finetune_lm"], tmp_path, {}, from_scratch=False)
    assert (args.ulmfit_schedule, args.discriminative_lr_factor, args.learning_rate) == ("stlr", 2.6, 4e-3)
    assert args.unfreeze_schedule is None


@pytest.mark.parametrize("name", ["paper_imdb", "trec6"])
def test_paper_recipes_train_the_classifier_at_one_rate_and_the_paper_s_stage_3_is_two_overrides_away(name, tmp_path):
    """Stage 3 trains every layer group from the start at one rate along STLR (what won from the shipped model); the
    overrides in the recipe's comment give the paper's: one more layer group each epoch, discriminative rates 2.6."""
    recipe = load_recipe(name)
    args = _training_arguments(recipe, recipe.stages["classifier"], tmp_path, {}, from_scratch=False)
    assert (args.ulmfit_schedule, args.discriminative_lr_factor, args.learning_rate) == ("stlr", 1.0, 1e-2)
    assert args.unfreeze_schedule is None

    lines = (RECIPES / f"{name}.yaml").read_text().splitlines()
    comment = next(line for line in lines if "--set stages.classifier" in line)
    paper = load_recipe(name, overrides=[override.strip() for override in comment.split("--set")[1:]])
    args = _training_arguments(paper, paper.stages["classifier"], tmp_path, {}, from_scratch=False)
    assert (args.ulmfit_schedule, args.discriminative_lr_factor, args.unfreeze_schedule) == ("stlr", 2.6, "gradual")
