"""Data-parallel training on torch.distributed: one process per device, gradients averaged.

Launched by torchrun (``python -m torch.distributed.run --nproc_per_node=N -m model.train ...``),
every process (rank) holds a full copy of the model and the optimizer. The loaders are built
with the GLOBAL batch size, ``--batch-size`` (the per-rank batch b) times the world size N, so
every rank walks the same global batches in the same order; `Distributed.shard` gives rank r
rows ``[r*b, (r+1)*b)`` of each one. Each shard's token-mean loss is weighted by its share of
the global batch's counted targets (`Distributed.sharded_loss`: padding and masked prompts leave
the shards unequal counts), so after `Distributed.all_reduce_gradients` (a plain average) every
rank takes the optimizer step a single process would take with batch N*b: a run on N ranks
of b equals a one-process run of N*b, up to floating-point summation order.

torch is only the transport here: numpy arrays go through gloo zero-copy (``torch.from_numpy``),
the triton backend's tensors go through NCCL (CUDA) or gloo (Triton's CPU interpreter) as they
are. Every collective runs under a bounded timeout (``--ddp-timeout``), and a failed one raises
`DistributedError` naming the operation and the rank, so a dead or stuck rank makes the others
exit with a clear message instead of hanging.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

import engine

DEFAULT_TIMEOUT = 90.0  # seconds a collective may wait for the other ranks
BUCKET_BYTES = 25 * 2**20  # gradients are all-reduced in flat buffers of about this size
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
IGNORE_INDEX = -100  # F.cross_entropy's default: a target that counts in no token mean


def counted_targets(targets: Any) -> int:
    """How many of ``targets`` count in a token-mean loss (those not IGNORE_INDEX)."""
    return int((targets != IGNORE_INDEX).sum())


class DistributedError(RuntimeError):
    """A collective failed or timed out (another rank died or hangs), or the ranks disagree."""


def torchrun_env(environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The torchrun launch variables (rank, world_size, local_rank, master_addr, master_port),
    or None when this process was not started by torchrun (no WORLD_SIZE)."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return None
    missing = [name for name in _ENV if name not in environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun "
                               "(python -m torch.distributed.run), which sets all of " + ", ".join(_ENV))
    env = {name.lower(): environ[name] for name in _ENV}
    for name in ("rank", "world_size", "local_rank", "master_port"):
        env[name] = int(env[name])
    return env


class Distributed:
    """This process's place in a data-parallel job, and the collectives the trainer needs.

    Use as a context manager (or call `close`) so the process group is destroyed on every exit.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, env: dict[str, Any] | None = None):
        try:
            import torch
            import torch.distributed as dist
        except ImportError:
            raise DistributedError('launched by torchrun, but torch is not installed: pip install -e ".[ddp]"') \
                from None
        env = env if env is not None else torchrun_env()
        if env is None:
            raise DistributedError("not launched by torchrun: RANK, WORLD_SIZE, MASTER_ADDR, ... are not set")
        self.rank, self.world_size, self.local_rank = env["rank"], env["world_size"], env["local_rank"]
        self.timeout = float(timeout)
        self._torch, self._dist = torch, dist
        on_cuda = engine.get_backend().name == "triton" and torch.cuda.is_available()
        self.pg_backend = "nccl" if on_cuda else "gloo"
        # NOTE: the triton backend allocates on torch.device("cuda"), the *current* device, so
        # choosing it here pins each rank's model and batches to its own GPU.
        self._device = torch.device("cuda", self.local_rank) if on_cuda else torch.device("cpu")
        if on_cuda:
            torch.cuda.set_device(self._device)
        self._call("init_process_group", lambda: dist.init_process_group(
            self.pg_backend, init_method=f"tcp://{env['master_addr']}:{env['master_port']}", rank=self.rank,
            world_size=self.world_size, timeout=datetime.timedelta(seconds=self.timeout)))

    @classmethod
    def from_env(cls, timeout: float = DEFAULT_TIMEOUT) -> Distributed | None:
        """A `Distributed` when launched by torchrun, else None (a plain single-process run)."""
        env = torchrun_env()
        return None if env is None else cls(timeout, env)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, plots, samples and writes checkpoints."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Distributed(rank {self.rank} of {self.world_size}, {self.pg_backend})"

    # --- plumbing ---
    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one collective ``fn(*args, **kwargs)``; turn a failure (peer gone, timeout) into a
        DistributedError."""
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:  # torch.distributed.DistBackendError is a RuntimeError
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed ({str(err).splitlines()[0]}). Another rank "
                f"probably died or is stuck; giving up (timeout {self.timeout:g} s, --ddp-timeout)") from err

    def _as_torch(self, array: Any) -> Any:
        """A torch view of a backend array (zero-copy for numpy); must stay in place for in-place ops."""
        return self._torch.from_numpy(array) if isinstance(array, np.ndarray) else array

    def _buckets(self, arrays: list[Any]) -> Iterator[list[int]]:
        """Indices of `arrays` grouped into runs of one dtype of at most ~BUCKET_BYTES each."""
        bucket: list[int] = []
        size = 0
        for i, a in enumerate(arrays):
            nbytes = a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size()
            if bucket and (size + nbytes > BUCKET_BYTES or a.dtype != arrays[bucket[0]].dtype):
                yield bucket
                bucket, size = [], 0
            bucket.append(i)
            size += nbytes
        if bucket:
            yield bucket

    def _flat(self, arrays: list[Any]) -> Any:
        """One contiguous torch buffer holding `arrays` back to back (numpy: a copy it can share)."""
        if isinstance(arrays[0], np.ndarray):
            return self._torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]))
        return self._torch.cat([a.reshape(-1) for a in arrays])

    # --- what the trainer uses ---
    def shard(self, batch: Any) -> Any:
        """This rank's equal slice of a global batch (an array, or a tuple/list of arrays with
        the batch along axis 0): rows ``[rank*b, (rank+1)*b)`` with ``b = rows / world_size``."""
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.shard(part) for part in batch)
        rows = batch.shape[0]
        if rows % self.world_size:
            raise DistributedError(f"a global batch of {rows} rows does not split evenly over {self.world_size} "
                                   "ranks: build the loader with batch size = per-rank batch x world size")
        b = rows // self.world_size
        return batch[self.rank * b:(self.rank + 1) * b]

    def sharded_loss(self, loss_fn: Callable[[Any, Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
        """The training step's token-mean `loss_fn` on this rank's shard of a global batch, times
        (the shard's counted targets / the batch's) x world_size: the average over the ranks, of
        the gradients (`all_reduce_gradients`) and of the value (`average`), is then the token
        mean over the global batch, as one process computes it, even when padding or a masked
        prompt leaves the shards unequal counts. The factor is exactly 1 when they are equal."""
        def loss(inputs: Any, targets: Any, model: Any) -> engine.Tensor:
            shard_targets = self.shard(targets)
            weight = counted_targets(shard_targets) * self.world_size / max(counted_targets(targets), 1)
            shard_loss = loss_fn(self.shard(inputs), shard_targets, model)
            return shard_loss if weight == 1 else shard_loss * weight
        return loss

    def sharded_mean(self, loss_fn: Callable[[Any, Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
        """`loss_fn` evaluated data-parallel: each rank takes a share of the rows (any number,
        even zero) and the mean over all ranks, weighted by counted targets, comes back as a
        scalar tensor, the same on every rank: the token mean of the whole batch. For evaluation
        (no graph)."""
        def loss(inputs: Any, targets: Any, model: Any) -> engine.Tensor:
            rows = inputs.shape[0]
            lo, hi = self.rank * rows // self.world_size, (self.rank + 1) * rows // self.world_size
            counted = counted_targets(targets[lo:hi])
            local = float(loss_fn(inputs[lo:hi], targets[lo:hi], model).item()) * counted if counted else 0.0
            total = self._torch.tensor([local, float(counted)], dtype=self._torch.float64, device=self._device)
            self._call("all_reduce (evaluation loss)", self._dist.all_reduce, total)
            # NOTE: a batch with no counted target (a prompt masked to the end) is 0, as F.cross_entropy
            # gives one process, not 0 / 0.
            return engine.tensor(float(total[0] / total[1]) if total[1] else 0.0, dtype="float64")
        return loss

    def all_reduce_gradients(self, params: Iterable[Any]) -> None:
        """Average every parameter's `.grad` over the ranks, in flat buckets of ~25 MB (one
        all_reduce each). Parameters without a gradient are skipped: the same on every rank,
        since every rank runs the same model and loss."""
        params = [p for p in params if p.grad is not None]
        grads = [p.grad for p in params]
        for bucket in self._buckets(grads):
            flat = self._flat([grads[i] for i in bucket])
            self._call("all_reduce (gradients)", self._dist.all_reduce, flat)
            flat /= self.world_size
            if isinstance(grads[bucket[0]], np.ndarray):
                flat = flat.numpy()
            offset = 0
            for i in bucket:
                n = grads[i].size if isinstance(grads[i], np.ndarray) else grads[i].numel()
                # NOTE: views into this step's bucket, not writes into the old arrays, which
                # the autograd may share with other tensors.
                params[i].grad = flat[offset:offset + n].reshape(grads[i].shape)
                offset += n

    def broadcast_parameters(self, model: Any) -> None:
        """Copy rank 0's weights (all of them, frozen ones too) into every rank, in place."""
        datas = [p.data for p in model.parameters()]
        for bucket in self._buckets(datas):
            flat = self._flat([datas[i] for i in bucket])
            self._call("broadcast (parameters)", self._dist.broadcast, flat, src=0)
            offset = 0
            for i in bucket:
                target = self._as_torch(datas[i])
                n = target.numel()
                target.copy_(flat[offset:offset + n].view(target.shape))
                offset += n

    def check_same_config(self, config: dict[str, Any]) -> None:
        """Raise DistributedError on every rank unless all ranks pass the same `config`
        (compared as canonical JSON; the message names the keys that differ)."""
        text = json.dumps(config, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()
        gathered: list[Any] = [None] * self.world_size
        self._call("all_gather (configuration check)", self._dist.all_gather_object, gathered, (digest, text))
        for rank, (other_digest, other_text) in enumerate(gathered):
            if other_digest != gathered[0][0]:
                ours, theirs = json.loads(gathered[0][1]), json.loads(other_text)
                keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k, "<unset>") != theirs.get(k, "<unset>"))
                diffs = "; ".join(f"{k}: rank 0 has {ours.get(k, '<unset>')!r}, rank {rank} has "
                                  f"{theirs.get(k, '<unset>')!r}" for k in keys)
                raise DistributedError(f"the ranks were started with different configurations ({diffs}): "
                                       "launch every rank with the same flags")

    def average(self, value: float) -> float:
        """The mean of `value` over the ranks (for losses), the same on every rank."""
        t = self._torch.tensor([float(value)], dtype=self._torch.float64, device=self._device)
        self._call("all_reduce (average)", self._dist.all_reduce, t)
        return float(t[0]) / self.world_size

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. around rank 0's checkpoint writes)."""
        self._call("barrier", self._dist.barrier)

    def close(self) -> None:
        """Destroy the process group (idempotent)."""
        if self._dist.is_initialized():
            self._dist.destroy_process_group()

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def add_ddp_argument(parser: Any) -> None:
    """``--ddp-timeout``, for every command that trains data-parallel under torchrun."""
    parser.add_argument("--ddp-timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="under torchrun (data-parallel, --batch-size per process): seconds a collective waits "
                             "for the other processes before the run stops with an error")


def run_maybe_distributed(command: Callable[[Distributed | None], int], timeout: float = DEFAULT_TIMEOUT) -> int:
    """Run ``command(distributed)``: data-parallel when torchrun launched this process (else with
    None). A failed collective becomes ``error: ...`` and exit code 1; the process group is
    destroyed on every exit."""
    distributed = None
    try:
        distributed = Distributed.from_env(timeout)
        return command(distributed)
    except DistributedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if distributed is not None:
            distributed.close()
