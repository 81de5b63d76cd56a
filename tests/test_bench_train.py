"""bench.train's smallest run: every CPU provider in a process of its own, the same losses, a
row each with its phases and peak memory; torch's plain row has no malloc setting of ours."""

from __future__ import annotations

import os
import re

import pytest

from engine.backends import numpy_memory

ROW = r"^{name}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\S+)$"


def test_the_tiny_bench_prints_a_row_per_provider(capsys):
    from bench import train

    train.main(["--preset", "tiny", "--quick", "--backend", "numpy", "--batch-size", "2", "--context-length", "16"])
    out = capsys.readouterr().out
    for name in ("ours (numpy backend, fp32)", "torch eager (fp32)", "torch eager (fp32, our malloc)"):
        row = re.search(ROW.format(name=re.escape(name)), out, re.M)
        assert row, f"no row for {name} in:\n{out}"
        ms, tokens_per_s, ratio, fwd, bwd, opt, peak_mib, dloss = row.groups()
        assert float(tokens_per_s) == pytest.approx(32 / float(ms) * 1e3, rel=0.01)
        assert float(fwd) + float(bwd) + float(opt) == pytest.approx(float(ms), abs=0.3)
        assert int(peak_mib) > 0
        if name.startswith("torch"):
            assert float(dloss) < 1e-4  # the same weights and batches: the same losses
    assert os.environ.get(numpy_memory.OPT_OUT) is None  # the providers' setting did not leak into this process


def test_a_providers_environment_is_set_only_while_it_starts(monkeypatch):
    from bench.train import _environment

    monkeypatch.setenv("SCRATCHGPT_TEST_KEPT", "before")
    monkeypatch.delenv("SCRATCHGPT_TEST_NEW", raising=False)
    with _environment({"SCRATCHGPT_TEST_KEPT": "inside", "SCRATCHGPT_TEST_NEW": "1"}):
        assert (os.environ["SCRATCHGPT_TEST_KEPT"], os.environ["SCRATCHGPT_TEST_NEW"]) == ("inside", "1")
    assert os.environ["SCRATCHGPT_TEST_KEPT"] == "before" and "SCRATCHGPT_TEST_NEW" not in os.environ
