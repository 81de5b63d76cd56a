"""Generation: KV cache vs recomputation, sampling controls, eos, text helpers, the CLI."""

import numpy as np
import pytest

import engine
from model.config import GPTConfig, get_config
from model.generate import main
from model.gpt import GPTModel
from model.sampling import generate, ids_to_text, sample_next, text_to_ids
from model.tokenizers.gpt2 import gpt2_tokenizer
from model.weights.checkpoint import save_checkpoint

VOCAB, CONTEXT = 61, 16


@pytest.fixture
def model() -> GPTModel:
    """float64, so cached and recomputed logits agree to ~1e-15 and no argmax can flip."""
    engine.set_backend("numpy")
    engine.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, context_length=CONTEXT, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)
    model = GPTModel(config).to("float64")
    # a larger init than GPT-2's makes the logits peaked enough for eos and top-p tests to bite
    for p in model.parameters():
        p.data = p.data * 8.0
    return model


def prompts(batch=3, length=5, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length))


@pytest.mark.parametrize(
    "sampling", [dict(), dict(temperature=1.0, seed=7), dict(temperature=0.8, top_k=10, top_p=0.9, seed=3)]
)
def test_cached_equals_uncached_past_the_context(model, sampling):
    # 5 prompt tokens + 20 new ones run past context_length 16: the cached run falls back to
    # recomputing the sliding window, exactly as the uncached run does throughout.
    cached = generate(model, prompts(), 20, use_cache=True, **sampling)
    uncached = generate(model, prompts(), 20, use_cache=False, **sampling)
    assert cached.shape == (3, 25) and cached.dtype == np.int64
    np.testing.assert_array_equal(cached, uncached)
    np.testing.assert_array_equal(cached[:, :5], prompts())


def test_long_prompt_is_cropped_to_the_context(model):
    ids = prompts(batch=2, length=CONTEXT + 7)
    out = generate(model, ids, 3)
    assert out.shape == (2, CONTEXT + 10)
    np.testing.assert_array_equal(out[:, :CONTEXT + 7], ids)
    np.testing.assert_array_equal(out, generate(model, ids, 3, use_cache=False))
    # the first new token depends only on the last context_length prompt tokens
    np.testing.assert_array_equal(out[:, -3], generate(model, ids[:, -CONTEXT:], 1)[:, -1])


def test_seeded_sampling_is_reproducible(model):
    a = generate(model, prompts(), 8, temperature=1.0, seed=1)
    np.testing.assert_array_equal(a, generate(model, prompts(), 8, temperature=1.0, seed=1))
    assert not np.array_equal(a, generate(model, prompts(), 8, temperature=1.0, seed=2))


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, prompts(), 10)
    np.testing.assert_array_equal(generate(model, prompts(), 10, temperature=2.0, top_k=1, seed=0), greedy)
    np.testing.assert_array_equal(generate(model, prompts(), 10, temperature=2.0, top_p=1e-9, seed=0), greedy)


def test_sampling_distribution_follows_temperature_top_k_top_p():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    many = np.repeat(logits, 40_000, axis=0)

    def freqs(**kw):
        return np.bincount(sample_next(many, rng=rng, **kw), minlength=4) / len(many)

    np.testing.assert_allclose(freqs(temperature=1.0), [0.5, 0.3, 0.15, 0.05], atol=0.01)
    hot = np.exp(logits[0] / 3.0) / np.exp(logits[0] / 3.0).sum()
    np.testing.assert_allclose(freqs(temperature=3.0), hot, atol=0.01)
    assert freqs(temperature=0.05)[0] > 0.99
    np.testing.assert_allclose(freqs(temperature=1.0, top_k=2), [0.625, 0.375, 0, 0], atol=0.01)
    # top_p=0.7: the mass before token 1 is 0.5 < 0.7 (kept), before token 2 it is 0.8 (dropped)
    np.testing.assert_allclose(freqs(temperature=1.0, top_p=0.7), [0.625, 0.375, 0, 0], atol=0.01)
    np.testing.assert_allclose(freqs(temperature=1.0, top_p=0.85), [0.5, 0.3, 0.15, 0] / np.float64(0.95), atol=0.01)
    np.testing.assert_array_equal(sample_next(np.array([[1.0, 3.0, 2.0], [5.0, 0.0, 0.0]])), [1, 0])


def test_eos_stops_each_sequence(model):
    ref = generate(model, prompts(), 12)  # greedy, no eos
    generated = list(ref[0, 5:])
    # eos := a token row 0 first emits after a few steps, so the stop is not at step one
    first = next(j for j, t in enumerate(generated) if j >= 2 and t not in generated[:j])
    eos = int(generated[first])
    out = generate(model, prompts(), 12, eos_id=eos)
    expected = ref.copy()
    for row in expected:
        hits = np.flatnonzero(row[5:] == eos)
        if hits.size:
            row[5 + hits[0]:] = eos
    finished_early = all((row[5:] == eos).any() for row in ref)
    assert out.shape[1] == ref.shape[1] or finished_early
    np.testing.assert_array_equal(out, expected[:, :out.shape[1]])
    # the only sequence finished: generation stops right there
    single = generate(model, prompts()[:1], 12, eos_id=eos)
    np.testing.assert_array_equal(single[0], ref[0, :5 + first + 1])


