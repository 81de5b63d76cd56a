"""Sliding windows, the data loader, the train/val split, and data directory resolution.

Data comes from the data dir: export SCRATCHGPT_DATA_DIR=<the shared data folder>.
No test touches the network: downloads are served from local file:// URLs.
"""

import argparse
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from model.data import datadir
from model.data.datadir import (
    DATA_DIR_ENV,
    DataChecksumError,
    DataFileNotFoundError,
    DataSource,
    add_data_dir_argument,
    data_file,
    resolve_data_dir,
)
from model.data.windows import DataLoader, SlidingWindowDataset, create_dataloaders, split_text
from model.tokenizers.gpt2 import gpt2_tokenizer
from model.tokenizers.simple import SimpleTokenizerV2


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The data dir: CI points SCRATCHGPT_DATA_DIR at the shared data folder. Downloads a missing file when online."""
    return resolve_data_dir()


@pytest.fixture(scope="module")
def verdict(data_dir) -> str:
    return data_file("the-verdict.txt", data_dir).read_text(encoding="utf-8")


# ------------------------------------------------------------------ sliding windows


@pytest.mark.parametrize(
    "n, context_length, stride", [(10, 4, 1), (10, 4, 2), (10, 4, 4), (11, 4, 3), (5, 4, 1), (23, 7, 5)]
)
def test_windows_match_the_books_loop(n, context_length, stride):
    ids = np.arange(100, 100 + n)
    dataset = SlidingWindowDataset(ids, context_length, stride)
    starts = range(0, n - context_length, stride)  # the book's GPTDatasetV1 loop
    assert len(dataset) == len(starts)
    assert dataset.inputs.shape == dataset.targets.shape == (len(starts), context_length)
    assert dataset.inputs.dtype == dataset.targets.dtype == np.int64
    for i, start in enumerate(starts):
        np.testing.assert_array_equal(dataset.inputs[i], ids[start : start + context_length])
        np.testing.assert_array_equal(dataset.targets[i], ids[start + 1 : start + context_length + 1])


def test_window_items_are_int64_copies():
    dataset = SlidingWindowDataset([5, 6, 7, 8, 9], context_length=3, stride=1)
    x, y = dataset[1]
    assert x.dtype == y.dtype == np.int64
    assert x.tolist() == [6, 7, 8] and y.tolist() == [7, 8, 9]
    x[0] = -1  # items are the caller's to modify
    assert dataset.inputs[1, 0] == 6


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="5 tokens are too few for context_length 5"):
        SlidingWindowDataset(range(5), context_length=5, stride=1)


def test_first_window_of_the_verdict_matches_the_book(verdict, data_dir):
    dataset = SlidingWindowDataset(gpt2_tokenizer(data_dir).encode(verdict), context_length=4, stride=1)
    x, y = next(iter(DataLoader(dataset, batch_size=1, shuffle=False)))
    assert x.tolist() == [[40, 367, 2885, 1464]]
    assert y.tolist() == [[367, 2885, 1464, 1807]]


# ---------------------------------------------------------------------- data loader


def small_dataset(n_windows: int = 10, context_length: int = 4) -> SlidingWindowDataset:
    return SlidingWindowDataset(np.arange(n_windows + context_length), context_length, stride=1)


def first_tokens(loader) -> list[int]:
    """The items of one pass, named by their first token (= window index here)."""
    return [int(t) for x, _ in loader for t in x[:, 0]]


def test_batch_shapes_and_drop_last():
    dataset = small_dataset(10)
    loader = DataLoader(dataset, batch_size=3)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == y.shape == (3, 4) and x.dtype == y.dtype == np.int64
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])

    loader = DataLoader(dataset, batch_size=3, shuffle=False, drop_last=False)
    assert len(loader) == 4
    assert [x.shape[0] for x, _ in loader] == [3, 3, 3, 1]
    assert first_tokens(loader) == list(range(10))


def test_shuffle_is_seeded_and_changes_each_epoch():
    dataset = small_dataset(50)
    loader = DataLoader(dataset, batch_size=5, seed=7)
    epoch0, epoch1 = first_tokens(loader), first_tokens(loader)
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1
    assert epoch0 == first_tokens(DataLoader(dataset, batch_size=5, seed=7))
    assert epoch0 != first_tokens(DataLoader(dataset, batch_size=5, seed=8))
    assert epoch1 == np.random.default_rng([7, 1]).permutation(50).tolist()


def test_set_epoch_reproduces_an_epoch():
    loader = DataLoader(small_dataset(20), batch_size=4, seed=3)
    epochs = [first_tokens(loader) for _ in range(3)]
    assert loader.epoch == 3
    loader.set_epoch(1)
    assert first_tokens(loader) == epochs[1]


def test_leaving_a_pass_early_does_not_advance_the_epoch():
    loader = DataLoader(small_dataset(20), batch_size=4, seed=3)
    for _ in loader:
        break
    assert loader.epoch == 0
    assert first_tokens(loader) == np.random.default_rng([3, 0]).permutation(20).tolist()


def test_resume_from_state_continues_exactly():
    loader = DataLoader(small_dataset(40), batch_size=4, seed=1)
    first_tokens(loader)  # one full epoch
    seen = []
    for i, (x, _) in enumerate(loader):
        seen += x[:, 0].tolist()
        if i == 3:
            # an evaluation pass over the same loader must not disturb the saved position
            next(iter(loader))
            state = loader.state
            break
    assert state == {"seed": 1, "epoch": 1, "batch": 4}

    resumed = DataLoader(small_dataset(40), batch_size=4, seed=1)
    resumed.load_state(state)
    seen += first_tokens(resumed)
    assert seen == np.random.default_rng([1, 1]).permutation(40).tolist()
    assert resumed.state == {"seed": 1, "epoch": 2, "batch": 0}
    with pytest.raises(ValueError, match="seed"):
        DataLoader(small_dataset(40), batch_size=4, seed=2).load_state(state)


# ---------------------------------------------------------------- splits and loaders


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9, 1.0])
def test_split_text_by_characters(fraction):
    text = "abcdefghij" * 7
    train, val = split_text(text, fraction)
    assert len(train) == int(fraction * len(text))
    assert train + val == text
    with pytest.raises(ValueError):
        split_text(text, 1.5)


def test_create_dataloaders_book_settings(verdict, data_dir):
    # The book's chapter 5 settings: 9 training batches of (2, 256), 1 validation batch.
    train, val = create_dataloaders(verdict, gpt2_tokenizer(data_dir), context_length=256, stride=256, batch_size=2)
    assert (len(train), len(val)) == (9, 1)
    assert all(x.shape == y.shape == (2, 256) for x, y in train)
    assert (train.shuffle, train.drop_last, val.shuffle, val.drop_last) == (True, True, False, False)


def test_create_dataloaders_with_word_tokenizer_and_short_val(verdict):
    tokenizer = SimpleTokenizerV2.from_text(verdict)
    train, val = create_dataloaders(verdict, tokenizer, context_length=8, stride=8, batch_size=4, seed=5)
    assert train.seed == 5 and len(train) > 0 and len(val) > 0
    with pytest.raises(ValueError, match="validation split"):
        create_dataloaders(verdict, tokenizer, context_length=900, stride=900, batch_size=1)


# ---------------------------------------------------------------- data directories


@pytest.fixture
def clean_env(monkeypatch, tmp_path) -> Path:
    """No data-dir variable, and a fresh empty user cache dir (returned)."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "scratchgpt"


