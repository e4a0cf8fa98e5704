"""The README's commands stay true: CI runs its test command, and every `ulmfit` command in it parses and validates."""

import re
import shlex
from pathlib import Path

import pytest

from ulmfit.cli import STAGE_COMMANDS, build_parser
from ulmfit.recipes import load_recipe

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def readme_commands() -> list[str]:
    """Each shell command of the README's bash blocks, continuation lines joined, split at `&&`."""
    commands = []
    for block in BLOCKS:
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def ulmfit_invocations() -> list[list[str]]:
    """The `ulmfit` arguments of every README command, including `accelerate launch ... -m ulmfit ...`."""
    found = []
    for command in readme_commands():
        words = shlex.split(command)
        if words[0] == "ulmfit":
            found.append(words[1:])
        elif "-m" in words and words[words.index("-m") + 1] == "ulmfit":
            found.append(words[words.index("-m") + 2 :])
    return found


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if c.startswith("python -m pytest"))
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    install = [c for c in readme_commands() if c.startswith("pip install")]
    assert "pip install torch==2.13.0" in install  # torch first, the CPU wheel


@pytest.mark.parametrize("arguments", ulmfit_invocations(), ids=lambda a: " ".join(a)[:60])
def test_every_ulmfit_command_in_the_readme_parses_and_its_recipe_validates(arguments):
    args = build_parser().parse_args(arguments)
    if args.command in ("run", "validate", *STAGE_COMMANDS):
        recipe = load_recipe(args.recipe, overrides=args.overrides)
        assert recipe.stages


def test_the_readme_shows_the_demo_and_test_commands():
    assert "ulmfit run demo" in README
    assert len(ulmfit_invocations()) >= 8
