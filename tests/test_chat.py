"""Chat: the instruct template, a session whose KV cache carries across turns (and gives the
tokens a from-scratch forward gives), dropping old turns, and `scratchgpt chat` through stdin
over our checkpoints and Llama 3 / Qwen3 folders."""

import io

import numpy as np
import pytest

import engine
from model import cli
from model.config import GPTConfig
from model.data.instructions import format_input, format_response
from model.gpt import GPTModel
from model.sampling import generate
from model.tasks.chat import ChatFormat, ChatSession, render_alpaca
from model.tokenizers.gpt2 import encode_text, gpt2_tokenizer
from model.weights.checkpoint import save_checkpoint

STOP = 299


def toy_format() -> ChatFormat:
    """Code points as token ids (a vocabulary of 300), in the alpaca layout, ending replies at id 299."""
    return ChatFormat("toy", lambda messages: [ord(c) for c in render_alpaca(messages).replace("<|endoftext|>", "\0")],
                      (STOP,))


def toy_model(context_length: int = 512, seed: int = 0) -> GPTModel:
    engine.manual_seed(seed)
    return GPTModel(GPTConfig(vocab_size=300, context_length=context_length, emb_dim=16, n_heads=2, n_layers=2,
                              drop_rate=0.0))


def decode(ids):
    return "".join(map(chr, ids))


def from_scratch(model, fmt, messages, max_new_tokens):
    """The greedy reply to `messages` without any cache carried over."""
    ids = fmt.encode(messages)
    out = generate(model, np.asarray(ids), max_new_tokens, use_cache=False)[len(ids):]
    out = [int(t) for t in out]
    return decode(out[:out.index(STOP)] if STOP in out else out)


def test_alpaca_template_is_what_instruct_trains_on():
    entry = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    rendered = render_alpaca([{"role": "user", "content": entry["instruction"]},
                              {"role": "assistant", "content": entry["output"]}])
    assert rendered == format_input(entry) + format_response(entry) + "<|endoftext|>"
    assert render_alpaca([{"role": "user", "content": "Hi"}]).endswith("### Instruction:\nHi\n\n### Response:\n")


def test_cache_carries_across_turns_and_gives_the_from_scratch_replies(monkeypatch):
    model, fmt = toy_model(), toy_format()
    rebuilt = []
    new_cache = model.new_kv_cache
    monkeypatch.setattr(model, "new_kv_cache", lambda: rebuilt.append(1) or new_cache())
    session = ChatSession(model, fmt, decode, max_new_tokens=12)
    streamed = []
    for text in ("Hello", "What is two plus two?", "Thanks"):
        expected = from_scratch(model, fmt, session.messages + [{"role": "user", "content": text}], 12)
        reply = session.send(text, on_text=streamed.append)
        assert reply.text == expected and reply.dropped_turns == 0
        assert "".join(streamed) == reply.text and 0 < reply.tokens <= 12
        streamed.clear()
    assert len(rebuilt) == 1  # the cache was built once, at the start, and carried over
    assert len(session.messages) == 6 and session.cached == fmt.encode(session.messages)[:len(session.cached)]
    session.reset()
    assert session.messages == [] and session.cached == []


def test_oldest_turns_are_dropped_when_the_context_is_full():
    model, fmt = toy_model(context_length=320), toy_format()
    session = ChatSession(model, fmt, decode, max_new_tokens=8)
    dropped = 0
    for i in range(4):
        text = f"turn {i}"
        reply = session.send(text)
        dropped += reply.dropped_turns
        assert session.messages[-2]["content"] == text
        assert len(fmt.encode(session.messages[:-1])) + 8 <= 320
        assert reply.text == from_scratch(model, fmt, session.messages[:-1], 8)
    assert dropped >= 2 and session.messages[0]["content"] != "turn 0"
    with pytest.raises(ValueError, match="context holds 320"):
        session.send("x" * 400)


