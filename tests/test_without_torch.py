"""The numpy path needs neither torch nor triton: every command runs in a process where both
imports fail (tests/helpers/without_torch), as after a plain ``pip install -e .`` on a laptop."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCKER = ROOT / "tests" / "helpers" / "without_torch"

SCRIPT = r"""
import io, json, sys
from pathlib import Path
from model import cli

out = Path(sys.argv[1])
common = ["--preset", "tiny", "--context-length", "32", "--max-steps", "1", "--batch-size", "2", "--eval-iters", "1",
          "--no-progress", "--backend", "numpy"]
assert cli.main(["train", *common, "--no-sample", "--out-dir", str(out / "pretrain")]) == 0
assert cli.main(["generate", "--checkpoint", str(out / "pretrain"), "--max-new-tokens", "3"]) in (0, None)
# batches of 64 short messages: the final accuracy over the whole data set takes few passes
assert cli.main(["classify", *common, "--batch-size", "64", "--max-length", "8",
                 "--out-dir", str(out / "classify")]) == 0
assert cli.main(["classify", "predict", "You won a prize", "--checkpoint", str(out / "classify")]) == 0
assert cli.main(["instruct", *common, "--max-test-entries", "1", "--max-new-tokens", "2", "--no-sample",
                 "--out-dir", str(out / "instruct")]) == 0
assert cli.main(["score", str(out / "instruct" / "instruction-data-with-response.json"), "--no-progress"]) == 0
sys.stdin = io.StringIO("Name a color.\n/reset\nHi\n")
assert cli.main(["chat", str(out / "instruct"), "--max-new-tokens", "3"]) == 0
assert cli.main(["export", str(out / "instruct"), "--to", "hf", str(out / "hf")]) == 0
assert cli.main(["export", str(out / "instruct"), "--weights-only", str(out / "weights")]) == 0
assert cli.main(["generate", "--hf-dir", str(out / "hf"), "--max-new-tokens", "3"]) in (0, None)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton"))
assert not loaded, loaded
print("ALL OK")
"""


def run_blocked(args, tmp_path, **env):
    env = {**{k: v for k, v in os.environ.items() if k != "SCRATCHGPT_BACKEND"}, **env,
           "PYTHONPATH": os.pathsep.join([str(BLOCKER), str(ROOT)])}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_the_blocker_blocks(tmp_path):
    result = run_blocked(["-c", "import triton"], tmp_path)
    assert result.returncode == 1 and "No module named 'triton'" in result.stderr


def test_every_command_runs_without_torch_and_triton(tmp_path):
    result = run_blocked(["-c", SCRIPT, str(tmp_path)], tmp_path)
    assert result.returncode == 0 and "ALL OK" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
    assert (tmp_path / "hf" / "vocab.json").is_file() and (tmp_path / "weights.safetensors").is_file()


def test_asking_for_torch_without_it_names_the_extra(tmp_path):
    result = run_blocked(["-m", "model.cli", "generate", "--backend", "triton"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(
        'error: argument --backend: the triton backend needs torch, which is not installed: pip install -e ".[gpu]" '
        '(or use --backend numpy)')
    # what torchrun sets; without torch there is no torchrun, but the variables may come from elsewhere
    torchrun = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    result = run_blocked(["-m", "model.cli", "train", "--preset", "tiny", "--max-steps", "1", "--out-dir", "x"],
                         tmp_path, **torchrun)
    assert result.returncode == 1
    assert result.stderr.strip() == 'error: launched by torchrun, but torch is not installed: pip install -e ".[ddp]"'


def test_the_backend_variable_naming_triton_without_torch_is_one_error_line(tmp_path):
    expected = ('error: the triton backend needs torch, which is not installed: pip install -e ".[gpu]" '
                '(or use the numpy backend: SCRATCHGPT_BACKEND=numpy)')
    for command in (["generate", "--max-new-tokens", "1"], ["train", "--preset", "tiny", "--max-steps", "1",
                                                             "--out-dir", "x"]):
        result = run_blocked(["-m", "model.cli", *command], tmp_path, SCRATCHGPT_BACKEND="triton")
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines()[-1].endswith(expected), result.stderr
        assert "Traceback" not in result.stderr
