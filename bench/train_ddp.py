"""Data-parallel training throughput, 1 process against N: ``python -m bench.train_ddp``.

Each configuration runs our training step (forward, backward, gradient all-reduce through
model.training.distributed, AdamW) on our numpy backend (triton with a GPU), with a fixed per-process
batch (weak scaling: N processes see N times the tokens per step). The launcher starts the
processes itself on 127.0.0.1 with the variables torchrun sets, so the workers are what
``torchrun --nproc_per_node=N -m model.train`` would run. The table gives ms/step, tokens/s,
the speedup over the one-process run with the same total threads, the scaling efficiency, and
the share of each step spent in the gradient all-reduce.

On a CPU the processes share the cores: 1 process with all threads against N processes with
cores/N threads each is the fair comparison (BLAS threads vs processes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def worker(args: argparse.Namespace) -> None:
    """One rank: time `args.steps` training steps after `args.warmup`; rank 0 prints a JSON line."""
    import numpy as np

    import engine
    from engine import optim
    from model.config import get_config
    from model.data.windows import DataLoader, SlidingWindowDataset
    from model.gpt import GPTModel
    from model.training.distributed import Distributed
    from model.training.loop import calc_loss_batch

    engine.set_backend(args.backend or ("triton" if _cuda() else "numpy"))
    dist = Distributed.from_env(timeout=120)
    world = 1 if dist is None else dist.world_size
    config = get_config(args.preset, drop_rate=0.0, **({"context_length": args.context_length}
                                                      if args.context_length else {}))
    engine.manual_seed(0)
    model = GPTModel(config)
    optimizer = optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    n_steps = args.warmup + args.steps
    global_batch = args.batch_size * world
    ids = np.random.default_rng(0).integers(0, config.vocab_size, n_steps * global_batch * config.context_length + 1)
    batches = list(DataLoader(SlidingWindowDataset(ids, config.context_length, config.context_length), global_batch))
    sync = _sync()
    reduce_s = 0.0
    for i, (x, y) in enumerate(batches):
        if i == args.warmup:
            sync()
            start, reduce_s = time.perf_counter(), 0.0
        if dist is not None:
            dist.barrier()  # start every step together: the all-reduce time is then the exchange itself
            x, y = dist.shard(x), dist.shard(y)
        optimizer.zero_grad()
        loss = calc_loss_batch(x, y, model)
        loss.backward()
        if dist is not None:
            sync()
            t = time.perf_counter()
            dist.all_reduce_gradients(params)
            sync()
            reduce_s += time.perf_counter() - t
        optimizer.step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    if dist is not None:
        seconds, reduce_s = dist.average(seconds), dist.average(reduce_s)
        dist.close()
    if dist is None or dist.is_main:
        print(json.dumps({"s_per_step": seconds, "reduce_s_per_step": reduce_s / args.steps,
                          "tokens_per_step": global_batch * config.context_length,
                          "params": sum(p.size for p in params)}))


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _sync():
    import torch
    return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


def launch(nproc: int, threads: int, args: argparse.Namespace) -> dict:
    """Run the worker in `nproc` processes of `threads` threads each; rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "bench.train_ddp", "--worker", "--preset", args.preset, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    cmd += ["--context-length", str(args.context_length)] if args.context_length else []
    cmd += ["--backend", args.backend] if args.backend else []
    procs = []
    for rank in range(nproc):
        env = {**os.environ, **{v: str(threads) for v in THREAD_VARS}}
        if nproc > 1:
            env |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        else:
            env = {k: v for k, v in env.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed ({nproc} processes x {threads} threads)")
    return json.loads(outs[0].strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.train_ddp", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run (default: 2)")
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--context-length", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per process and step (default: 4)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--backend", choices=("numpy", "triton"), default=None, help="our backend")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    cores = os.cpu_count() or 1
    per_proc = max(1, cores // args.nproc)
    runs = [(1, cores), (1, per_proc), (args.nproc, per_proc)] if per_proc != cores else [(1, cores),
                                                                                          (args.nproc, per_proc)]
    results = [(n, t, launch(n, t, args)) for n, t in runs]
    base = min((r for n, _, r in results if n == 1), key=lambda r: r["s_per_step"])  # the best single process
    print(f"data-parallel bench: {args.preset} ({base['params']:,} parameters), {args.batch_size} sequences x "
          f"{base['tokens_per_step'] // args.batch_size} tokens per process and step, {args.warmup} warmup + "
          f"{args.steps} timed steps, {cores} CPU cores\n")
    header = f"{'processes x threads':<22} {'ms/step':>9} {'tokens/s':>10} {'speedup':>8} {'efficiency':>11} " \
             f"{'all-reduce':>11}"
    print(header)
    print("-" * len(header))
    base_rate = base["tokens_per_step"] / base["s_per_step"]
    for n, t, r in results:
        rate = r["tokens_per_step"] / r["s_per_step"]
        share = f"{r['reduce_s_per_step'] / r['s_per_step']:.0%}" if n > 1 else "-"
        efficiency = f"{rate / base_rate / n:.0%}" if n > 1 else "-"
        print(f"{f'{n} x {t}':<22} {1e3 * r['s_per_step']:9.1f} {rate:10.0f} {rate / base_rate:8.2f} "
              f"{efficiency:>11} {share:>11}")
    print("\nspeedup: tokens/s over the fastest single process; efficiency: speedup / processes; all-reduce: "
          "share of a step in the gradient exchange.")


if __name__ == "__main__":
    main()