def test_resolve_data_dir_order(clean_env, monkeypatch, tmp_path):
    assert resolve_data_dir() == clean_env.resolve()
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_dir() == (tmp_path / "env").resolve()
    assert resolve_data_dir(tmp_path / "flag") == (tmp_path / "flag").resolve()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv(DATA_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == (tmp_path / "home" / ".cache" / "scratchgpt").resolve()


def test_data_file_found_via_flag_and_env(clean_env, monkeypatch, tmp_path):
    (tmp_path / "d" / "gpt2").mkdir(parents=True)
    (tmp_path / "d" / "gpt2" / "vocab.bpe").write_text("x")
    expected = (tmp_path / "d" / "gpt2" / "vocab.bpe").resolve()
    assert data_file("gpt2/vocab.bpe", tmp_path / "d", download=False) == expected
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "d"))
    assert data_file("gpt2/vocab.bpe", download=False).read_text() == "x"


def test_missing_file_error_says_what_to_do(clean_env, tmp_path):
    with pytest.raises(DataFileNotFoundError) as info:
        data_file("the-verdict.txt", tmp_path / "empty", download=False)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    searched = [str((tmp_path / "empty").resolve()), str(clean_env.resolve())]
    for needle in ["the-verdict.txt", *searched, "--data-dir", DATA_DIR_ENV]:
        assert needle in message
    with pytest.raises(DataFileNotFoundError, match="not a file we know how to download"):
        data_file("no/such/file.txt", tmp_path)


