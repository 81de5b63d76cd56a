"""Spam classification: the SMS data pipeline, the classifier and the command (train, predict).

Reads the real SMS Spam Collection from the data dir (CI: SCRATCHGPT_DATA_DIR=<shared data>).
"""

import contextlib
import json
import re

import numpy as np
import pytest

import engine
from model.classify import main
from model.config import get_config
from model.data.datadir import data_file
from model.data.spam import (
    PAD_TOKEN_ID,
    SPAM_FILE,
    SpamDataError,
    SpamDataset,
    TruncationWarning,
    balance,
    create_spam_loaders,
    random_split,
    read_sms_spam,
)
from model.data.windows import DataLoader
from model.gpt import GPTModel
from model.tasks.classification import (
    GPTClassifier,
    calc_accuracy_loader,
    classify_text,
    freeze_for_finetuning,
    load_classifier,
    record_accuracy,
)
from model.tokenizers.gpt2 import gpt2_tokenizer
from model.weights.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def spam(tokenizer):
    return create_spam_loaders(tokenizer, context_length=1024)


# --- data ---
def test_real_file_counts_balance_and_book_split_sizes():
    messages = read_sms_spam()
    assert len(messages) == 5574
    assert sum(m.label == 0 for m in messages) == 4827 and sum(m.label for m in messages) == 747
    balanced = balance(messages)
    assert sum(m.label == 0 for m in balanced) == 747 and sum(m.label for m in balanced) == 747
    assert [m.line for m in balance(messages)] == [m.line for m in balanced]  # seeded
    train, val, test = random_split(balanced)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    assert {m.line for m in train + val + test} == {m.line for m in balanced}


def test_padding_to_the_training_max_length(spam, tokenizer):
    assert spam.max_length == 120  # the book's longest training message
    for ds in (spam.train, spam.val, spam.test):
        assert ds.inputs.shape == (len(ds), 120) and ds.inputs.dtype == np.int64
    for ids, message in zip(spam.train.inputs[:50], spam.train.messages[:50]):
        n = len(tokenizer.encode_ordinary(message.text))
        assert ids[:n].tolist() == tokenizer.encode_ordinary(message.text)
        assert (ids[n:] == PAD_TOKEN_ID).all()
    assert spam.train.num_truncated == spam.val.num_truncated == 0 and spam.test.num_truncated == 1
    x, y = next(iter(spam.train_loader))
    assert x.shape == (8, 120) and y.shape == (8,) and set(y.tolist()) <= {0, 1}
    assert (len(spam.train_loader), len(spam.val_loader), len(spam.test_loader)) == (130, 19, 38)


@pytest.mark.parametrize("content,message", [
    ("ham\tfine\nspamm\tbuy now\n", r"bad\.tsv, line 2: label 'spamm' is neither 'ham' nor 'spam'"),
    ("ham\tfine\nspam\tok\nno tab here\n", r"bad\.tsv, line 3: no tab separating label and text"),
    ("ham\tfine\n\nspam\tx\n", r"bad\.tsv, line 2: no tab"),
    ("", r"bad\.tsv: the file holds no messages"),
])
def test_malformed_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SpamDataError, match=message):
        read_sms_spam(path)


def test_crlf_line_ends_are_stripped(tmp_path):
    lf = read_sms_spam()
    path = tmp_path / "crlf.tsv"
    path.write_bytes(data_file(SPAM_FILE).read_bytes().replace(b"\n", b"\r\n"))  # as a Windows editor saves it
    crlf = read_sms_spam(path)
    assert [(m.label, m.text, m.line) for m in crlf] == [(m.label, m.text, m.line) for m in lf]
    path.write_bytes(b"ham\tfine\r\nspam\tbuy now\r\n")
    assert [(m.label, m.text) for m in read_sms_spam(path)] == [(0, "fine"), (1, "buy now")]


def test_missing_file_and_unquoted_fields(tmp_path):
    with pytest.raises(SpamDataError, match=r"missing\.tsv: SMS spam file not found.*--data-dir"):
        read_sms_spam(tmp_path / "missing.tsv")
    path = tmp_path / "ok.tsv"
    path.write_text('ham\t"quoted\ttab" stays\nspam\t"\n', encoding="utf-8")
    messages = read_sms_spam(path)
    assert [(m.label, m.text, m.line) for m in messages] == [(0, '"quoted\ttab" stays', 1), (1, '"', 2)]


def test_messages_longer_than_the_context_are_truncated_and_counted(tokenizer):
    data = create_spam_loaders(tokenizer, context_length=32)
    assert data.max_length == 32 and data.train.num_truncated > 0
    assert "had more than 32 tokens; only their first 32 tokens are used" in data.truncation_note()
    with pytest.raises(ValueError, match="max_length must be in"):
        create_spam_loaders(tokenizer, context_length=32, max_length=64)
    with pytest.raises(ValueError, match="exceeds the context length"):
        SpamDataset(data.train.messages[:3], tokenizer, max_length=64, context_length=32)


# --- model ---
def tiny_classifier() -> GPTClassifier:
    engine.manual_seed(0)
    return GPTClassifier(GPTModel(get_config("tiny", drop_rate=0.0)))


def test_classifier_head_and_default_freezing():
    model = tiny_classifier()
    names = dict(model.named_parameters())
    assert names["classifier.weight"].shape == (2, 64) and "gpt.lm_head.weight" not in names
    assert model(np.zeros((3, 5), dtype=np.int64)).shape == (3, 5, 2)
    freeze_for_finetuning(model, "last-block")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("gpt.h.1.", "gpt.ln_f.", "classifier.")) for n in trainable)
    assert "gpt.h.1.attn.c_attn.weight" in trainable and "classifier.bias" in trainable
    freeze_for_finetuning(model, "all")
    assert all(p.requires_grad for p in model.parameters())


