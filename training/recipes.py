"""ULMFiT recipes: one YAML (or JSON) file describes a model family's stages, data, tokenizer, model and Hub names.

A recipe is checked completely when it is loaded, before any work starts: an unknown key, a value of the wrong type,
a missing data file or a stage whose parent does not exist fails at once with a message naming the key or the file.
Any value can be overridden with a dotted path (`stages.classifier.training.num_train_epochs=2`).
"""

import dataclasses
import glob
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .data import DataSpec

STAGE_ORDER = ("pretrain", "finetune_lm", "classifier")
RECIPES_PACKAGE = "ulmfit.hub_configs"  # the hub_configs/ folder


class RecipeError(ValueError):
    """A recipe is invalid; the message names the key or the file."""


@dataclass
class TokenizerSpec:
    """How a stage gets its tokenizer. `rebuild` in a later stage builds a new vocabulary from that stage's data and
    moves the parent's embeddings over (fastai's `match_embeds`); otherwise the parent's tokenizer is kept."""

    kind: Literal["fastai", "subword"] = "fastai"
    max_vocab: int = 60000
    min_freq: int = 3
    vocab_size: int = 30000
    subword_model: Literal["unigram", "bpe"] = "unigram"
    rebuild: bool = False


@dataclass
class ModelSpec:
    """AWD-LSTM sizes and the `AwdLstmConfig` values a recipe sets (dropouts via `drop_mult`)."""

    emb_size: int = 400
    hidden_size: int = 1152
    num_layers: int = 3
    drop_mult: float = 1.0
    ar_alpha: float = 2.0
    tar_beta: float = 1.0
    bptt: int = 72
    max_len: int = 1440
    backwards: bool = False


@dataclass
class StageSpec:
    """One ULMFiT stage. `parent` names an earlier stage of the recipe, a local stage folder or a Hub repository."""

    data: DataSpec
    eval_data: DataSpec | None = None
    test_data: DataSpec | None = None
    eval_fraction: float = 0.1
    max_documents: int | None = None  # use only the first N training documents
    max_eval_documents: int | None = None
    max_tokens: int | None = None  # classifier: read only the last N tokens of each document (it pools over the end)
    parent: str | None = None
    repo_id: str | None = None
    tokenizer: TokenizerSpec | None = None
    drop_mult: float | None = None
    compare_from_scratch: bool = False  # classifier: also train it from random weights, to show what stages 1-2 add
    # classifier: the training arguments the from-scratch twin changes (random weights often need a gentler rate)
    from_scratch_training: dict[str, Any] = field(default_factory=dict)
    compare_tfidf: bool = False  # classifier: also fit TF-IDF + logistic regression on the same training split
    # classifier: "single_label_classification", "multi_label_classification" or "regression"; by default lists of
    # class names are multi-label, floats regression, and names or integer ids single-label classes.
    problem_type: Literal["single_label_classification", "multi_label_classification", "regression"] | None = None
    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class HubSpec:
    organization: str | None = None
    push: bool = False
    private: bool = False
    tag: str | None = None


@dataclass
class Recipe:
    name: str
    description: str = ""
    seed: int = 42
    output_dir: str | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    hub: HubSpec = field(default_factory=HubSpec)
    stages: dict[str, StageSpec] = field(default_factory=dict)
    source: str | None = None  # where the recipe was read from

    def stage_repo_id(self, stage: str) -> str | None:
        """The Hub repository of a stage: its `repo_id`, with `{organization}` and `{name}` filled in."""
        repo = self.stages[stage].repo_id
        if repo is None:
            return None
        return repo.format(organization=self.hub.organization or "", name=self.name).lstrip("/")

    def lineage(self) -> list[str]:
        """The recipe's last stage and the stages of the recipe it descends from, in order: what `ulmfit run` trains.
        A stage whose child starts from elsewhere (a shipped model, a folder, a Hub repository) is not among them."""
        chain = [[name for name in STAGE_ORDER if name in self.stages][-1]]
        while (parent := self.stages[chain[-1]].parent) in self.stages:
            chain.append(parent)
        return chain[::-1]


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------
def available_recipes() -> list[str]:
    """Names of the recipes shipped in `hub_configs/`."""
    return sorted(
        Path(p).stem for p in resources.files(RECIPES_PACKAGE).iterdir() if str(p).endswith((".yaml", ".json"))
    )


