"""A tiny float64 training run through model.training.loop.train, for tests/test_distributed.py.

``python -m tests.helpers.ddp_run OUT_DIR`` trains alone; under torchrun (or with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT set) each process takes its shard of every global batch.
Rank 0 writes ``history.json`` (with the number of gradient all-reduces) and ``weights.npz`` to
OUT_DIR. Random tokens over a 97-word vocabulary keep it fast; dropout is off so a shard sees
what its rows see in the one-process run.
Exit status 1 with ``error: ...`` on stderr when a collective fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import engine
from engine import optim
from model.config import get_config
from model.data.windows import DataLoader, SlidingWindowDataset
from model.gpt import GPTModel
from model.training.distributed import Distributed, run_maybe_distributed
from model.training.loop import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.helpers.ddp_run")
    p.add_argument("out_dir")
    p.add_argument("--global-batch", type=int, default=4, help="rows per global batch (per rank x ranks)")
    p.add_argument("--grad-accum", type=int, default=1, help="global batches accumulated per optimizer step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--die-after-step", type=int, default=None, help="the last rank calls os._exit(1) after this step")
    p.add_argument("--hang-after-step", type=int, default=None, help="the last rank sleeps for good after this step")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)

    engine.set_backend("numpy")
    engine.manual_seed(0)
    model = GPTModel(get_config("tiny", vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=2,
                                drop_rate=0.0)).to("float64")
    optimizer = optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    ids = np.random.default_rng(0).integers(0, 97, 8 * 40 + 1)
    train_set = SlidingWindowDataset(ids[:8 * 30 + 1], 8, 8)  # 30 windows
    val_set = SlidingWindowDataset(ids[8 * 30:], 8, 8)  # 10 windows: a last, partial eval batch
    train_loader = DataLoader(train_set, args.global_batch, seed=1)
    val_loader = DataLoader(val_set, args.global_batch, shuffle=False, drop_last=False)
    config = TrainConfig(epochs=100, lr=args.lr, grad_clip=0.5, eval_interval=2, eval_iters=3, max_steps=args.steps,
                         grad_accum=args.grad_accum, sample_prompt=None)

    def run(distributed: Distributed | None) -> int:
        def on_step(state, loss):
            if distributed is None or distributed.rank != distributed.world_size - 1:
                return
            if state.step == args.die_after_step:
                os._exit(1)
            if state.step == args.hang_after_step:
                time.sleep(3600)

        all_reduces = 0
        if distributed is not None:
            all_reduce = distributed.all_reduce_gradients

            def counted_all_reduce(params):
                nonlocal all_reduces
                all_reduces += 1
                all_reduce(params)

            distributed.all_reduce_gradients = counted_all_reduce
            distributed.check_same_config({"lr": args.lr, "global_batch": args.global_batch, "steps": args.steps})
        history = train(model, optimizer, train_loader, val_loader, config, progress=False, on_step=on_step,
                        distributed=distributed, log=lambda message: None)
        if distributed is None or distributed.is_main:
            out = Path(args.out_dir)
            (out / "history.json").write_text(json.dumps(history | {"all_reduces": all_reduces}))
            np.savez(out / "weights.npz", **model.state_dict())
        return 0

    return run_maybe_distributed(run, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
