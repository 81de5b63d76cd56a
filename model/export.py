"""Export a checkpoint: ``python -m model.export runs/pretrain --to hf out/my-gpt``.

``--to hf DIR`` writes a Hugging Face folder (config.json, model.safetensors and the
tokenizer files) that ``transformers``' AutoModelForCausalLM / AutoTokenizer, its pipelines
and other tools load: GPT-2 with GPT-2's tokenizer files, or a Llama 3 / Qwen3 run with the
tokenizer files its run directory holds. ``--weights-only OUT`` writes the checkpoint without its
optimizer state: the file to share or to run (generate, chat, classify, instruct take it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from model.data.datadir import DataFileNotFoundError, add_data_dir_argument
from model.decoder.config import DecoderConfig
from model.decoder.hf import export_hf_folder
from model.training.cli import command_parser
from model.weights.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    load_model_from_checkpoint,
    resolve_checkpoint,
    save_weights_only,
)
from model.weights.hf import export_hf, export_hf_tokenizer
from model.weights.start import load_start_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("export", "Write a checkpoint as a Hugging Face folder (--to hf: GPT-2, Llama 3 or Qwen3), "
                                 "or without its optimizer state (--weights-only).")
    p.add_argument("checkpoint", help="checkpoint (PATH or PATH.safetensors) or run directory (its latest checkpoint)")
    p.add_argument("out", help="the folder (--to hf) or checkpoint path (--weights-only) to write")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", choices=["hf"], help="hf: config.json, model.safetensors and the tokenizer files")
    what.add_argument("--weights-only", action="store_true",
                      help="a checkpoint without optimizer and loop state (cannot be resumed)")
    p.add_argument("--best", action="store_true", help="export the run directory's best checkpoint, not its latest")
    add_data_dir_argument(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        source = resolve_checkpoint(args.checkpoint, args.best)
        if args.weights_only:
            out = checkpoint_paths(save_weights_only(source, args.out))[0]
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, no optimizer state)")
            return 0
        model, ckpt = load_model_from_checkpoint(source)
        if "classifier" in ckpt.extra:  # a ...ForCausalLM folder has no place for a classifier head
            raise CheckpointError(f"{ckpt.path} is a classifier: --to hf exports language models only")
        if isinstance(model.config, DecoderConfig):
            tokenizer = load_start_tokenizer(model.config, checkpoint=ckpt.path)  # the files beside the checkpoint
            export_hf_folder(model, args.out, tokenizer_dir=tokenizer.folder)
        else:
            export_hf(model, args.out)
            export_hf_tokenizer(args.out, model.config, args.data_dir)
    except (CheckpointError, DataFileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a Hugging Face folder to {args.out}: load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
