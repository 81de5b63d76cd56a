"""Faults at the library level, each in its own process: kill -9 during saves, a full disk,
a hostile config.json, NaN/inf weights. A checkpoint on disk must always load, and a load
that cannot succeed must fail at once with one clear error."""

import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy

import engine
from model.config import GPTConfig
from model.gpt import GPTModel
from model.weights.checkpoint import NonFiniteWeightsError, load_checkpoint, load_model_from_checkpoint, save_checkpoint
from model.weights.hf import export_hf, load_hf_gpt2

ROOT = Path(__file__).resolve().parents[1]

# Shared by the scripts: a small GPT whose weights are a function of a generation number,
# so a loaded checkpoint can be matched bit for bit against the save it came from.
PRELUDE = """
import json, os, resource, signal, sys, time
from pathlib import Path
import numpy as np
import engine
from model.weights.checkpoint import CheckpointError, load_checkpoint, load_model_from_checkpoint, save_checkpoint
from model.config import GPTConfig
from model.gpt import GPTModel

engine.set_backend("numpy")
config = GPTConfig(vocab_size=3000, context_length=32, emb_dim=64, n_heads=2, n_layers=2)
model = GPTModel(config)
shapes = {name: p.shape for name, p in model.state_dict().items()}


def generation(g):
    rng = np.random.default_rng(g)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def save(base, g):
    model.load_state_dict(generation(g))
    save_checkpoint(base, model, config, step=g, extra={"generation": g})


def matches(ckpt):
    want = generation(ckpt.step)
    return ckpt.extra == {"generation": ckpt.step} and all(
        np.array_equal(ckpt.state_dict[name], want[name]) for name in shapes)


out = Path(sys.argv[1])
base = out / "ck"
"""

KILL_DURING_SAVES = PRELUDE + """
import random
random.seed(0)
save(base, 0)
t0 = time.perf_counter()
save(base, 1)
save_seconds = time.perf_counter() - t0
results, start = [], 1
for attempt in range(int(sys.argv[2])):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child saves generation after generation until it is killed
        os.close(read_end)
        g = start
        while True:
            g += 1
            save(base, g)
            os.write(write_end, f"{g}\\n".encode())
    os.close(write_end)
    time.sleep(random.uniform(0.0, 3.0) * save_seconds)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as f:
        committed = [int(line) for line in f.read().split()]
    last = committed[-1] if committed else start
    temp_files = [name for name in os.listdir(out) if name != "ck.safetensors"]
    try:
        ckpt = load_checkpoint(base)
    except CheckpointError as err:
        results.append({"last_committed": last, "error": str(err)})
        break
    results.append({"last_committed": last, "temp_files": len(temp_files), "step": ckpt.step, "matches": matches(ckpt)})
    start = ckpt.step
save(base, 10**6)  # a save after all those kills: the temp files they left are removed
print(json.dumps({"results": results, "files_after": sorted(os.listdir(out)), "save_seconds": save_seconds}))
"""


def run_script(script: str, *args: str, timeout: float = 60) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kill_9_at_any_instant_leaves_a_loadable_checkpoint(tmp_path):
    report = run_script(KILL_DURING_SAVES, str(tmp_path), "20")
    for result in report["results"]:
        assert "error" not in result, result
        # the previous save, or the one under way when the kill came, bit for bit
        assert result["matches"] and result["step"] in (result["last_committed"], result["last_committed"] + 1), result
    mid_write = sum(r["temp_files"] > 0 for r in report["results"])
    assert mid_write >= 2, report  # the kills did land inside saves
    assert report["files_after"] == ["ck.safetensors"]


FULL_DISK = PRELUDE + """
save(base, 1)
size = (out / "ck.safetensors").stat().st_size
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a kill
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))
try:
    save(base, 2)
    error = None
except CheckpointError as err:
    error = {"type": type(err).__name__, "message": str(err)}
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
ckpt = load_checkpoint(base)
print(json.dumps({"error": error, "step": ckpt.step, "matches": matches(ckpt), "files": sorted(os.listdir(out))}))
"""