@pytest.fixture(scope="module")
def gpt2_checkpoints(tmp_path_factory):
    """An instruct-style checkpoint (prompt template stored) and a plain one, GPT-2's vocabulary."""
    engine.manual_seed(5)
    model = GPTModel(GPTConfig(context_length=64, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    root = tmp_path_factory.mktemp("ck")
    save_checkpoint(root / "instruct" / "checkpoint", model, model.config, extra={"prompt_template": "alpaca"})
    save_checkpoint(root / "plain", model, model.config)
    save_checkpoint(root / "classifier", model, model.config, extra={"classifier": {"max_length": 8}})
    return root, model


def chat_through_stdin(monkeypatch, capsys, lines, *args):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = cli.main(["chat", *args, "--max-new-tokens", "6", "--backend", "numpy"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_chat_command_reads_stdin_applies_the_stored_template_and_resets(gpt2_checkpoints, monkeypatch, capsys):
    root, model = gpt2_checkpoints
    tokenizer = gpt2_tokenizer()
    fmt = ChatFormat("alpaca", lambda m: encode_text(tokenizer, render_alpaca(m)), (tokenizer.eot_token,))
    session = ChatSession(model, fmt, tokenizer.decode, max_new_tokens=6)
    first, second = session.send("Name a color.").text, session.send("And another?").text
    code, out, err = chat_through_stdin(monkeypatch, capsys, ["Name a color.", "And another?", "/reset",
                                                              "Name a color.", "/stats", "Hi", "/exit", "ignored"],
                                        str(root / "instruct"))
    assert code == 0 and "prompt template alpaca" in err
    hi = ChatSession(model, fmt, tokenizer.decode, max_new_tokens=6)
    hi.send("Name a color.")
    assert out == f"{first}\n{second}\n{first}\n{hi.send('Hi').text}\n"
    assert "(conversation cleared)" in err and "tokens/s]" in err


def test_chat_without_template_continues_text_and_classifier_is_refused(gpt2_checkpoints, monkeypatch, capsys):
    root, model = gpt2_checkpoints
    code, out, err = chat_through_stdin(monkeypatch, capsys, ["Every effort moves you"], str(root / "plain"))
    tokenizer = gpt2_tokenizer()
    ids = encode_text(tokenizer, "Every effort moves you")
    continuation = generate(model, np.asarray(ids), 6, eos_id=tokenizer.eot_token)[len(ids):]
    assert code == 0 and "no prompt template" in err and "plain text continuation" in err
    assert out == tokenizer.decode([int(t) for t in continuation if t != tokenizer.eot_token]) + "\n"
    code, out, err = chat_through_stdin(monkeypatch, capsys, ["Hi"], str(root / "classifier"))
    assert code == 2 and err.count("\n") == 1 and "classify predict" in err


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_chat_over_a_hugging_face_folder_uses_its_native_template(kind, tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers", reason="transformers writes the tiny folders (pip install -e .[test])")
    from model.decoder import chat_reply, load_hf_folder
    from tests.fixtures.make_tiny_llama_qwen import make_tiny_folder

    folder = make_tiny_folder(kind, tmp_path / kind)
    model, tokenizer, template = load_hf_folder(folder)
    expected = chat_reply(model, tokenizer, template, [{"role": "user", "content": "Hello"}], max_new_tokens=6)
    code, out, err = chat_through_stdin(monkeypatch, capsys, ["Hello"], str(folder))
    assert code == 0 and f"prompt template {template.name}" in err
    assert out == expected + "\n"
    # generate --hf-dir detects the family from config.json and applies the same template
    cli.main(["generate", "--hf-dir", str(folder), "--prompt", "Hello", "--max-new-tokens", "6"])
    assert capsys.readouterr().out == expected + "\n"


def test_terminal_keys_behave_as_in_other_repls(monkeypatch, capsys):
    """At a terminal: Ctrl-C stops a reply or clears the prompt line, Ctrl-D quits."""
    from model.chat import repl

    class Session:
        resets = 0

        def send(self, text, on_text):
            on_text("partial")
            raise KeyboardInterrupt

        def reset(self):
            self.resets += 1

    keys = iter(["Hi", KeyboardInterrupt(), "/reset", "/nope", EOFError()])

    def fake_input(prompt):
        key = next(keys)
        if isinstance(key, BaseException):
            raise key
        return key

    monkeypatch.setattr("builtins.input", fake_input)
    session = Session()
    assert repl(session, interactive=True, stats=False) == 0
    err = capsys.readouterr().err
    assert "(reply stopped)" in err and "(conversation cleared)" in err and "unknown command /nope" in err
    assert session.resets == 1
