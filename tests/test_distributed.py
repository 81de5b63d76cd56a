"""Data-parallel training (model/distributed.py) on CPU: gloo, 2 processes on 127.0.0.1.

Every run is `tests/helpers/ddp_run.py` (a tiny float64 GPT trained through model.training.loop.train),
launched as subprocesses with a bounded wall-clock: by torchrun for the equality check, as
two plain processes with the torchrun variables set for the failure checks (so the error
comes from our collectives, not from torchrun killing the survivors). Also a few in-process
checks of the helpers that need no process group.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from model.training.distributed import Distributed, DistributedError, torchrun_env

REPO = Path(__file__).resolve().parents[1]
HELPER = [sys.executable, "-m", "tests.helpers.ddp_run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out_dir: Path, rank_args: list[list[str]], timeout: float = 60,
              wait_for: int | None = None) -> list[subprocess.CompletedProcess]:
    """One plain process per entry of `rank_args`, with the variables torchrun would set; the
    results of all of them, or of the first `wait_for` (the rest are killed)."""
    port = free_port()
    procs = []
    for rank, extra in enumerate(rank_args):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(rank_args)),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([*HELPER, str(out_dir), *extra], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for proc in procs[:wait_for]:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def load(out_dir: Path) -> tuple[dict, dict]:
    history = json.loads((out_dir / "history.json").read_text())
    with np.load(out_dir / "weights.npz") as npz:
        return history, {k: npz[k] for k in npz.files}


def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    subprocess.run([*HELPER, str(single), "--global-batch", "4"], cwd=REPO, check=True, timeout=60)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}", "-m", "tests.helpers.ddp_run", str(ddp), "--global-batch", "4"]
    subprocess.run(launch, cwd=REPO, check=True, timeout=90, capture_output=True)
    (h1, w1), (h2, w2) = load(single), load(ddp)
    assert len(h1["step_loss"]) == 5 and len(h1["val_loss"]) == 3
    # the validation loader's last batch holds 2 rows: the row-weighted mean keeps it exact
    for key in ("step_loss", "train_loss", "val_loss", "tokens_seen"):
        np.testing.assert_allclose(h2[key], h1[key], rtol=0, atol=1e-6, err_msg=key)
    assert h1["step_loss"][-1] != h1["step_loss"][0]  # the weights moved
    assert w1.keys() == w2.keys()
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], rtol=0, atol=1e-6, err_msg=name)


def test_grad_accum_under_torchrun_equals_one_process_with_the_whole_batch(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    subprocess.run([*HELPER, str(single), "--global-batch", "8", "--steps", "3"], cwd=REPO, check=True, timeout=60)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}", "-m", "tests.helpers.ddp_run", str(ddp), "--global-batch", "4",
              "--grad-accum", "2", "--steps", "3"]
    subprocess.run(launch, cwd=REPO, check=True, timeout=90, capture_output=True)
    (h1, w1), (h2, w2) = load(single), load(ddp)
    assert h2["all_reduces"] == 3  # once per optimizer step, not per micro-batch
    for key in ("step_loss", "tokens_seen"):
        np.testing.assert_allclose(h2[key], h1[key], rtol=0, atol=1e-6, err_msg=key)
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], rtol=0, atol=1e-6, err_msg=name)


def test_a_killed_rank_ends_the_job_with_a_clear_error(tmp_path):
    start = time.perf_counter()
    results = run_ranks(tmp_path, [["--die-after-step", "1"]] * 2, timeout=60)
    assert time.perf_counter() - start < 45
    assert [r.returncode for r in results] == [1, 1]
    assert "rank 0 of 2: all_reduce" in results[0].stderr and "Another rank probably died" in results[0].stderr
    assert not (tmp_path / "history.json").exists()
    saved = json.loads((tmp_path / "saved-state.json").read_text())  # rank 0 saved the last completed step
    assert saved["step"] == 1 and len(saved["step_loss"]) == 1


def test_a_stuck_rank_times_out_instead_of_hanging(tmp_path):
    start = time.perf_counter()
    results = run_ranks(tmp_path, [["--timeout", "4"], ["--timeout", "4", "--hang-after-step", "2"]], timeout=60,
                        wait_for=1)
    assert results[0].returncode == 1, results[0].stderr
    assert "rank 0 of 2" in results[0].stderr and "timeout 4 s" in results[0].stderr
    assert json.loads((tmp_path / "saved-state.json").read_text())["step"] == 2
    assert time.perf_counter() - start < 45


def test_mismatched_configurations_are_refused(tmp_path):
    results = run_ranks(tmp_path, [["--lr", "0.01"], ["--lr", "0.02"]], timeout=60)
    assert [r.returncode for r in results] == [1, 1]
    for r in results:
        assert "different configurations (lr: rank 0 has 0.01, rank 1 has 0.02)" in r.stderr, r.stderr


def test_torchrun_env():
    assert torchrun_env({}) is None
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}
    assert torchrun_env(env) == {"rank": 1, "world_size": 2, "local_rank": 1, "master_addr": "127.0.0.1",
                                 "master_port": 1234}
    with pytest.raises(DistributedError, match="MASTER_PORT"):
        torchrun_env({k: v for k, v in env.items() if k != "MASTER_PORT"})


def test_shard_takes_this_ranks_equal_rows():
    d = Distributed.__new__(Distributed)  # no process group: shard is pure
    d.rank, d.world_size = 1, 2
    x, y = np.arange(12).reshape(4, 3), np.arange(4)
    xs, ys = d.shard((x, y))
    np.testing.assert_array_equal(xs, x[2:])
    np.testing.assert_array_equal(ys, y[2:])
    with pytest.raises(DistributedError, match="does not split evenly"):
        d.shard(np.zeros((3, 2)))


def _torchrun(module: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}", "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launch, cwd=REPO, env=env, timeout=timeout, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_classify_under_torchrun_equals_one_process_with_the_global_batch(tmp_path):
    common = ["--preset", "tiny", "--train-all", "--lr", "1e-3", "--max-steps", "3", "--eval-iters", "1",
              "--no-progress", "--backend", "numpy"]
    single = subprocess.run([sys.executable, "-m", "model.classify", *common, "--batch-size", "4",
                             "--out-dir", str(tmp_path / "single")], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _torchrun("model.classify", [*common, "--batch-size", "2", "--out-dir", str(tmp_path / "ddp")])
    assert ddp.stdout.count("test accuracy") == 1  # rank 0 alone reports
    h1 = json.loads((tmp_path / "single" / "history.json").read_text())
    h2 = json.loads((tmp_path / "ddp" / "history.json").read_text())
    np.testing.assert_allclose(h2["step_loss"], h1["step_loss"], rtol=0, atol=1e-5)  # float32 sums
    assert h2["final_accuracy"] == pytest.approx(h1["final_accuracy"], abs=1e-9)


def instruct_alone_and_under_torchrun(tmp_path: Path, common: list[str]) -> tuple[dict, dict]:
    """The histories of ``model.instruct`` with batch 4 in one process and batch 2 on each of two ranks."""
    single = subprocess.run([sys.executable, "-m", "model.instruct", *common, "--batch-size", "4",
                             "--out-dir", str(tmp_path / "single")], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    _torchrun("model.instruct", [*common, "--batch-size", "2", "--out-dir", str(tmp_path / "ddp")])
    h1 = json.loads((tmp_path / "single" / "history.json").read_text())
    h2 = json.loads((tmp_path / "ddp" / "history.json").read_text())
    for key in ("step_loss", "train_loss", "val_loss"):
        np.testing.assert_allclose(h2[key], h1[key], rtol=0, atol=1e-5, err_msg=key)  # float32 sums
    return h1, h2


def test_instruct_under_torchrun_equals_one_process_with_the_global_batch(tmp_path):
    """--mask-prompt and padding give the two shards of a global batch different numbers of target
    tokens, so only a loss weighted by each shard's token share matches one process's token mean."""
    common = ["--preset", "tiny", "--max-steps", "3", "--eval-interval", "2", "--eval-iters", "2", "--mask-prompt",
              "--max-length", "48", "--max-test-entries", "2", "--max-new-tokens", "3", "--no-progress", "--no-sample",
              "--backend", "numpy"]
    h1, _ = instruct_alone_and_under_torchrun(tmp_path, common)
    assert len(h1["step_loss"]) == 3 and len(h1["val_loss"]) == 2
    responses = json.loads((tmp_path / "ddp" / "instruction-data-with-response.json").read_text())
    assert len(responses) == 2 and all("model_response" in r for r in responses)  # rank 0 answered


def test_instruct_on_a_llama_folder_under_torchrun_equals_one_process(decoder_folders, tmp_path):
    """The same on a Llama 3 (tied head, grouped-query attention): its tokenizer, its eos padding.
    NOTE: the tiny tokenizer makes the two validation prompts longer than 128 tokens, so --mask-prompt
    leaves them no target: both runs must then report 0, not 0 / 0."""
    common = ["--hf-dir", str(decoder_folders["llama"]), "--data-file", str(decoder_folders["instructions"]),
              "--max-steps", "2", "--eval-interval", "2", "--eval-iters", "1", "--mask-prompt", "--max-length", "128",
              "--max-test-entries", "1", "--max-new-tokens", "2", "--no-progress", "--no-sample", "--backend", "numpy"]
    h1, _ = instruct_alone_and_under_torchrun(tmp_path, common)
    assert len(h1["step_loss"]) == 2 and h1["step_loss"][1] != h1["step_loss"][0]
