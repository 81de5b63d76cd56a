"""Pretraining on prepared corpora: model.prepare_data writes the token files, model.train
--data reads them through a memory map, and both stay flat in memory as the corpus grows
10x; --grad-accum gives the update of one larger batch; resume with --data is exact.

Data comes from the data dir (the GPT-2 tokenizer files): export SCRATCHGPT_DATA_DIR=<the shared data folder>.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import optim
from model import prepare_data, train
from model.config import get_config
from model.data.corpus import prepare_corpus
from model.data.token_files import token_file_loaders
from model.data.windows import DataLoader, SlidingWindowDataset
from model.gpt import GPTModel
from model.tokenizers.gpt2 import encode_text, gpt2_tokenizer
from model.training import loop as L
from model.training.metrics import MetricsLog, read_metrics, tensorboard_available, tensorboard_writer
from model.weights.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
WORDS = np.array("the king and queen of a far land rode to war with their men at dawn".split())
TINY_RUN = ["--preset", "tiny", "--context-length", "16", "--batch-size", "4", "--eval-interval", "2",
            "--eval-iters", "1", "--backend", "numpy", "--no-progress", "--no-sample", "--drop-rate", "0"]


@pytest.fixture(autouse=True)
def restore_backend():
    previous = engine.get_backend().name
    yield
    engine.set_backend(previous)


def write_corpus(root: Path, documents: int, words_per_document: int, seed: int = 0) -> Path:
    """`documents` text files of random words, some in a subdirectory (found recursively)."""
    rng = np.random.default_rng(seed)
    for i in range(documents):
        path = root / (f"part{i % 3}" if i % 2 else "") / f"doc{i:04d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(" ".join(rng.choice(WORDS, words_per_document)) + "\n", encoding="utf-8")
    return root


def documents(path: Path) -> set[tuple[int, ...]]:
    """The documents of a token file: its pieces that end with <|endoftext|>."""
    ids = np.fromfile(path, dtype=np.uint16)
    return {tuple(d.tolist()) for d in np.split(ids, np.where(ids == 50256)[0] + 1) if len(d)}


def test_prepare_writes_every_document_once_with_an_end_of_text_between(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=12, words_per_document=40)
    (corpus / "notes.md").write_text("not a .txt file", encoding="utf-8")
    assert prepare_data.main([str(corpus), "--out", str(tmp_path / "out"), "--val-fraction", "0.25",
                              "--workers", "2", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    train_ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    val_ids = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert (meta["tokenizer"], meta["documents"], meta["train_tokens"], meta["val_tokens"]) == (
        "gpt2", 12, len(train_ids), len(val_ids))
    assert 1 <= meta["val_documents"] <= 11
    tokenizer = gpt2_tokenizer()
    expected = sorted(tuple(encode_text(tokenizer, p.read_text()) + [50256]) for p in corpus.rglob("*.txt"))
    got = sorted(documents(tmp_path / "out" / "train.bin") | documents(tmp_path / "out" / "val.bin"))
    assert got == expected  # every document once, each followed by <|endoftext|>

    # the same input again: nothing is rewritten; a changed document: prepared again
    before = (tmp_path / "out" / "train.bin").stat().st_mtime_ns, (tmp_path / "out" / "val.bin").stat().st_mtime_ns
    assert prepare_data.main([str(corpus), "--out", str(tmp_path / "out"), "--val-fraction", "0.25",
                              "--no-progress"]) == 0
    assert ((tmp_path / "out" / "train.bin").stat().st_mtime_ns, (tmp_path / "out" / "val.bin").stat().st_mtime_ns) \
        == before
    (corpus / "doc0000.txt").write_text("the king", encoding="utf-8")
    meta2 = prepare_corpus(corpus, tmp_path / "out", val_fraction=0.25, workers=1, progress=False, log=lambda m: None)
    assert meta2["fingerprint"] != meta["fingerprint"]
    assert meta2["train_tokens"] + meta2["val_tokens"] < meta["train_tokens"] + meta["val_tokens"]


def test_split_is_by_document_and_stable_when_documents_are_added(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=30, words_per_document=5)
    first = prepare_corpus(corpus, tmp_path / "a", val_fraction=0.2, workers=1, progress=False, log=lambda m: None)
    write_corpus(tmp_path / "more", documents=60, words_per_document=5, seed=1)
    for i, path in enumerate(sorted((tmp_path / "more").rglob("*.txt"))[30:]):
        path.rename(corpus / f"new{i}.txt")
    prepare_corpus(corpus, tmp_path / "b", val_fraction=0.2, workers=1, progress=False, log=lambda m: None)
    val_a, val_b = documents(tmp_path / "a" / "val.bin"), documents(tmp_path / "b" / "val.bin")
    assert val_a <= val_b and len(val_b) > len(val_a)  # the old validation documents stay there
    assert 0.05 < first["val_documents"] / 30 < 0.45


def test_single_document_is_split_by_tokens(tmp_path):
    text = tmp_path / "one.txt"
    text.write_text(" ".join(WORDS.tolist() * 20), encoding="utf-8")
    meta = prepare_corpus(text, tmp_path / "out", val_fraction=0.1, workers=1, progress=False, log=lambda m: None)
    total = len(encode_text(gpt2_tokenizer(), text.read_text())) + 1
    assert meta["train_tokens"] + meta["val_tokens"] == total
    assert meta["val_tokens"] == round(0.1 * total)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert prepare_data.main([str(tmp_path / "missing*.txt"), "--out", str(tmp_path / "out")]) == 2
    assert "neither a file, a directory nor a matching glob" in capsys.readouterr().err
    assert train.main([*TINY_RUN, "--data", str(tmp_path), "--max-steps", "1", "--out-dir", str(tmp_path / "r")]) == 2
    assert "prepare the directory first with python -m model.prepare_data" in capsys.readouterr().err
    for args, message in ((["--init-from", "gpt2", "--preset", "tiny"], "leave out --preset"),
                          (["--init-from", str(tmp_path / "nothing")], "not one of gpt2, gpt2-medium"),
                          (["--sequential"], "--sequential applies to --data DIR only")):
        with pytest.raises(SystemExit) as exit_info:
            train.main(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(tensorboard_available(), reason="tensorboard is installed")
def test_tensorboard_without_the_package_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--tensorboard", "--max-steps", "1"])
    assert exit_info.value.code == 2 and "--tensorboard needs the tensorboard and torch packages" in \
        capsys.readouterr().err


def test_metrics_reach_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    state = L.TrainState(step=1, tokens_seen=64, history=L.new_history())
    state.history.update(step=[1], val_loss=[5.0], lr=[1e-3], grad_norm=[0.5])
    log = MetricsLog(tmp_path / "metrics.csv", L.TrainState(), tensorboard=tensorboard_writer(tmp_path / "tb"))
    log(state, 4.0)
    log.close()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.value for e in events.Scalars("val_loss")] == [5.0]
    assert read_metrics(tmp_path / "metrics.csv")[0]["train_loss"] == "4"


def test_random_windows_are_drawn_per_window_and_sequential_ones_follow_each_other(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "dtype": "uint16"}))
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "val.bin")
    small, _ = token_file_loaders(tmp_path, 8, 2, seed=5)
    large, val = token_file_loaders(tmp_path, 8, 5, seed=5)
    assert len(small) == 999 // 8 // 2 and len(val) == 3  # 12 validation windows: the last batch holds 2
    x_small = np.concatenate([x for x, _ in list(small)[:3]])  # (6, 8)
    assert len({tuple(x) for x in x_small}) == 6
    x_large, y_large = next(iter(large))
    np.testing.assert_array_equal(x_small[:5], x_large)  # batches of 2 hold the windows of one batch of 5
    np.testing.assert_array_equal(y_large, x_large + 1)
    sequential, _ = token_file_loaders(tmp_path, 8, 2, sequential=True)
    np.testing.assert_array_equal(next(iter(sequential))[0], [np.arange(8), np.arange(8, 16)])
    np.testing.assert_array_equal(list(val)[-1][0], [np.arange(80, 88), np.arange(88, 96)])


def tiny_run(loader: DataLoader, grad_accum: int, steps: int = 3) -> tuple[list[float], dict[str, np.ndarray]]:
    engine.set_backend("numpy")
    engine.manual_seed(0)
    model = GPTModel(get_config("tiny", context_length=8, drop_rate=0.0, vocab_size=1000))
    optimizer = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    config = L.TrainConfig(epochs=1, max_steps=steps, grad_accum=grad_accum, grad_clip=1.0, eval_iters=1,
                           sample_prompt=None)
    history = L.train(model, optimizer, loader, loader, config, progress=False, log=lambda m: None)
    return history["step_loss"], model.state_dict()


def test_grad_accum_is_the_update_of_one_larger_batch():
    ids = np.random.default_rng(0).integers(0, 1000, 400)
    dataset = SlidingWindowDataset(ids, 8, 8)
    big_losses, big = tiny_run(DataLoader(dataset, 12, seed=3), grad_accum=1)
    acc_losses, acc = tiny_run(DataLoader(dataset, 3, seed=3), grad_accum=4)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
    for name in big:  # NOTE: an AdamW step moves a weight by about lr = 1e-2; float32 sums differ by ~1e-6
        np.testing.assert_allclose(acc[name], big[name], rtol=1e-4, atol=2e-5, err_msg=name)
    # and not the update of one small batch: the comparison can fail
    small_losses, _ = tiny_run(DataLoader(dataset, 3, seed=3), grad_accum=1)
    assert abs(small_losses[-1] - big_losses[-1]) > 1e-3


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens")
    corpus = write_corpus(out / "corpus", documents=8, words_per_document=300)
    prepare_corpus(corpus, out / "data", val_fraction=0.25, workers=1, progress=False, log=lambda m: None)
    return out / "data"


def test_resume_with_data_is_exact_and_keeps_the_metrics(token_dir, tmp_path):
    run = [*TINY_RUN, "--data", str(token_dir), "--grad-accum", "2"]
    assert train.main([*run, "--max-steps", "4", "--out-dir", str(tmp_path / "full")]) == 0
    assert train.main([*run, "--max-steps", "2", "--out-dir", str(tmp_path / "part")]) == 0
    with open(tmp_path / "part" / "metrics.csv", "a") as f:
        f.write("3,999,1.0,,0.0004,1.0,1.0,99999\n")  # a step after the checkpoint, redone on resume
    assert train.main(["--resume", str(tmp_path / "part" / "checkpoint"), "--max-steps", "4"]) == 0
    full = json.loads((tmp_path / "full" / "history.json").read_text())
    resumed = json.loads((tmp_path / "part" / "history.json").read_text())
    assert len(full["step_loss"]) == 4 and full["step"] == [1, 3, 4]  # every 2 steps, and the last
    assert resumed["step_loss"] == full["step_loss"] and resumed["val_loss"] == full["val_loss"]

    rows = read_metrics(tmp_path / "part" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["tokens_seen"]) for r in rows] == [128, 256, 384, 512]  # 2 x 4 x 16 tokens per step
    np.testing.assert_allclose([float(r["train_loss"]) for r in rows], full["step_loss"], rtol=1e-5)
    # NOTE: the part run also evaluated its last step (2); that row stays a record of what happened
    logged_val = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]}
    np.testing.assert_allclose([logged_val[step] for step in full["step"]], full["val_loss"], rtol=1e-5)
    np.testing.assert_allclose([float(r["grad_norm"]) for r in rows], resumed["grad_norm"], rtol=1e-5)
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[-1] < 99999 and all(float(r["tokens_per_s"]) > 0 for r in rows)
    assert (tmp_path / "part" / "loss.png").stat().st_size > 10_000

    # continued pretraining from the run: its weights and config, a fresh optimizer and step count
    fresh = ["--batch-size", "4", "--eval-iters", "1", "--drop-rate", "0", "--backend", "numpy", "--no-progress",
             "--no-sample", "--data", str(token_dir), "--max-steps", "1", "--lr", "1e-12",
             "--out-dir", str(tmp_path / "cont")]
    assert train.main([*fresh, "--init-from", str(tmp_path / "full")]) == 0
    source = load_checkpoint(tmp_path / "full" / "checkpoint")
    continued = load_checkpoint(tmp_path / "cont" / "checkpoint")
    assert continued.config == source.config and continued.extra["train_state"]["step"] == 1
    for name, weights in source.state_dict.items():  # lr 1e-12: one step leaves the weights as loaded
        np.testing.assert_allclose(continued.state_dict[name], weights, atol=1e-7, err_msg=name)


# NOTE: VmHWM, not RUSAGE_SELF: ru_maxrss survives exec, so it would start at the RSS of the
# forking pytest process. The children's ru_maxrss can hold at most this process's RSS at fork.
MEASURE = """
import resource, sys
from model import {module} as command
code = command.main(sys.argv[1:])
own = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def peak_rss_mib(module: str, *args: str) -> float:
    """Peak resident memory (MiB) of `python -m model.<module> args` and the processes it waited for (Linux)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", MEASURE.format(module=module), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def test_memory_stays_flat_when_the_corpus_grows_tenfold(tmp_path):
    peaks = {}
    for documents in (12, 120):
        # 120 documents of ~130 KB: 15 MB of text, 3.6M tokens; holding them (as text, ids or
        # an int64 copy) would add well over the bound
        corpus = write_corpus(tmp_path / f"corpus{documents}", documents=documents, words_per_document=30_000)
        out = tmp_path / f"data{documents}"
        prepare = peak_rss_mib("prepare_data", str(corpus), "--out", str(out), "--workers", "2", "--no-progress")
        # the training run reads a token file 10x larger again (5M / 50M tokens: 10 / 100 MB)
        rng = np.random.default_rng(0)
        with open(out / "train.bin", "wb") as f:
            for _ in range(documents // 12):
                rng.integers(0, 50257, 5_000_000, dtype=np.uint16).tofile(f)
        fit = peak_rss_mib("train", *TINY_RUN, "--data", str(out), "--max-steps", "2", "--out-dir",
                           str(tmp_path / f"run{documents}"))
        peaks[documents] = prepare, fit
    print("peak RSS (MiB) of prepare_data, train --data:", peaks)
    (small_prepare, small_fit), (big_prepare, big_fit) = peaks[12], peaks[120]
    # MiB; measured: +0.0 and +3 (a 2-core CPU). Holding the big corpus's uint16 ids alone would
    # add 6 MiB to prepare_data; reading its token file into memory would add 90 MiB to train.
    assert big_prepare - small_prepare < 5, peaks
    assert big_fit - small_fit < 15, peaks
