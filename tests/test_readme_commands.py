"""Every command the README shows parses: ``scratchgpt X``, ``python -m model.X`` and
``torchrun ... -m model.X`` lines with the command's own parser, ``python -m bench.X`` to an
existing bench (nothing is run)."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from model.cli import COMMANDS

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[list[str]]:
    """The argv of each command line in the README's bash blocks (continuations joined, pipes
    and comments dropped), from the program on."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.rsplit("|", 1)[-1] if "| scratchgpt" in line else line, comments=True)
            if words[:1] == ["torchrun"]:
                words = ["python"] + words[words.index("-m"):]
            if words[:1] == ["scratchgpt"] or words[:2] == ["python", "-m"]:
                commands.append(words)
    return commands


COMMAND_LINES = readme_commands()


def test_the_readme_shows_the_new_familys_commands() -> None:
    shown = [" ".join(c) for c in COMMAND_LINES]
    for needed in ("--hf-model Qwen/Qwen3-0.6B", "--hf-model meta-llama/Llama-3.2-1B-Instruct", "bench.generate"):
        assert any(needed in line for line in shown), needed
    assert len(COMMAND_LINES) > 30


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=[" ".join(c)[:60] for c in COMMAND_LINES])
def test_a_readme_command_parses(argv: list[str]) -> None:
    if argv[0] == "scratchgpt":
        if argv[1:2] in ([], ["--help"]):
            return
        module, args = f"model.{COMMANDS[argv[1]][0]}", argv[2:]
    else:
        module, args = argv[2], argv[3:]
    if module.startswith("bench."):
        assert importlib.util.find_spec(module) is not None, module
        return
    if args[:1] == ["predict"]:  # classify's subcommand has its own small parser: check the module only
        assert module == "model.classify"
        return
    importlib.import_module(module).build_parser().parse_args(args)
