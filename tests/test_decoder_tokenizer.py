"""The tokenizer built from a tokenizer.json on tiktoken, against the tokenizers library, and the
native Llama 3 / Qwen3 chat templates, against transformers rendering the Jinja templates."""

import json
import shutil

import pytest

from model.decoder.chat import TEMPLATES, chat_template_for, render_llama3, render_qwen3
from model.decoder.tokenizer import HFTokenizer, TokenizerFileError

KINDS = ("llama", "qwen3")
TRICKY = [
    "", "Hello world", " leading space", "trailing spaces   ", "  multiple   spaces\t\ttabs\n\n\nnewlines",
    "\r\n\r\n x\r", "1234567890 12 3.14159 1,000,000", "café naïve cafe\u0301 Zu\u0308rich",  # NFC matters for Qwen
    "東京タワー 😀🚀 Привет мир γειά", "don't WE'LL I'M you've He'D", "https://example.com/a?b=1&c=2",
    "<|im_start|>user\nhi<|im_end|>", "<|begin_of_text|>x<|eot_id|>y", "<think>hm</think> done", "<|im_end",
    "\x00\x01 control \x7f", "a" * 300, "ﬁ ligature and ½ fraction",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("tokenizers", reason="the reference tokenizer (pip install transformers brings it)")
    from tests.fixtures.make_tiny_llama_qwen import write_tokenizer_files

    root = tmp_path_factory.mktemp("tok")
    for kind in KINDS:
        write_tokenizer_files(kind, root / kind)
    return {kind: root / kind for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_encode_and_decode_match_the_tokenizers_library(folders, kind):
    from tokenizers import Tokenizer

    from tests.fixtures.make_tiny_llama_qwen import CORPUS

    ours = HFTokenizer.from_folder(folders[kind])
    ref = Tokenizer.from_file(str(folders[kind] / "tokenizer.json"))
    for text in TRICKY + [CORPUS]:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special).ids, (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert ours.encode("x")[:1] == ([ref.token_to_id("<|begin_of_text|>")] if kind == "llama" else ours.encode("x"))


def test_gpt2_files_as_a_tokenizer_json_encode_like_the_gpt2_tokenizer(tmp_path):
    """A 50k vocabulary with a lone ByteLevel pre-tokenizer (GPT-2's regex), on a whole short story."""
    tokenizers = pytest.importorskip("tokenizers", reason="writes the tokenizer.json")
    from model.data.datadir import data_file
    from model.tokenizers.gpt2 import gpt2_tokenizer

    ref = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(data_file("gpt2/encoder.json")),
                                                                str(data_file("gpt2/vocab.bpe"))))
    ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = tokenizers.decoders.ByteLevel()
    ref.add_special_tokens(["<|endoftext|>"])
    ref.save(str(tmp_path / "tokenizer.json"))
    ours = HFTokenizer.from_folder(tmp_path)
    assert ours.vocab_size == 50257
    story = data_file("the-verdict.txt").read_text(encoding="utf-8")
    for text in TRICKY + [story]:
        assert ours.encode(text) == ref.encode(text).ids == gpt2_tokenizer().encode(text, allowed_special="all")


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_eos_token": True},
                                   {"add_bos_token": True, "add_eos_token": True}])
def test_bos_eos_follow_the_post_processor_as_in_transformers(folders, tmp_path, flags):
    transformers = pytest.importorskip("transformers", reason="the reference for tokenizer_config.json flags")
    folder = shutil.copytree(folders["llama"], tmp_path / "llama")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    ours = HFTokenizer.from_folder(folder)
    for text in TRICKY[:8]:
        assert ours.encode(text) == ref(text)["input_ids"], (flags, text)
    assert ours.encode("hi")[0] == ours.added_tokens["<|begin_of_text|>"]


def test_unsupported_tokenizer_files_are_named(folders):
    data = json.loads((folders["llama"] / "tokenizer.json").read_text())
    with pytest.raises(TokenizerFileError, match="only byte-level BPE"):
        HFTokenizer({**data, "model": {**data["model"], "type": "WordPiece"}})
    with pytest.raises(TokenizerFileError, match="pre_tokenizer"):
        HFTokenizer({**data, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}})
    with pytest.raises(TokenizerFileError, match="normalizer"):
        HFTokenizer({**data, "normalizer": {"type": "Lowercase"}})
    merges = data["model"]["merges"]
    with pytest.raises(TokenizerFileError, match="merge 1 "):  # a later merge moved first breaks rank order
        HFTokenizer({**data, "model": {**data["model"], "merges": [merges[5]] + merges}})


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "  Be brief. \n"}, {"role": "user", "content": " What is 2+2? "},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA1"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "A2", "reasoning_content": "why\n"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
     {"role": "assistant", "content": "<think>r1</think>x"}, {"role": "assistant", "content": "y"}],
]


@pytest.mark.parametrize("kind", KINDS)
def test_chat_templates_match_transformers(folders, kind):
    transformers = pytest.importorskip("transformers", reason="the reference renderer of the Jinja templates")
    ref = transformers.AutoTokenizer.from_pretrained(folders[kind])
    ours = HFTokenizer.from_folder(folders[kind])
    template = chat_template_for(kind, ours)
    options = [{"date_string": "05 Mar 2025"}] if kind == "llama" else [{}, {"enable_thinking": False}]
    for messages in CONVERSATIONS:
        for generation in (True, False):
            for option in options:
                text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **option)
                ids = ref.apply_chat_template(messages, add_generation_prompt=generation, **option)
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids
                assert template.render(messages, generation, **option) == text
                assert template.encode(ours, messages, generation, **option) == list(ids)


def test_native_templates_give_the_published_layouts():
    # the Qwen3 model card's rendering of a finished exchange: an empty think block on the last reply
    assert render_qwen3([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                        add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n")
    assert render_qwen3([{"role": "user", "content": "Hi"}], enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_llama3([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
                         date_string="26 Jul 2024") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nBe kind.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="message 0 needs a role"):
        render_llama3([{"role": "tool", "content": "{}"}])
    assert set(TEMPLATES) == {"llama", "qwen3"}
