"""bench.train's smallest run: every CPU provider in a process of its own, the same losses, a
row each with its phases, peak memory and step-for-step ratios; torch's plain row has no malloc
setting of ours. The providers take turns step by step unless --no-interleave, and one whose
process dies gets a row saying so."""

from __future__ import annotations

import os
import re

import pytest

from engine.backends import numpy_memory

NUMBER = r"([\d.]+)"
ROW = (r"^{name}\s+" + r"\s+".join([NUMBER] * 3) + r"\s+(\S+)\s+" + r"\s+".join([NUMBER] * 3)
       + r"\s+(\d+)\s+(\S+)$")


def test_the_tiny_bench_prints_a_row_per_provider(capsys):
    from bench import train

    train.main(["--preset", "tiny", "--quick", "--backend", "numpy", "--batch-size", "2", "--context-length", "16"])
    out = capsys.readouterr().out
    assert "taking turns step by step" in out
    for name in ("ours (numpy backend, fp32)", "torch eager (fp32)", "torch eager (fp32, our malloc)"):
        row = re.search(ROW.format(name=re.escape(name)), out, re.M)
        assert row, f"no row for {name} in:\n{out}"
        ms, tokens_per_s, ratio, per_step, fwd, bwd, opt, peak_mib, dloss = row.groups()
        assert float(tokens_per_s) == pytest.approx(32 / float(ms) * 1e3, rel=0.01)
        assert float(fwd) + float(bwd) + float(opt) == pytest.approx(float(ms), abs=0.3)
        assert int(peak_mib) > 0
        if name.startswith("torch"):
            assert float(dloss) < 1e-4  # the same weights and batches: the same losses
            # the ratio of the mean step times is a weighted mean of the step-for-step ratios
            lowest, highest = map(float, per_step.split("-"))
            assert lowest - 0.01 <= float(ratio) <= highest + 0.01
        else:
            assert per_step == "-"
    assert os.environ.get(numpy_memory.OPT_OUT) is None  # the providers' setting did not leak into this process


class _FakeWorker:
    """Records what measure asks of each provider, in order."""

    log: list[tuple[str, str, int | None]] = []

    def __init__(self, args, provider, batches):
        self.provider = provider
        self.log.append((provider, "start", None))

    def prepare(self):
        self.log.append((self.provider, "prepare", None))

    def step(self, index):
        self.log.append((self.provider, "step", index))

    def finish(self):
        from bench.train import Result

        self.log.append((self.provider, "finish", None))
        return Result(self.provider, 1.0, [])


@pytest.mark.parametrize("interleave", [True, False])
def test_providers_take_turns_step_by_step_or_run_one_after_another(monkeypatch, interleave):
    from argparse import Namespace

    from bench import train

    monkeypatch.setattr(train, "Worker", _FakeWorker)
    _FakeWorker.log = []
    results = train.measure(Namespace(steps=3), ["a", "b", "c"], [], interleave)
    assert [r.name for r in results] == ["a", "b", "c"]
    if interleave:  # all alive and prepared, then rounds whose first provider rotates
        expected = [(p, "start", None) for p in "abc"] + [(p, "prepare", None) for p in "abc"]
        expected += [(p, "step", i) for i, order in enumerate(("abc", "bca", "cab")) for p in order]
        expected += [(p, "finish", None) for p in "abc"]
    else:  # one process at a time
        expected = [entry for p in "abc" for entry in [(p, "start", None), (p, "prepare", None)]
                    + [(p, "step", i) for i in range(3)] + [(p, "finish", None)]]
    assert _FakeWorker.log == expected


def test_a_provider_whose_process_dies_gets_a_row_saying_so():
    from bench import train

    args = train.build_parser().parse_args(["--preset", "tiny", "--backend", "numpy"])
    worker = train.Worker(args, "ours", [])
    worker.process.kill()
    worker.prepare()
    worker.step(0)
    result = worker.finish()
    assert result.seconds_per_step is None and result.steps == []
    assert result.note == f"failed: its process ended with code {-9}"


def test_a_providers_environment_is_set_only_while_it_starts(monkeypatch):
    from bench.train import _environment

    monkeypatch.setenv("SCRATCHGPT_TEST_KEPT", "before")
    monkeypatch.delenv("SCRATCHGPT_TEST_NEW", raising=False)
    with _environment({"SCRATCHGPT_TEST_KEPT": "inside", "SCRATCHGPT_TEST_NEW": "1"}):
        assert (os.environ["SCRATCHGPT_TEST_KEPT"], os.environ["SCRATCHGPT_TEST_NEW"]) == ("inside", "1")
    assert os.environ["SCRATCHGPT_TEST_KEPT"] == "before" and "SCRATCHGPT_TEST_NEW" not in os.environ
