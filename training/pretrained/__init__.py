"""Language models that ship with the package, named `pretrained:<name>` as a recipe's `parent` or a `--parent`.

Each is a stage folder like any other (config, weights, tokenizer, card), so it also loads with
`AutoModelForCausalLM.from_pretrained(shipped_model_folder("pretrained:en"))` and pushes with `ulmfit push`.
"""

from importlib import resources
from pathlib import Path

PREFIX = "pretrained:"


def shipped_models() -> list[str]:
    """The `pretrained:<name>` aliases of the models in this package."""
    root = Path(str(resources.files(__name__)))
    return sorted(f"{PREFIX}{path.name}" for path in root.iterdir() if (path / "config.json").is_file())


def shipped_model_folder(alias: str) -> Path:
    """The folder of the shipped model `alias` (e.g. "pretrained:en")."""
    folder = Path(str(resources.files(__name__))) / alias.removeprefix(PREFIX)
    if not alias.startswith(PREFIX) or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"No shipped model {alias!r}; the package ships {', '.join(shipped_models()) or 'none'}."
        )
    return folder


def model_location(name: str) -> str:
    """`name` with a shipped model's alias replaced by its folder: what `from_pretrained` takes."""
    return str(shipped_model_folder(name)) if name.startswith(PREFIX) else name


__all__ = ["PREFIX", "model_location", "shipped_model_folder", "shipped_models"]