def test_registry_matches_the_shared_data(data_dir):
    for relpath, source in datadir.DATA_FILES.items():
        content = data_file(relpath, data_dir, download=False).read_bytes()
        assert (len(content), hashlib.sha256(content).hexdigest()) == (source.size, source.sha256), relpath


def register(monkeypatch, relpath: str, origin: Path, content: bytes, member: str | None = None) -> None:
    """Make `relpath` a known file downloaded from `origin` (a local file://), pinned to `content`."""
    source = DataSource(origin.as_uri(), hashlib.sha256(content).hexdigest(), len(content), member)
    monkeypatch.setitem(datadir.DATA_FILES, relpath, source)


def test_download_verifies_and_moves_into_place(clean_env, monkeypatch, tmp_path):
    origin = tmp_path / "origin.txt"
    origin.write_bytes(b"hello data\n")
    register(monkeypatch, "sub/hello.txt", origin, b"hello data\n")
    path = data_file("sub/hello.txt", tmp_path / "data")
    assert path == (tmp_path / "data" / "sub" / "hello.txt").resolve()
    assert path.read_bytes() == b"hello data\n"
    assert [p.name for p in path.parent.iterdir()] == ["hello.txt"]  # no temp file left


def test_download_extracts_zip_member(clean_env, monkeypatch, tmp_path):
    origin = tmp_path / "archive.zip"
    with zipfile.ZipFile(origin, "w") as archive:
        archive.writestr("readme.txt", "ignore me")
        archive.writestr("Collection", "ham\thi\n")
    register(monkeypatch, "sms/Collection.tsv", origin, b"ham\thi\n", member="Collection")
    assert data_file("sms/Collection.tsv", tmp_path / "data").read_bytes() == b"ham\thi\n"


def test_checksum_mismatch_removes_the_download(clean_env, monkeypatch, tmp_path):
    origin = tmp_path / "origin.txt"
    origin.write_bytes(b"tampered")
    register(monkeypatch, "hello.txt", origin, b"expected")
    with pytest.raises(DataChecksumError, match="does not match"):
        data_file("hello.txt", tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []


def test_failed_download_is_file_not_found(clean_env, monkeypatch, tmp_path):
    register(monkeypatch, "hello.txt", tmp_path / "offline.txt", b"x")  # origin does not exist
    with pytest.raises(DataFileNotFoundError, match="failed") as info:
        data_file("hello.txt", tmp_path / "data")
    assert "--data-dir" in str(info.value) and DATA_DIR_ENV in str(info.value)
    assert info.value.__cause__ is not None


def test_unwritable_data_dir_downloads_into_user_cache(clean_env, monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("")
    origin = tmp_path / "origin.txt"
    origin.write_bytes(b"cached")
    register(monkeypatch, "hello.txt", origin, b"cached")
    path = data_file("hello.txt", tmp_path / "a_file" / "data")  # cannot be created under a file
    assert path == (clean_env / "hello.txt").resolve()
    assert data_file("hello.txt", tmp_path / "a_file" / "data", download=False) == path  # found there next time


def test_data_dir_argument():
    parser = argparse.ArgumentParser()
    add_data_dir_argument(parser)
    assert parser.parse_args([]).data_dir is None
    assert parser.parse_args(["--data-dir", "/some/where"]).data_dir == "/some/where"
    assert DATA_DIR_ENV in parser.format_help()
