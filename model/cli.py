"""The ``scratchgpt`` console script: ``scratchgpt <command> [flags]`` runs ``python -m model.<module>``.

Each subcommand is the command module's own ``main(argv)``, so its flags, help and exit codes
are those of ``python -m model.<module>``. Adding a command is one line in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

# subcommand -> (module under model/, one line for --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("prepare_data", "tokenize a text corpus once into train.bin / val.bin for train --data"),
    "train": ("train", "pretrain a GPT on a text file or a prepared corpus (the book's chapter 5)"),
    "generate": ("generate", "continue a prompt with a checkpoint, a run directory or Hugging Face weights"),
    "chat": ("chat", "talk to an instruction-tuned checkpoint or a Llama 3 / Qwen3 folder"),
    "classify": ("classify", "spam classification fine-tuning, and `classify predict TEXT`"),
    "instruct": ("instruct", "instruction fine-tuning (the book's chapter 7)"),
    "score": ("score_responses", "score model responses: exact match, token F1, ROUGE-L, LLM judge"),
    "export": ("export", "write a checkpoint as a Hugging Face folder, or without its optimizer state"),
}


def package_version() -> str:
    try:
        return version("scratchgpt")
    except PackageNotFoundError:  # run from a checkout that was never pip-installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="scratchgpt", usage="scratchgpt [-h] [--version] COMMAND [ARGS ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A GPT engine from the ground up. Every command is also python -m model.<module>.",
        epilog=f"commands:\n{commands}\n\n`scratchgpt COMMAND --help` shows a command's flags.")
    parser.add_argument("--version", action="version", version=f"scratchgpt {package_version()}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:  # the command parses its own flags, --help included
        module = importlib.import_module(f"model.{COMMANDS[argv[0]][0]}")
        return module.main(argv[1:]) or 0
    build_parser().parse_args(argv)  # --help, --version, or an unknown command: prints and exits
    return 2


if __name__ == "__main__":
    sys.exit(main())