def test_full_disk_during_save_is_one_clear_error_and_keeps_the_old_checkpoint(tmp_path):
    report = run_script(FULL_DISK, str(tmp_path))
    error = report["error"]
    assert error is not None and error["type"] == "CheckpointSaveError"
    assert "\n" not in error["message"]
    assert f"could not save checkpoint {tmp_path / 'ck.safetensors'}: " in error["message"]
    assert "File too large" in error["message"]
    assert "previous checkpoint there (if any) is unchanged" in error["message"]
    assert report["step"] == 1 and report["matches"]
    assert report["files"] == ["ck.safetensors"]  # no temp file left behind


# NOTE: the address-space limit turns an attempt to allocate the hostile model (tens of GB)
# into a quick MemoryError, so a loader that allocates before checking fails this test
# instead of swapping the machine.
HOSTILE_CONFIG = PRELUDE + """
from model.weights.hf import export_hf, load_hf_gpt2
import safetensors, safetensors.numpy

save(base, 1)
with safetensors.safe_open(str(out / "ck.safetensors"), framework="np") as f:
    header = f.metadata()
meta = json.loads(header["checkpoint"])
meta["config"]["emb_dim"] = 32768
header["checkpoint"] = json.dumps(meta)
safetensors.numpy.save_file(safetensors.numpy.load_file(out / "ck.safetensors"), out / "ck.safetensors",
                            metadata=header)
export_hf(model, out / "hf")
hf_config = json.loads((out / "hf" / "config.json").read_text())
(out / "hf" / "config.json").write_text(json.dumps({**hf_config, "n_embd": 32768}))

vm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))
limit = (vm_kb + 1024 * 1024) * 1024  # 1 GiB above what the process holds now
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
report = {}
for name, load in (("checkpoint", lambda: load_model_from_checkpoint(base)), ("hf", lambda: load_hf_gpt2(out / "hf"))):
    t0 = time.perf_counter()
    try:
        load()
        outcome = "loaded"
    except CheckpointError as err:
        outcome = f"{type(err).__name__}: {err}"
    except MemoryError:
        outcome = "MemoryError"
    report[name] = {"outcome": outcome, "seconds": time.perf_counter() - t0}
print(json.dumps(report))
"""


def test_hostile_config_fails_before_allocating(tmp_path):
    report = run_script(HOSTILE_CONFIG, str(tmp_path))
    checkpoint, hf = report["checkpoint"], report["hf"]
    assert checkpoint["outcome"].startswith(f"CheckpointError: {tmp_path / 'ck.safetensors'}: the weights do not fit "
                                            "its config (wte.weight is [3000, 64], not [3000, 32768]"), checkpoint
    assert hf["outcome"].startswith(f"CheckpointError: {tmp_path / 'hf' / 'model.safetensors'}: does not fit "
                                    "config.json: wte.weight is [3000, 64], not [3000, 32768]"), hf
    assert checkpoint["seconds"] < 5 and hf["seconds"] < 5, report


def test_non_finite_weights_are_refused_on_load(tmp_path):
    engine.set_backend("numpy")
    config = GPTConfig(vocab_size=53, context_length=12, emb_dim=16, n_heads=2, n_layers=2, tie_weights=True)
    model = GPTModel(config)
    base = save_checkpoint(tmp_path / "ck", model, config)
    export_hf(model, tmp_path / "hf")
    for path, name in ((tmp_path / "ck.safetensors", "model.h.0.attn.c_proj.bias"),
                       (tmp_path / "hf" / "model.safetensors", "transformer.h.0.attn.c_proj.bias")):
        with safetensors.safe_open(str(path), framework="np") as f:
            header = f.metadata()
        tensors = safetensors.numpy.load_file(path)
        tensors[name][[1, 4, 5]] = [np.nan, np.inf, -np.inf]
        safetensors.numpy.save_file(tensors, path, metadata=header)
    with pytest.raises(NonFiniteWeightsError, match=rf"^{tmp_path / 'ck.safetensors'}: tensor "
                       r"model.h.0.attn.c_proj.bias holds 3 NaN/inf values \(of 16\); .* use an earlier checkpoint$"):
        load_model_from_checkpoint(base)
    with pytest.raises(NonFiniteWeightsError, match=rf"^{tmp_path / 'hf' / 'model.safetensors'}: tensor "
                       r"transformer.h.0.attn.c_proj.bias holds 3 NaN/inf values"):
        load_hf_gpt2(tmp_path / "hf")