def test_ragged_and_flat_prompts(model):
    ragged = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    out = generate(model, ragged, 4)
    assert isinstance(out, list) and [len(o) for o in out] == [7, 9, 5]
    for prompt, row in zip(ragged, out):
        np.testing.assert_array_equal(row, generate(model, [prompt], 4)[0])
    flat = generate(model, [1, 2, 3], 4)
    assert flat.shape == (7,)
    np.testing.assert_array_equal(flat, out[0])


def test_mode_is_restored_and_dropout_is_off(model):
    model.train()
    a = generate(model, prompts(), 6)
    assert model.training
    np.testing.assert_array_equal(a, generate(model, prompts(), 6))  # dropout 0.1 would change it
    model.eval()
    generate(model, prompts(), 2)
    assert not model.training


def test_argument_checks(model):
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            generate(model, prompts(), 2, **bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompts(), -1)
    assert generate(model, prompts(), 0).shape == (3, 5)


def test_text_helpers_round_trip():
    tokenizer = gpt2_tokenizer()
    ids = text_to_ids("Every effort moves you<|endoftext|>", tokenizer)
    assert ids.shape == (1, 5) and ids[0, -1] == 50256
    assert ids_to_text(ids, tokenizer) == "Every effort moves you<|endoftext|>"
    assert ids_to_text(ids[0], tokenizer) == "Every effort moves you<|endoftext|>"
    with pytest.raises(ValueError):
        ids_to_text(np.zeros((2, 3), dtype=np.int64), tokenizer)


def test_cli_with_a_checkpoint(tmp_path, capsys):
    engine.set_backend("numpy")
    engine.manual_seed(0)
    config = get_config("tiny", context_length=32)
    path = save_checkpoint(tmp_path / "tiny", GPTModel(config), config)
    main(["--checkpoint", str(path), "--prompt", "Every effort moves you", "--max-new-tokens", "4",
          "--backend", "numpy"])
    text = capsys.readouterr().out.strip()
    assert text.startswith("Every effort moves you") and len(text) > len("Every effort moves you")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "nope"), "--backend", "numpy"])
    assert exit_info.value.code == 2 and "missing" in capsys.readouterr().err


def test_cli_run_directory_samples_template_classifier_and_speed(tmp_path, capsys):
    """A run directory (latest; --best refused when absent), --prompt-file, --num-samples with
    tokens/s after each, an instruct checkpoint's template, a classifier refused in one line."""
    from model.tasks.chat import ChatFormat, ChatSession, render_alpaca
    from model.tokenizers.gpt2 import encode_text

    engine.set_backend("numpy")
    engine.manual_seed(0)
    config = get_config("tiny", context_length=64, drop_rate=0.0)
    model = GPTModel(config)
    save_checkpoint(tmp_path / "run" / "checkpoint", model, config)
    (tmp_path / "prompt.txt").write_text("Every effort moves you", encoding="utf-8")
    main(["--checkpoint", str(tmp_path / "run"), "--prompt-file", str(tmp_path / "prompt.txt"), "--num-samples", "2",
          "--temperature", "1.0", "--max-new-tokens", "4"])
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0] == "--- sample 1 of 2 ---" and lines[2] == "--- sample 2 of 2 ---"
    assert lines[1].startswith("Every effort moves you") and lines[3].startswith("Every effort moves you")
    assert lines[1] != lines[3]  # seeds 123 and 124
    assert out.err.count("[4 tokens in") == 2 and out.err.count("tokens/s]") == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "run"), "--best"])
    assert exit_info.value.code == 2 and "no best checkpoint" in capsys.readouterr().err

    save_checkpoint(tmp_path / "instruct", model, config, extra={"prompt_template": "alpaca"})
    main(["--checkpoint", str(tmp_path / "instruct"), "--prompt", "Name a color.", "--max-new-tokens", "5"])
    tokenizer = gpt2_tokenizer()
    fmt = ChatFormat("alpaca", lambda m: encode_text(tokenizer, render_alpaca(m)), (tokenizer.eot_token,))
    expected = ChatSession(model, fmt, tokenizer.decode, max_new_tokens=5).send("Name a color.").text
    out = capsys.readouterr()
    assert out.out == expected + "\n" and "prompt template alpaca applied" in out.err

    save_checkpoint(tmp_path / "classifier", model, config, extra={"classifier": {"max_length": 8}})
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "classifier")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "classify predict" in err and err.count("\n") == 1


def test_cli_hf_dir_uses_the_folders_tokenizer_files(tmp_path, capsys):
    """An exported folder carries vocab.json + merges.txt: no data dir needed."""
    from model import cli

    engine.set_backend("numpy")
    engine.manual_seed(0)
    config = get_config("tiny", context_length=32, drop_rate=0.0)
    save_checkpoint(tmp_path / "ck", GPTModel(config), config)
    assert cli.main(["export", str(tmp_path / "ck"), "--to", "hf", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    main(["--checkpoint", str(tmp_path / "ck"), "--max-new-tokens", "4"])
    expected = capsys.readouterr().out
    main(["--hf-dir", str(tmp_path / "hf"), "--max-new-tokens", "4", "--data-dir", str(tmp_path / "no-data")])
    assert capsys.readouterr().out == expected
