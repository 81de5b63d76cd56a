"""Score model responses to instructions: ``python -m model.score_responses FILE``.

FILE is a JSON list of entries with ``instruction``, ``input``, ``output`` (the reference)
and ``model_response`` (what ``python -m model.instruct`` writes). The metrics (exact match,
token F1, ROUGE-L, and with ``--judge`` an Ollama LLM judge) are model.tasks.scoring's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from model.data.instructions import InstructionDataError
from model.tasks.scoring import (
    JudgeError,
    add_judge_arguments,
    score_file,
)
from model.training.cli import command_parser


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("score_responses", "Score model responses (JSON list with instruction/input/output/"
                       "model_response) against the reference outputs: exact match, token F1, ROUGE-L, and "
                       "optionally an LLM judge via Ollama.")
    p.add_argument("file", help="responses JSON, e.g. written by python -m model.instruct")
    p.add_argument("--out", default=None, help="write per-entry scores and the summary to this JSON file")
    add_judge_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        score_file(args.file, args.out, judge=args.judge, judge_model=args.judge_model, ollama_url=args.ollama_url,
                   judge_timeout=args.judge_timeout, progress=not args.no_progress)
    except (InstructionDataError, JudgeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