# --- faults of whole runs: signals, divergence, periodic saves, refusals, user errors ---
# A 4000-character text at context 16 and batch 4: 14 steps an epoch; evaluation after
# steps 1, 3, 5, ... and the last. The reference stops at step 4; the runs are slow only
# through the tiny preset's 50257-way head and its 80 MB checkpoints.
TINY_TRAIN = ["--preset", "tiny", "--context-length", "16", "--batch-size", "4", "--eval-interval", "2",
              "--eval-iters", "1", "--backend", "numpy", "--no-sample", "--no-progress"]
STEPS = 4


@pytest.fixture(scope="module")
def verdict(tmp_path_factory) -> Path:
    from model.data.datadir import data_file

    path = tmp_path_factory.mktemp("data") / "verdict-4000.txt"
    path.write_text(data_file("the-verdict.txt").read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, verdict) -> Path:
    """An uninterrupted run of STEPS steps, saving every 2 steps and the best validation loss."""
    from model import train

    out = tmp_path_factory.mktemp("reference")
    assert train.main([*TINY_TRAIN, "--data-file", str(verdict), "--max-steps", str(STEPS), "--save-every", "2",
                       "--out-dir", str(out)]) == 0
    return out


def history(out: Path) -> dict:
    return json.loads((out / "history.json").read_text())


def assert_same_run(resumed: dict, full: dict) -> None:
    assert resumed["step"] == full["step"] and resumed["tokens_seen"] == full["tokens_seen"]
    for key in ("step_loss", "train_loss", "val_loss"):
        np.testing.assert_allclose(resumed[key], full[key], rtol=0, atol=1e-6, err_msg=key)


