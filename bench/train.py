"""Training throughput of our GPT against the same GPT in plain PyTorch: ``python -m bench.train``.

Both models start from the same weights (ours, copied into `bench.torch_gpt`), see the
same batches of the-verdict.txt and take AdamW steps with the same settings (dropout off
unless ``--drop-rate``). Each provider runs in its own process (so one's memory does not
count against another's): ``--warmup`` untimed steps, then ``--steps`` timed ones, the
providers taking turns step by step. A shared machine's speed moves by 10-25% over minutes;
taking turns puts a slow stretch on every provider alike, where one whole run after another
(``--no-interleave``, one process alive at a time) puts it on whoever ran then. The table
gives ms/step, tokens/s, the ratio of our tokens/s to each provider's and its lowest and
highest value step for step, the time of each
phase (forward with the loss, backward, optimizer step), the peak resident memory of the
timed steps, and the largest difference between the first losses (fp32 runs without
dropout should agree to ~1e-4).

* CPU: our numpy backend against torch eager on the CPU (torch's default thread count),
  run as its users run it, and again with our backend's malloc settings
  (`engine.backends.numpy_memory`: no large block gets a fresh mapping), which speed torch
  up as well: the two rows show how much of our lead is that setting.
* GPU: our triton backend against torch eager in fp32, torch eager with bf16 autocast
  (scaled_dot_product_attention picks its flash kernel), and torch.compile of the latter.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np
import torch
import torch.nn.functional as torch_F

import engine
from bench.torch_gpt import from_state_dict
from engine.backends import numpy_memory
from model.config import PRESETS, get_config
from model.data.datadir import DataFileNotFoundError, add_data_dir_argument, data_file
from model.data.windows import DataLoader, SlidingWindowDataset
from model.gpt import GPTModel, count_parameters
from model.tokenizers.gpt2 import gpt2_tokenizer
from model.training.loop import calc_loss_batch

LR, WEIGHT_DECAY = 4e-4, 0.1
COMPARED_LOSSES = 5  # how many first losses the agreement check looks at


@dataclass
class Result:
    name: str
    seconds_per_step: float | None  # None: the provider failed
    losses: list[float]
    note: str = ""
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds per step
    peak_mib: float | None = None  # peak resident memory over the timed steps
    steps: list[dict[str, float]] = field(default_factory=list)  # each timed step's phase -> seconds


def make_batches(n: int, batch_size: int, context_length: int, vocab_size: int,
                 data_dir: str | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` shuffled (inputs, targets) batches of the-verdict.txt, (B, T) int64 each;
    seeded random tokens if the file is not at hand."""
    try:
        text = data_file("the-verdict.txt", data_dir, download=False).read_text(encoding="utf-8")
        ids = gpt2_tokenizer(data_dir).encode(text)
    except DataFileNotFoundError:
        print("the-verdict.txt or the GPT-2 BPE files not found: using random tokens")
        ids = np.random.default_rng(0).integers(0, vocab_size, 20_000)
    loader = DataLoader(SlidingWindowDataset(ids, context_length, context_length), batch_size, seed=0)
    if len(loader) == 0:
        raise SystemExit(f"the text is too short for batches of {batch_size} x {context_length} tokens")
    batches: list[tuple[np.ndarray, np.ndarray]] = []
    while len(batches) < n:
        batches.extend(loader)  # each pass is the next epoch, in a new order
    return batches[:n]


PHASES = ("forward", "backward", "optimizer")


