"""Tokenize a corpus once for pretraining: ``python -m model.prepare_data INPUT --out DIR``.

INPUT is a text file, a directory (its ``.txt`` files, recursively) or a glob (quoted).
Writes ``DIR/train.bin`` and ``DIR/val.bin`` (uint16 GPT-2 token ids, ``<|endoftext|>``
after each document) and ``DIR/meta.json``; ``python -m model.train --data DIR`` trains on
them through a memory map. Re-running on an unchanged input does nothing.
"""

from __future__ import annotations

import argparse
import sys

from model.data.corpus import CorpusError, prepare_corpus
from model.data.datadir import DataFileNotFoundError, add_data_dir_argument
from model.training.cli import command_parser


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("prepare_data", "Tokenize a text corpus into train.bin / val.bin for model.train --data.")
    p.add_argument("input", metavar="INPUT",
                   help="a text file, a directory of .txt files (searched recursively) or a quoted glob; "
                        "each file is one document")
    p.add_argument("--out", metavar="DIR", required=True, help="where train.bin, val.bin and meta.json go")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the documents (chosen by a hash of their path) held out for validation; "
                        "a single document is split at this share of its tokens instead")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: the CPU count)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_dir_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        prepare_corpus(args.input, args.out, val_fraction=args.val_fraction, workers=args.workers,
                       data_dir=args.data_dir, progress=not args.no_progress)
    except (CorpusError, DataFileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
