"""bench.generate's smallest run: both engines decode the same greedy tokens and a ratio per phase is printed."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("transformers")


def test_the_tiny_bench_prints_ratios_of_equal_generations(capsys):
    from bench import generate

    generate.main(["--size", "tiny", "--quick", "--backend", "numpy", "--prompt-tokens", "8", "--new-tokens", "4"])
    out = capsys.readouterr().out
    for kind in generate.MODELS:
        assert f"{kind} (tiny, random): the same 4 greedy tokens from ours and transformers" in out
        for phase, tokens in (("prefill", 8), ("decode", 3)):
            row = re.search(rf"^\s*{kind} \(tiny, random\)\s+{phase}\s+{tokens}\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M)
            assert row, f"no {kind} {phase} row in:\n{out}"
            ours, theirs, ratio = map(float, row.groups())
            assert ours > 0 and theirs > 0 and ratio == pytest.approx(ours / theirs, rel=0.02)
    assert "> 1 = ours faster" in out


def test_different_tokens_fail_the_bench(monkeypatch):
    from bench import generate

    real = generate.greedy_theirs
    monkeypatch.setattr(generate, "greedy_theirs", lambda *a: ([t + 1 for t in real(*a)[0]],) + real(*a)[1:])
    with pytest.raises(AssertionError, match="greedy tokens differ"):
        generate.main(["--size", "tiny", "--quick", "--backend", "numpy", "--models", "gpt2", "--prompt-tokens", "4",
                       "--new-tokens", "2"])
