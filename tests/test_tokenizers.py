"""Word-level tokenizers, our byte-pair encoder, and GPT-2's tokenizer against tiktoken.

Data comes from the data dir: export SCRATCHGPT_DATA_DIR=<the shared data folder>.
"""

from pathlib import Path

import pytest

from model.data.datadir import data_file, resolve_data_dir
from model.tokenizers.bpe import BytePairTokenizer
from model.tokenizers.gpt2 import gpt2_tokenizer
from model.tokenizers.simple import SimpleTokenizerV1, SimpleTokenizerV2, UnknownTokenError, build_vocab, split_words


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The data dir: CI points SCRATCHGPT_DATA_DIR at the shared data folder. Downloads a missing file when online."""
    return resolve_data_dir()


def read_text(data_dir: Path, relpath: str) -> str:
    return data_file(relpath, data_dir).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def verdict(data_dir) -> str:
    return read_text(data_dir, "the-verdict.txt")


@pytest.fixture(scope="module")
def shakespeare_50k(data_dir) -> str:
    return read_text(data_dir, "tinyshakespeare/input.txt")[:50_000]


@pytest.fixture(scope="module")
def gpt2(data_dir):
    return gpt2_tokenizer(data_dir)


@pytest.fixture(scope="module")
def our_gpt2(data_dir) -> BytePairTokenizer:
    return BytePairTokenizer.from_gpt2_files(
        data_file("gpt2/encoder.json", data_dir), data_file("gpt2/vocab.bpe", data_dir)
    )


EDGE_CASES = [
    "",
    " ",
    "Hello",
    "héllo wörld, naïve café",
    "你好，世界！日本語のテキスト",
    "emoji 🙂👍🏽👨‍👩‍👧 flags 🇫🇷",
    "e\u0301 combining a\u0308 and zero\u200bwidth",
    "tabs\t\tand\n\n\nnewlines \r\n crlf",
    "trailing spaces   ",
    "   leading spaces",
    " " * 300 + "x",
    "DON'T we'll it's I'M you'VE they're",
    "12345 3.14159 ½ ٣٤ 1,000,000",
    "snake_case __dunder__ a--b ...!?",
    "\x00\x01 control \x7f chars \u0091",
    "<|endoftext|> not allowed here",
]


# ------------------------------------------------------------------ simple tokenizers


def test_split_words_keeps_punctuation_drops_whitespace():
    words = ["Hello", ",", "world", ".", "Is", "this", "--", "a", "test", "?"]
    assert split_words("Hello, world. Is this-- a test?") == words


def test_vocab_sizes_match_the_book(verdict):
    assert len(build_vocab(verdict)) == 1130
    vocab = build_vocab(verdict, ("<|endoftext|>", "<|unk|>"))
    assert len(vocab) == 1132
    assert (vocab["<|endoftext|>"], vocab["<|unk|>"]) == (1130, 1131)


def test_simple_v1_book_example(verdict):
    tokenizer = SimpleTokenizerV1.from_text(verdict)
    text = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    ids = tokenizer.encode(text)
    assert ids == [1, 56, 2, 850, 988, 602, 533, 746, 5, 1126, 596, 5, 1, 67, 7, 38, 851, 1108, 754, 793, 7]
    assert tokenizer.decode(ids) == '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'


def test_simple_v1_round_trips_its_own_words(verdict):
    tokenizer = SimpleTokenizerV1.from_text(verdict)
    words = split_words(verdict)
    assert split_words(tokenizer.decode(tokenizer.encode(verdict))) == words


def test_simple_v1_unknown_word_is_a_clear_key_error(verdict):
    tokenizer = SimpleTokenizerV1.from_text(verdict)
    with pytest.raises(KeyError, match="'Hello' is not in the vocabulary") as info:
        tokenizer.encode("Hello, do you like tea?")
    assert isinstance(info.value, UnknownTokenError)


def test_simple_v2_book_example(verdict):
    tokenizer = SimpleTokenizerV2.from_text(verdict)
    text = " <|endoftext|> ".join(("Hello, do you like tea?", "In the sunlit terraces of the palace."))
    ids = tokenizer.encode(text)
    assert ids == [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
    assert tokenizer.decode(ids) == "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."


def test_simple_v2_needs_unk_in_vocab(verdict):
    with pytest.raises(ValueError, match="<|unk|>"):
        SimpleTokenizerV2(build_vocab(verdict))


# ------------------------------------------------------------------------ GPT-2 BPE


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello", [15496]),
        ("<|endoftext|>", [50256]),
        ("Hello, world. Is this-- a test?", [15496, 11, 995, 13, 1148, 428, 438, 257, 1332, 30]),
        (
            "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.",
            [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554]
            + [262, 4252, 18250, 8812, 2114, 286, 617, 34680, 27271, 13],
        ),
        ("Akwirw ier", [33901, 86, 343, 86, 220, 959]),
    ],
)
def test_gpt2_known_ids(gpt2, our_gpt2, text, ids):
    assert gpt2.encode(text, allowed_special={"<|endoftext|>"}) == ids
    assert our_gpt2.encode(text) == ids
    assert our_gpt2.decode(ids) == text


def test_gpt2_tokenizer_shape(gpt2, our_gpt2, data_dir):
    assert gpt2.name == "gpt2"
    assert gpt2.n_vocab == our_gpt2.vocab_size == 50257
    assert gpt2.eot_token == our_gpt2.eot_token == 50256
    assert gpt2_tokenizer(data_dir) is gpt2  # cached per path


def test_gpt2_whole_verdict(gpt2, our_gpt2, verdict):
    ids = our_gpt2.encode(verdict)
    assert len(ids) == 5145  # as the data README records
    assert ids == gpt2.encode(verdict)
    assert our_gpt2.decode(ids) == verdict


def test_gpt2_shakespeare(gpt2, our_gpt2, shakespeare_50k):
    ids = our_gpt2.encode(shakespeare_50k)
    assert ids == gpt2.encode(shakespeare_50k)
    assert our_gpt2.decode(ids) == shakespeare_50k


@pytest.mark.parametrize("text", EDGE_CASES)
def test_gpt2_edge_cases(gpt2, our_gpt2, text):
    ids = our_gpt2.encode(text, allowed_special=set())
    assert ids == gpt2.encode(text, disallowed_special=())
    assert our_gpt2.decode(ids) == text


def test_gpt2_special_tokens(gpt2, our_gpt2):
    text = "a<|endoftext|>b"
    assert our_gpt2.encode(text) == our_gpt2.encode(text, allowed_special="all") == [64, 50256, 65]
    assert our_gpt2.encode(text, allowed_special=set()) == gpt2.encode(text, disallowed_special=())
    assert 50256 not in our_gpt2.encode(text, allowed_special=set())


def test_decode_partial_utf8_is_replaced(gpt2, our_gpt2):
    ids = our_gpt2.encode("🙂")
    assert len(ids) > 1
    assert our_gpt2.decode(ids[:1]) == gpt2.decode(ids[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        our_gpt2.decode([50257])


# ------------------------------------------------------------------- BPE training


@pytest.fixture(scope="module")
def trained(verdict) -> BytePairTokenizer:
    return BytePairTokenizer.train(verdict, vocab_size=500)


def test_train_gives_requested_vocab(trained):
    assert trained.vocab_size == 500
    assert trained.eot_token == 499
    assert trained.to_tiktoken().n_vocab == 500


def test_train_round_trips_and_compresses(trained, verdict, shakespeare_50k):
    ids = trained.encode(verdict)
    assert trained.decode(ids) == verdict
    assert len(ids) < len(verdict.encode("utf-8")) / 2
    assert trained.decode(trained.encode(shakespeare_50k)) == shakespeare_50k


def test_train_to_tiktoken_gives_identical_ids(trained, verdict, shakespeare_50k):
    encoding = trained.to_tiktoken()
    for text in [verdict, shakespeare_50k, *EDGE_CASES]:
        assert trained.encode(text, allowed_special="all") == encoding.encode(text, allowed_special="all")


def test_train_merges_most_frequent_pair_first():
    tokenizer = BytePairTokenizer.train("aaabdaaabac", vocab_size=256 + 2 + 1)
    assert tokenizer.token_bytes(256) == b"aa"  # 4 times, overlapping, then ab (2)
    assert tokenizer.token_bytes(257) == b"ab"
    assert tokenizer.encode("aaabdaaabac") == [256, 257, ord("d"), 256, 257, ord("a"), ord("c")]


def test_train_is_deterministic_and_keeps_specials_whole(verdict):
    text = "<|endoftext|>".join([verdict[:3000], verdict[3000:6000]])
    first = BytePairTokenizer.train(text, 300)
    second = BytePairTokenizer.train(text, 300)
    assert [first.token_bytes(i) for i in range(299)] == [second.token_bytes(i) for i in range(299)]
    assert all(b"<|" not in first.token_bytes(i) for i in range(299))
    assert first.encode("<|endoftext|>") == [299]


def test_train_vocab_size_too_small():
    with pytest.raises(ValueError, match="minimum 257"):
        BytePairTokenizer.train("some text", vocab_size=256)
    assert BytePairTokenizer.train("some text", vocab_size=256, special_tokens=()).vocab_size == 256


def test_train_warns_when_text_runs_out_of_pairs():
    with pytest.warns(UserWarning, match="no pairs left"):
        tokenizer = BytePairTokenizer.train("ab ab", vocab_size=300)
    assert tokenizer.vocab_size < 300
    assert tokenizer.decode(tokenizer.encode("ab ab ba")) == "ab ab ba"


def test_one_rule_for_special_tokens_in_text():
    """encode_text: <|endoftext|> in text is the token, on tiktoken and our BPE alike; other specials are text."""
    from model.tokenizers.gpt2 import encode_text

    fast = gpt2_tokenizer()
    ours = BytePairTokenizer.from_gpt2_files(data_file("gpt2/encoder.json"), data_file("gpt2/vocab.bpe"))
    text = "Hi<|endoftext|>there <|fim_prefix|>"
    assert encode_text(fast, text) == encode_text(ours, text)
    assert encode_text(fast, text).count(50256) == 1
    assert encode_text(fast, "<|fim_prefix|>") == fast.encode_ordinary("<|fim_prefix|>")