def reset_peak_memory() -> None:
    """Start the peak-resident-memory count afresh (Linux: /proc/self/clear_refs), so setup
    done before the timed steps (building the weights to copy) does not count."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_mib() -> float:
    """Peak resident memory since reset_peak_memory (the process's, where that is not possible)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


Phases = tuple[Callable[[], float], Callable[[], None], Callable[[], None]]


@dataclass
class Stepper:
    """A provider ready to train: `phases(x, y)` gives the callables of one step (forward
    returning the loss, backward, optimizer step); `sync` waits for the device."""
    name: str
    phases: Callable[[np.ndarray, np.ndarray], Phases]
    sync: Callable[[], None]

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, float], float]:
        """One timed step: (seconds per phase, loss)."""
        seconds: dict[str, float] = {}
        loss = float("nan")
        for name, fn in zip(PHASES, self.phases(x, y)):
            start = time.perf_counter()
            out = fn()
            self.sync()
            seconds[name] = time.perf_counter() - start
            if name == "forward":
                loss = out
        return seconds, loss


def prepare_ours(model: GPTModel) -> Stepper:
    """Our model on the active backend."""
    optimizer = engine.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    state: dict = {}

    def forward(x: np.ndarray, y: np.ndarray) -> float:
        optimizer.zero_grad()
        state["loss"] = calc_loss_batch(x, y, model)
        return float(state["loss"].item())

    def phases(x, y):
        return (lambda: forward(x, y)), (lambda: state.pop("loss").backward()), optimizer.step

    backend = engine.get_backend()
    sync = torch.cuda.synchronize if backend.name == "triton" and torch.cuda.is_available() else (lambda: None)
    return Stepper(f"ours ({backend.name} backend, fp32)", phases, sync)


def prepare_torch(name: str, config, initial, batches: list, device: str, bf16: bool = False,
                  compile_model: bool = False) -> Stepper:
    model = from_state_dict(config, initial, device=device)
    initial.clear()  # our copy of the weights: not part of torch's memory
    gc.collect()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    forward_model = torch.compile(model) if compile_model else model
    autocast = (lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    on_device = [(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)) for x, y in batches]
    lookup = {id(x): pair for (x, _), pair in zip(batches, on_device)}  # copied before the timing
    state: dict = {}

    def forward(x: np.ndarray) -> float:
        xt, yt = lookup[id(x)]
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = forward_model(xt)  # (B, T, V)
        state["loss"] = torch_F.cross_entropy(logits.flatten(0, 1).float(), yt.flatten())
        return float(state["loss"].item())

    def phases(x, y):
        return (lambda: forward(x)), (lambda: state.pop("loss").backward()), optimizer.step

    return Stepper(name, phases, torch.cuda.synchronize if device == "cuda" else (lambda: None))


def prepare_provider(args: argparse.Namespace, provider: str, batches: list) -> Stepper:
    """A provider's model and optimizer, built from the seeded weights of our GPT."""
    cuda = torch.cuda.is_available()
    engine.set_backend(args.backend or ("triton" if cuda else "numpy"))
    device = "cuda" if cuda else "cpu"
    config = make_config(args)
    engine.manual_seed(0)
    model = GPTModel(config)
    if provider == "ours":
        return prepare_ours(model)
    initial = model.state_dict()  # copies, taken before any step changes the weights
    del model
    if provider == "eager":
        return prepare_torch("torch eager (fp32)", config, initial, batches, device)
    if provider == "eager-our-malloc":
        return prepare_torch("torch eager (fp32, our malloc)", config, initial, batches, device)
    if provider == "eager-bf16":
        return prepare_torch("torch eager (bf16 autocast, SDPA)", config, initial, batches, device,
                             bf16=True)
    return prepare_torch(f"torch.compile ({'bf16 autocast' if cuda else 'fp32'})", config, initial, batches,
                         device, bf16=cuda, compile_model=True)