def start_training(out: Path, verdict: Path, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "model.train", *TINY_TRAIN, "--data-file", str(verdict), "--out-dir", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_after_line(proc: subprocess.Popen, prefix: str, signum: int) -> str:
    """Send `signum` once stdout shows a line starting with `prefix`; the process's stderr."""
    try:
        for line in proc.stdout:
            if line.startswith(prefix):
                proc.send_signal(signum)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return err


def resume(out: Path, *flags: str) -> int:
    from model import train

    return train.main(["--resume", str(out / "checkpoint"), *flags])


def test_sigterm_saves_prints_the_resume_command_and_resumes_exactly(reference, verdict, tmp_path):
    err = stop_after_line(start_training(tmp_path, verdict, "--max-steps", "100"), "ep 1 step     3", signal.SIGTERM)
    step = load_checkpoint(tmp_path / "checkpoint").step
    assert step == 3, err  # the signal came during step 4
    assert f"interrupted (SIGTERM) after step {step}; checkpoint saved to {tmp_path / 'checkpoint'}" in err
    # the printed command continues the interrupted run, --max-steps included
    assert f"resume with: python -m model.train --resume {tmp_path / 'checkpoint'} --max-steps 100" in err
    assert "Traceback" not in err
    assert resume(tmp_path, "--max-steps", str(STEPS)) == 0
    assert_same_run(history(tmp_path), history(reference))


def test_kill_9_loses_at_most_save_every_steps(reference, verdict, tmp_path):
    proc = start_training(tmp_path, verdict, "--max-steps", "100", "--save-every", "2")
    stop_after_line(proc, "ep 1 step     3", signal.SIGKILL)  # steps 1-3 done: the periodic save of step 2 is on disk
    assert proc.returncode == -signal.SIGKILL
    saved = load_checkpoint(tmp_path / "checkpoint")
    assert saved.step == 2
    # the state of step 2 of this very run (the SIGTERM test shows such a state resumes exactly)
    np.testing.assert_allclose(saved.extra["train_state"]["history"]["step_loss"], history(reference)["step_loss"][:2],
                               rtol=0, atol=1e-6)


def test_best_checkpoint_holds_the_lowest_validation_loss(reference):
    h = history(reference)
    assert h["step"] == [1, 3, STEPS]  # the last step is evaluated too
    best = load_checkpoint(reference / "best")
    assert best.step == h["step"][int(np.argmin(h["val_loss"]))]
    assert best.extra["train_state"]["history"]["val_loss"][-1] == min(h["val_loss"])
    assert load_checkpoint(reference / "checkpoint").step == STEPS


def test_diverging_learning_rate_stops_with_exit_3_and_keeps_the_checkpoint(reference, tmp_path):
    import shutil

    shutil.copy(reference / "checkpoint.safetensors", tmp_path)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    cmd = [sys.executable, "-m", "model.train", "--resume", str(tmp_path / "checkpoint"), "--out-dir", str(tmp_path),
           "--lr", "1e3", "--max-steps", "30", "--save-every", "1000"]  # no periodic save: the disk is the guard's
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert re.fullmatch(r"error: the (loss|gradient norm) is (nan|inf) at step \d+ \(learning rate 1e\+03\): the run "
                        r"diverged\. Likely causes: a learning rate too high .* or bad data\. Nothing was saved: the "
                        r"last checkpoint in .* is unchanged", lines[-1]), proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before
    # the per-step log (metrics.csv) is written as steps complete; nothing else is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "metrics.csv"]


def test_a_fresh_run_does_not_overwrite_a_checkpoint(reference, verdict, capsys):
    from model import train
    from model.training.run import _check_out_dir

    before = (reference / "checkpoint.safetensors").read_bytes()
    with pytest.raises(SystemExit) as info:
        train.main([*TINY_TRAIN, "--data-file", str(verdict), "--out-dir", str(reference)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2
    assert err == (f"python -m model.train: error: --out-dir {reference} already holds a checkpoint "
                   f"({reference / 'checkpoint.safetensors'}): continue that run with --resume "
                   f"{reference / 'checkpoint'}, start over with --overwrite, or choose another --out-dir")
    assert (reference / "checkpoint.safetensors").read_bytes() == before
    parser = train.build_parser()
    _check_out_dir(parser, parser.parse_args(["--out-dir", str(reference), "--overwrite"]), None)  # no error


def test_full_disk_during_a_run_is_one_line_and_exit_2(verdict, tmp_path):
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    cmd = [sys.executable, "-m", "model.train", *TINY_TRAIN, "--data-file", str(verdict), "--max-steps", "1",
           "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: could not save checkpoint {tmp_path / 'checkpoint.safetensors'}: "), line
    assert "File too large" in line and "the previous checkpoint there (if any) is unchanged" in line
    assert not (tmp_path / "checkpoint.safetensors").exists()


def malformed_copy(reference: Path, out: Path, change) -> Path:
    """A copy of the reference checkpoint whose metadata's extra went through `change`."""
    with safetensors.safe_open(str(reference / "checkpoint.safetensors"), framework="np") as f:
        header = f.metadata()
    meta = json.loads(header["checkpoint"])
    change(meta["extra"])
    header["checkpoint"] = json.dumps(meta)
    out.mkdir(exist_ok=True)
    safetensors.numpy.save_file(safetensors.numpy.load_file(reference / "checkpoint.safetensors"),
                                out / "checkpoint.safetensors", metadata=header)
    return out / "checkpoint"


def user_error(main, argv: list[str], capsys) -> str:
    """Run a command's main; it must exit 2 with one ``error`` line last and no traceback."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_bad_inputs_are_one_line_and_exit_2(reference, verdict, tmp_path, capsys):
    from model import classify, train

    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 2000)
    (tmp_path / "short.txt").write_text("Too short.")
    run = [*TINY_TRAIN, "--max-steps", "1", "--out-dir", str(tmp_path / "out")]
    cases = [
        (train.main, [*run, "--data-file", str(tmp_path / "latin1.txt")],
         f"error: --data-file {tmp_path / 'latin1.txt'}: not UTF-8 text (byte 3: invalid continuation byte): "
         "convert it to UTF-8"),
        (train.main, [*run, "--data-file", str(tmp_path)],
         f"error: --data-file {tmp_path}: a directory, expected a text file"),
        (train.main, [*run, "--data-file", str(tmp_path / "missing.txt")],
         f"error: --data-file {tmp_path / 'missing.txt'}: no such file, expected a text file"),
        (train.main, [*run, "--data-file", str(tmp_path / "short.txt")],
         f"error: --data-file {tmp_path / 'short.txt'}: the training split (9 characters) is too short"),
        (train.main, [*run, "--data-file", str(verdict), "--batch-size", "500"],
         "error: too little training data for one batch of 500: use more data or a smaller --batch-size"),
        (train.main, [*run[2:], "--preset", "tiny", "--context-length", "65", "--data-file", str(verdict)],
         "error: --context-length 65 is beyond the tiny preset's 64 tokens: choose at most 64"),
        (classify.main, ["--resume", str(reference / "checkpoint")],
         f"error: --resume {reference / 'checkpoint'}: that run was written by python -m model.train: resume it "
         "with that command"),
        (train.main, ["--resume", str(malformed_copy(reference, tmp_path / "m1", lambda e: e.update(train_args=[1])))],
         "error: --resume .*/m1/checkpoint: malformed run state in the checkpoint's metadata \\(TypeError"),
        (train.main, ["--resume", str(malformed_copy(reference, tmp_path / "m2",
                                                     lambda e: e["train_state"].update(step="x")))],
         "error: --resume .*/m2/checkpoint: malformed run state in the checkpoint's metadata \\(ValueError"),
        (classify.main, ["predict", " ", "--checkpoint", str(reference / "checkpoint")],
         "error: the message is empty: give the text to classify"),
    ]
    for main, argv, message in cases:
        line = user_error(main, argv, capsys)
        assert re.search(message if "\\(" in message else re.escape(message), line), (argv, line)


def small_run(lr: float = 1e-2):
    """A float32 GPT over a 97-token vocabulary and its loaders: a quick in-process loop."""
    from model.data.windows import DataLoader, SlidingWindowDataset

    engine.set_backend("numpy")
    engine.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    ids = np.random.default_rng(0).integers(0, 97, 8 * 20 + 1)
    loaders = (DataLoader(SlidingWindowDataset(ids[:8 * 16 + 1], 8, 8), 4, seed=1),
               DataLoader(SlidingWindowDataset(ids[8 * 16:], 8, 8), 4, shuffle=False, drop_last=False))
    return model, engine.optim.AdamW(model.parameters(), lr=lr), loaders


@pytest.mark.parametrize("bad, what", [(float("nan"), "loss"), (None, "gradient norm")])
def test_the_guard_stops_before_a_non_finite_update(bad, what):
    from model.training.loop import TrainConfig, TrainingDiverged, calc_loss_batch, train

    model, optimizer, (train_loader, val_loader) = small_run()
    weights = {}

    def poisoned(inputs, targets, m):  # the third step's loss (or only its gradient norm) is non-finite
        loss = calc_loss_batch(inputs, targets, m)
        if len(weights) == 2:
            # a finite loss (~1e21) whose gradient, 1e20 per wte entry, has a squared norm past float32
            return loss * bad if what == "loss" else loss + (m.wte.weight * 1e20).sum()
        return loss

    def remember(state, loss):
        weights[state.step] = {k: v.copy() for k, v in model.state_dict().items()}

    saved = []
    with pytest.raises(TrainingDiverged, match=rf"^the {what} is (nan|inf) at step 3 \(learning rate 0.01\): the run "
                       r"diverged\. Likely causes: a learning rate too high"):
        train(model, optimizer, train_loader, val_loader, TrainConfig(epochs=1, lr=1e-2, sample_prompt=None),
              loss_fn=poisoned, on_step=remember, save_fn=saved.append, progress=False, log=lambda s: None)
    assert saved == []  # nothing is saved for a diverged run
    for name, value in model.state_dict().items():  # the weights are those of step 2, finite
        np.testing.assert_array_equal(value, weights[2][name], err_msg=name)


def test_the_library_rejects_what_the_flags_reject():
    from model.sampling import generate

    model, _, _ = small_run()
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got nan"):
        engine.optim.AdamW(model.parameters(), lr=float("nan"))
    for temperature in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            generate(model, np.array([[1, 2]]), 1, temperature=temperature)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(model, np.array([[1, 2]]), 1, temperature=1.0, top_p=float("nan"))
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        engine.optim.clip_grad_norm_(model.parameters(), 0.0)
