"""Chat with a model: ``python -m model.chat runs/instruct`` (also ``scratchgpt chat``).

MODEL is a checkpoint, a run directory or a Hugging Face folder (GPT-2, Llama 3, Qwen3);
``--hf-model REPO`` downloads such a folder (e.g. Qwen/Qwen3-0.6B) instead. The
prompt template comes with the model: the one ``model.instruct`` stored in its checkpoint, or
the folder's native chat template; a model without one continues the text as written. Replies
stream as they are generated; the conversation (and its KV cache) carries across turns, its
oldest turns dropped when the context is full.

At a terminal: ``/reset`` starts over, ``/stats`` toggles tokens/s, ``/exit`` or Ctrl-D quits,
Ctrl-C stops a reply or clears the line. With stdin not a terminal, each line is one user
message and each reply goes to stdout followed by a newline (notes go to stderr), so a chat
can be scripted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import engine
from model.data.datadir import DataFileNotFoundError, add_data_dir_argument
from model.tasks.chat import ChatSession
from model.training.cli import add_backend_argument, add_hf_model_argument, command_parser
from model.weights.checkpoint import CheckpointError
from model.weights.hub import HFDownloadError, download_hf_model
from model.weights.inference import load_for_inference

HELP = "/reset starts over, /stats toggles tokens/s, /exit or Ctrl-D quits, Ctrl-C stops a reply"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("chat", "Chat with an instruction-tuned checkpoint, a run directory or a Hugging Face "
                               "folder (GPT-2, Llama 3, Qwen3).", epilog=HELP)
    p.add_argument("model", nargs="?", help="checkpoint, run directory (its latest checkpoint) or Hugging Face folder")
    add_hf_model_argument(p)
    p.add_argument("--cache-dir", metavar="DIR", default=None, help="where --hf-model downloads are kept")
    p.add_argument("--best", action="store_true", help="the run directory's best checkpoint instead of its latest")
    p.add_argument("--system", default=None, help="a system message (templates that have one: Llama 3, Qwen3)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens in one reply")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy decoding")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only among the most likely tokens whose "
                                                              "probabilities add up to p")
    p.add_argument("--seed", type=int, default=123, help="seed of the sampling")
    p.add_argument("--stats", action="store_true", help="print tokens/s after each reply")
    add_backend_argument(p)
    add_data_dir_argument(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if (args.model is None) == (args.hf_model is None):
        parser.error("give MODEL (a checkpoint, run directory or Hugging Face folder) or --hf-model REPO, not both")
    if args.backend:
        engine.set_backend(args.backend)
    try:
        loaded = load_for_inference(args.model or download_hf_model(args.hf_model, args.cache_dir), args.best,
                                    args.data_dir)
    except (CheckpointError, HFDownloadError, DataFileNotFoundError, ValueError) as err:  # HFFolderError: ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    session = ChatSession(loaded.model, loaded.chat, loaded.decode, args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, args.seed, args.system)
    interactive = sys.stdin.isatty()
    if loaded.chat.is_template:
        note = f"{loaded.description}, prompt template {loaded.chat.name}"
    else:
        note = f"{loaded.description} has no prompt template (not from model.instruct): plain text continuation"
    print(note + (f"\n{HELP}" if interactive else ""), file=sys.stderr)
    return repl(session, interactive, args.stats)


def repl(session: ChatSession, interactive: bool, stats: bool) -> int:
    if interactive:
        try:
            import readline  # noqa: F401  line editing and history where the platform has it
        except ImportError:
            pass
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:  # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
            print()
            continue
        if not interactive and not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                session.reset()
                print("(conversation cleared)", file=sys.stderr)
            elif text == "/stats":
                stats = not stats
            else:
                print(f"unknown command {text}: {HELP}", file=sys.stderr)
            continue
        try:
            reply = session.send(text, on_text=lambda piece: print(piece, end="", flush=True))
        except KeyboardInterrupt:
            print("\n(reply stopped)", file=sys.stderr)
            continue
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            continue
        print(flush=True)
        if reply.dropped_turns:
            print(f"(the {reply.dropped_turns} oldest turn(s) no longer fit the context and were dropped)",
                  file=sys.stderr)
        if stats:
            print(f"[{reply.tokens} tokens in {reply.seconds:.2f} s: {reply.tokens_per_second:.1f} tokens/s]",
                  file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