def load_recipe(
    name_or_path: str,
    overrides: list[str] | None = None,
    training_fields: Mapping[str, Any] | set[str] | None = None,
    check_files: bool = True,
) -> Recipe:
    """Reads, overrides and validates a recipe: a file path, or the name of a recipe in `hub_configs/` ("demo").

    `overrides` are `dotted.key=value` strings, the value parsed as YAML. `training_fields` are the valid keys of each
    stage's `training:` mapping (the ULMFiT training arguments), with their types when given as a mapping (values are
    then checked and converted: `1e-3` becomes a float); local data files are checked when `check_files`.
    """
    path = _resolve_recipe_path(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise RecipeError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from error
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values.")
    for override in overrides or []:
        _apply_override(values, override)
    stages = values.get("stages")
    unknown = sorted(set(stages) - set(STAGE_ORDER)) if isinstance(stages, dict) else []
    if unknown:  # before the stage is built, which would ask for its missing keys first
        raise RecipeError(f"Unknown stage `stages.{unknown[0]}`; stages are {', '.join(STAGE_ORDER)}.")
    recipe = _build(Recipe, values, "")
    recipe.source = str(path)
    _check_recipe(recipe, path, training_fields, check_files)
    return recipe


def _resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    for suffix in (".yaml", ".json"):
        shipped = resources.files(RECIPES_PACKAGE) / f"{name_or_path}{suffix}"
        if shipped.is_file():
            return Path(str(shipped))
    raise RecipeError(
        f"No recipe file {name_or_path!r}, and no shipped recipe of that name"
        f" (shipped: {', '.join(available_recipes())})."
    )


def _apply_override(values: dict, override: str) -> None:
    if "=" not in override:
        raise RecipeError(f"Override {override!r} must look like dotted.key=value.")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    target = values
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise RecipeError(f"Override {dotted!r}: {key!r} is not a mapping.")
    target[keys[-1]] = yaml.safe_load(raw)


def _build(cls: type, values: Any, where: str) -> Any:
    """Builds dataclass `cls` from a mapping, checking every key and type; `where` is the dotted path for errors."""
    if not isinstance(values, dict):
        raise RecipeError(f"`{where or 'recipe'}` must be a mapping, got {type(values).__name__}.")
    if cls is DataSpec:
        try:
            return DataSpec.from_dict(values)
        except (TypeError, ValueError) as error:
            raise RecipeError(f"`{where}`: {error}") from error
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise RecipeError(f"Unknown key {_join(where, unknown[0])!r}; valid keys here: {', '.join(sorted(fields))}.")
    missing = [
        n for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in values
    ]
    if missing:
        raise RecipeError(f"Missing key {_join(where, missing[0])!r}.")
    kwargs = {name: _convert(hints[name], value, _join(where, name)) for name, value in values.items()}
    return cls(**kwargs)


def _convert(annotation: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except RecipeError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"`{where}` must be one of {list(args)}, got {value!r}.")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"`{where}` must be a mapping, got {type(value).__name__}.")
        if args and dataclasses.is_dataclass(args[1]):
            return {key: _build(args[1], item, _join(where, key)) for key, item in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-3` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and (
        not isinstance(value, annotation) or (annotation is int and isinstance(value, bool))
    ):
        raise RecipeError(f"`{where}` must be {annotation.__name__}, got {value!r} ({type(value).__name__}).")
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# ----------------------------------------------------------------------------------------------------------------------
# Checks across keys
# ----------------------------------------------------------------------------------------------------------------------
def _check_recipe(
    recipe: Recipe, path: Path, training_fields: Mapping[str, Any] | set[str] | None, check_files: bool
) -> None:
    if not recipe.stages:
        raise RecipeError(f"{path}: `stages` is empty; give at least one of {', '.join(STAGE_ORDER)}.")
    for stage_name, stage in recipe.stages.items():
        where = f"stages.{stage_name}"
        if stage.parent is not None and stage.parent in STAGE_ORDER and stage.parent not in recipe.stages:
            raise RecipeError(f"`{where}.parent` names stage {stage.parent!r}, which this recipe does not define.")
        if stage.parent is not None and stage.parent in STAGE_ORDER:
            if STAGE_ORDER.index(stage.parent) >= STAGE_ORDER.index(stage_name):
                raise RecipeError(
                    f"`{where}.parent` must be an earlier stage than {stage_name!r}, got {stage.parent!r}."
                )
        if stage_name == "classifier" and stage.data.label_column is None:
            raise RecipeError(f"`{where}.data.label_column` is required for the classifier stage.")
        if not 0.0 <= stage.eval_fraction < 1.0:
            raise RecipeError(f"`{where}.eval_fraction` must be in [0, 1), got {stage.eval_fraction}.")
        if stage.from_scratch_training and not stage.compare_from_scratch:
            raise RecipeError(
                f"`{where}.from_scratch_training` changes the from-scratch twin, which runs only with "
                f"`{where}.compare_from_scratch: true`: set that too, or remove it."
            )
        if training_fields is not None:
            for key in ("training", "from_scratch_training"):
                values = getattr(stage, key)
                unknown = sorted(set(values) - set(training_fields))
                if unknown:
                    raise RecipeError(f"Unknown training argument `{where}.{key}.{unknown[0]}`.")
                if isinstance(training_fields, Mapping):
                    setattr(stage, key, {
                        # The range test chooses the stage's own rate; the twin's needs a number.
                        name: value if (key, name, value) == ("training", "learning_rate", "find")
                        else _convert(training_fields[name], value, f"{where}.{key}.{name}")
                        for name, value in values.items()
                    })
        if check_files:
            for key in ("data", "eval_data", "test_data"):
                spec = getattr(stage, key)
                if spec is not None:
                    _check_local_source(spec, f"{where}.{key}.path", path.parent)


def _check_local_source(spec: DataSpec, where: str, recipe_dir: Path) -> None:
    """Local paths must exist (relative paths are read from the recipe's folder or the package's bundled data)."""
    resolved = resolve_data_path(spec.path, recipe_dir)
    looks_local = spec.path.startswith((".", "/", "~")) or spec.format is not None or "." in Path(spec.path).name
    if looks_local and not _exists(resolved):
        if any(char in spec.path for char in "*?["):
            raise RecipeError(f"`{where}`: no data file matches {spec.path!r} (looked for {resolved}).")
        raise RecipeError(f"`{where}`: data file {spec.path!r} does not exist (looked for {resolved}).")
    spec.path = resolved if _exists(resolved) else spec.path


def _exists(path: str | Path) -> bool:
    """A file or folder, or a glob that matches at least one."""
    return Path(path).exists() or bool(glob.glob(str(path)))


def resolve_data_path(path: str, recipe_dir: Path) -> str:
    """`bundled:NAME` is a file of the package's bundled data; a relative path is relative to the recipe's folder."""
    if path.startswith("bundled:"):
        return str(Path(str(resources.files("ulmfit.demo_data"))) / path[len("bundled:"):])
    expanded = Path(os.path.expanduser(path))
    if not expanded.is_absolute() and _exists(recipe_dir / expanded):
        return str(recipe_dir / expanded)
    return str(expanded)


__all__ = [
    "Recipe", "RecipeError", "StageSpec", "TokenizerSpec", "ModelSpec", "HubSpec", "load_recipe", "available_recipes"
]