def serve_provider(args: argparse.Namespace, provider: str, batches: list, conn) -> None:
    """A provider's process: on "prepare", build it and run the warmup steps; then one timed
    step per step index received; on None, its peak memory. Each answer is ("ok", value) or
    ("failed", why): torch.compile may be unavailable (no compiler, unsupported GPU)."""
    try:
        conn.recv()
        stepper = prepare_provider(args, provider, batches)
        warmup = [stepper.step(x, y)[1] for x, y in batches[:args.warmup]]
        reset_peak_memory()
        conn.send(("ok", (stepper.name, warmup)))
        while (index := conn.recv()) is not None:
            conn.send(("ok", stepper.step(*batches[args.warmup + index])))
        conn.send(("ok", peak_memory_mib()))
    except Exception as err:
        traceback.print_exc()
        conn.send(("failed", f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"))
    finally:
        conn.close()


class Worker:
    """A provider's process, started in the environment its name asks for."""

    def __init__(self, args: argparse.Namespace, provider: str, batches: list):
        # torch's processes import our backend too (for the initial weights): keep its memory
        # settings out of them unless the provider is named for them
        opt_out = {"ours": None, "eager-our-malloc": "1"}.get(provider, "0")
        tuning = {} if opt_out is None else {numpy_memory.OPT_OUT: opt_out}
        spawn = get_context("spawn")
        self.conn, child = spawn.Pipe()
        self.process = spawn.Process(target=serve_provider, args=(args, provider, batches, child))
        with _environment(tuning):
            self.process.start()
        child.close()
        self.result = Result(provider, None, [])

    def ask(self, message) -> object | None:
        """Send a command; the answer, or None once the provider has failed (its row says why)."""
        if self.result.note:
            return None
        try:
            self.conn.send(message)
            status, value = self.conn.recv()
        except (EOFError, OSError):  # the process died (out of memory, a crash in native code)
            self.process.join()
            status, value = "failed", f"its process ended with code {self.process.exitcode}"
        if status == "failed":
            self.result.note = f"failed: {value}"
            return None
        return value

    def prepare(self) -> None:
        answer = self.ask("prepare")
        if answer is not None:
            self.result.name, self.result.losses = answer[0], list(answer[1])

    def step(self, index: int) -> None:
        answer = self.ask(index)
        if answer is not None:
            seconds, loss = answer
            self.result.steps.append(seconds)
            self.result.losses.append(loss)

    def finish(self) -> Result:
        peak = self.ask(None)
        self.process.join()
        r = self.result
        if not r.note:
            r.peak_mib = peak
            r.phases = {name: float(np.mean([s[name] for s in r.steps])) for name in PHASES}
            r.seconds_per_step = sum(r.phases.values())
        return r


def measure(args: argparse.Namespace, providers: list[str], batches: list, interleave: bool) -> list[Result]:
    """Each provider in a process of its own. Interleaved, all are prepared first, then take
    turns step by step (the first to go rotating each round), so a slow stretch of a shared
    machine falls on all of them alike; else one after another, one process at a time."""
    if not interleave:
        results = []
        for provider in providers:
            worker = Worker(args, provider, batches)
            worker.prepare()
            for index in range(args.steps):
                worker.step(index)
            results.append(worker.finish())
        return results
    workers = [Worker(args, provider, batches) for provider in providers]
    for worker in workers:
        worker.prepare()
    for index in range(args.steps):
        for k in range(len(workers)):
            workers[(index + k) % len(workers)].step(index)
    return [worker.finish() for worker in workers]


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """os.environ with `values` set (for the processes started meanwhile), restored after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_config(args: argparse.Namespace):
    overrides = {"drop_rate": args.drop_rate} | ({"context_length": args.context_length} if args.context_length else {})
    return get_config(args.preset, **overrides)


def step_ratios(ours: Result, other: Result) -> list[float]:
    """Step by step, the other provider's time over ours (ours/this as speed)."""
    return [sum(theirs.values()) / sum(mine.values()) for mine, theirs in zip(ours.steps, other.steps)]


def print_table(results: list[Result], tokens_per_step: int, dropout: bool) -> None:
    ours = results[0]
    header = (f"{'provider':<36} {'ms/step':>9} {'tokens/s':>9} {'ours/this':>9} {'per step':>11} {'fwd ms':>8} "
              f"{'bwd ms':>8} {'opt ms':>8} {'peak MiB':>9} {'max |dloss|':>11}")
    print(header)
    print("-" * len(header))
    for r in results:
        if r.seconds_per_step is None:
            print(f"{r.name:<36} {r.note}")
            continue
        k = min(COMPARED_LOSSES, len(r.losses), len(ours.losses))
        diff = "-" if r is ours or dropout else f"{np.max(np.abs(np.subtract(r.losses[:k], ours.losses[:k]))):.2e}"
        ratio = r.seconds_per_step / ours.seconds_per_step
        ratios = step_ratios(ours, r)
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios and r is not ours else "-"
        phases = " ".join(f"{1e3 * r.phases.get(name, float('nan')):8.1f}" for name in PHASES)
        print(f"{r.name:<36} {1e3 * r.seconds_per_step:9.1f} {tokens_per_step / r.seconds_per_step:9.0f} "
              f"{ratio:9.2f} {spread:>11} {phases} {r.peak_mib or float('nan'):9.0f} {diff:>11}")
    print(f"\nours/this: our tokens/s divided by the provider's (> 1: ours is faster); per step: the lowest and "
          f"highest of that ratio over the timed steps, step for step. fwd/bwd/opt: forward "
          f"with the loss, backward, optimizer step. peak MiB: the provider's process's peak resident memory "
          f"over the timed steps. max |dloss|: largest difference to our loss over the first {COMPARED_LOSSES} "
          f"steps (same weights and batches; '-' with dropout, whose masks differ).")
    print("first losses: " + "; ".join(f"{r.name.split(' (')[0]} {[round(v, 5) for v in r.losses[:3]]}"
                                       for r in results if r.losses))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mini", choices=sorted(PRESETS), help="model preset (default: mini)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per provider (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default: 4)")
    p.add_argument("--context-length", type=int, default=None,
                   help="tokens per sequence (default: the preset's context length)")
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropout rate of both models (default: 0.0)")
    p.add_argument("--backend", choices=("numpy", "triton"), default=None,
                   help="our backend (default: triton with a CUDA GPU, else numpy)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile (default: on a GPU only)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                   help="the providers take turns step by step, all their processes alive at once (their "
                        "memory together); --no-interleave runs one process after another (default: on)")
    p.add_argument("--quick", action="store_true", help="3 timed steps after 1 warmup step (a smoke run)")
    add_data_dir_argument(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise SystemExit("--steps and --batch-size must be >= 1, --warmup >= 0")
    if not 0.0 <= args.drop_rate < 1.0:
        raise SystemExit(f"--drop-rate must be in [0, 1), got {args.drop_rate}")
    cuda = torch.cuda.is_available()
    config = make_config(args)
    tokens = args.batch_size * config.context_length
    where = torch.cuda.get_device_name() if cuda else f"CPU, torch {torch.get_num_threads()} threads"
    print(f"training bench: {args.preset} ({count_parameters(config):,} parameters), batch "
          f"{args.batch_size} x {config.context_length} = {tokens} tokens/step, AdamW, dropout {args.drop_rate}; "
          f"{args.warmup} warmup + {args.steps} timed steps, each provider in its own process"
          f"{', taking turns step by step' if args.interleave else ', one after another'}; {where}\n")
    providers = ["ours", "eager"] + (["eager-bf16"] if cuda else ["eager-our-malloc"])
    if args.compile if args.compile is not None else cuda:
        providers.append("compile")
    batches = make_batches(args.warmup + args.steps, args.batch_size, config.context_length, config.vocab_size,
                           args.data_dir)
    results = measure(args, providers, batches, args.interleave)
    if results[0].seconds_per_step is None:
        raise SystemExit(f"{results[0].name} {results[0].note}")
    print_table(results, tokens, args.drop_rate > 0)


if __name__ == "__main__":
    main()