def test_classify_text_truncates_long_messages_with_a_warning(tokenizer):
    model = tiny_classifier()
    with pytest.warns(TruncationWarning, match="only its first 16 tokens are classified"):
        label, prob = classify_text(model, tokenizer, "win a prize " * 20, max_length=16)
    assert label in ("spam", "not spam") and 0.5 <= prob <= 1.0
    with pytest.raises(ValueError, match="exceeds the model's context length 64"):
        classify_text(model, tokenizer, "hi", max_length=65)


# --- the command ---
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier trained for a few steps by the command itself."""
    out = tmp_path_factory.mktemp("classify")
    engine.set_backend("numpy")
    # NOTE: batches of 32 make the final full-loader evaluation 4x fewer (and cheaper) passes.
    args = ["--preset", "tiny", "--train-all", "--lr", "1e-3", "--batch-size", "32", "--max-steps", "20",
            "--max-length", "32", "--eval-interval", "10", "--seed", "1", "--out-dir", str(out), "--no-progress"]
    assert main(args) == 0
    return out


def test_short_run_beats_chance_and_writes_outputs(trained):
    history = json.loads((trained / "history.json").read_text())
    accuracy = history["final_accuracy"]
    assert accuracy["test"] > 0.7 and accuracy["val"] > 0.7, accuracy  # chance is 0.5 (balanced classes)
    assert len(history["step_loss"]) == 20 and history["step"] == [1, 11]
    for name in ("checkpoint.safetensors", "loss.png"):
        assert (trained / name).is_file()
    ckpt = load_checkpoint(trained / "checkpoint")
    info = ckpt.extra["classifier"]
    assert (info["max_length"], info["pad_token_id"], info["class_names"]) == (32, 50256, ["not spam", "spam"])
    assert ckpt.state_dict["classifier.weight"].shape == (2, 64)


def test_loaded_checkpoint_predicts_as_trained(trained, tokenizer):
    model, info = load_classifier(trained / "checkpoint")
    data = create_spam_loaders(tokenizer, 64, info["max_length"])
    accuracy = json.loads((trained / "history.json").read_text())["final_accuracy"]
    assert calc_accuracy_loader(data.val_loader, model) == pytest.approx(accuracy["val"])


def test_predict_cli(trained, capsys):
    assert main(["predict", "You are a winner! Call now to claim your free prize", "--checkpoint",
                 str(trained / "checkpoint")]) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(r"(spam|not spam) \(probability (0\.\d{3}|1\.000)\)\n", out), out
    assert err == ""
    assert main(["predict", "free entry " * 40, "--checkpoint", str(trained / "checkpoint.json")]) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(r"(spam|not spam) \(probability .*\)\n", out)
    assert re.search(r"note: the message has \d+ tokens, more than the 32 the classifier takes: only its first 32", err)


def test_lora_run_saves_adapters_and_a_merged_checkpoint(tmp_path):
    args = ["--preset", "tiny", "--lora-rank", "2", "--lora-alpha", "2", "--lr", "1e-3", "--max-steps", "2",
            "--max-length", "8",
            "--batch-size", "64", "--out-dir", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    assert (tmp_path / "lora.safetensors").is_file() and (tmp_path / "lora.json").is_file()
    model, info = load_classifier(tmp_path / "checkpoint")  # merged: plain Linear names
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert info["trained"] == "LoRA rank 2, alpha 2"


def test_resume_continues_a_run_exactly(tmp_path):
    """--resume is shared: a classify run stopped at step 3 and resumed ends with the losses of one run."""
    common = ["--preset", "tiny", "--train-all", "--lr", "1e-3", "--max-length", "8", "--batch-size", "64",
              "--eval-interval", "2", "--eval-iters", "1", "--no-progress"]
    assert main([*common, "--max-steps", "6", "--out-dir", str(tmp_path / "full")]) == 0
    assert main([*common, "--max-steps", "3", "--out-dir", str(tmp_path / "part")]) == 0
    assert main(["--resume", str(tmp_path / "part" / "checkpoint"), "--max-steps", "6"]) == 0
    full, resumed = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("full", "part"))
    np.testing.assert_allclose(resumed["step_loss"], full["step_loss"], rtol=0, atol=1e-6)
    assert resumed["step"] == full["step"] and resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-6)


class ParityModel:
    """Predicts class (last input id) % 2; stands in for a classifier in accuracy bookkeeping."""

    @contextlib.contextmanager
    def evaluating(self):
        yield

    def __call__(self, ids):
        ids = np.asarray(ids)
        logits = np.stack([ids % 2 == 0, ids % 2 == 1], axis=-1).astype(np.float32)  # (B, T, 2)
        return engine.tensor(logits)


def test_each_epochs_validation_accuracy_covers_the_whole_validation_set():
    ids = np.arange(10).reshape(10, 1)  # (10, 1): the even ids are class 0, the odd ones class 1
    labels = np.array([0, 1] * 2 + [1] * 6)  # right on the first 4 rows, on 3 of the last 6
    val_loader = DataLoader(list(zip(ids, labels)), 2, shuffle=False, drop_last=False)
    history: dict = {}
    train_acc, val_acc = record_accuracy(ParityModel(), val_loader, val_loader, 1, history, epoch=1, examples_seen=8)
    assert train_acc == 1.0  # the first batch only (num_batches = 1)
    assert val_acc == pytest.approx(7 / 10) and history["accuracy"]["val_acc"] == [val_acc]
