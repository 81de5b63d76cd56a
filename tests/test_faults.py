"""Faults at the library level, each in its own process: kill -9 during saves, a full disk,
a hostile config.json, NaN/inf weights. A checkpoint on disk must always load, and a load
that cannot succeed must fail at once with one clear error."""

import json
import os
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
from model.weights.checkpoint import NonFiniteWeightsError, load_model_from_checkpoint, save_checkpoint
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
