"""Fine-tuning Llama 3 / Qwen3 folders with the shared commands: instruct (full and LoRA, exact
resume, both backends), classify, and what a run directory is good for afterwards (generate,
chat, export back to a folder transformers loads). The folders are tiny and random
(`decoder_folders` in conftest); the instruction file is 40 entries of the book's data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import engine
from model import cli
from model.classify import main as classify_main
from model.decoder import DecoderConfig, HFTokenizer
from model.instruct import main as instruct_main
from model.tasks.classification import calc_accuracy_loader, load_classifier
from model.weights.checkpoint import load_checkpoint, load_model_from_checkpoint
from model.weights.inference import load_for_inference
from tests.helpers.op_check import assert_close


def instruct_args(folders, kind: str, out, *extra: str) -> list[str]:
    # NOTE: --max-length 128 (the context): the tiny tokenizer spends ~60 tokens on the shared preamble.
    return ["--hf-dir", str(folders[kind]), "--data-file", str(folders["instructions"]), "--lr", "3e-3",
            "--batch-size", "2", "--eval-interval", "2", "--eval-iters", "1", "--max-length", "128",
            "--max-test-entries", "1", "--max-new-tokens", "3", "--no-sample", "--no-progress", "--out-dir", str(out),
            *extra]


def history(out) -> dict:
    return json.loads((out / "history.json").read_text())


def test_instruct_on_llama_learns_resumes_exactly_and_the_run_is_usable(decoder_folders, tmp_path, capsys):
    folders = decoder_folders
    assert instruct_main(instruct_args(folders, "llama", tmp_path / "full", "--max-steps", "4")) == 0
    assert instruct_main(instruct_args(folders, "llama", tmp_path / "part", "--max-steps", "2")) == 0
    assert instruct_main(["--resume", str(tmp_path / "part" / "checkpoint"), "--max-steps", "4"]) == 0
    full, resumed = history(tmp_path / "full"), history(tmp_path / "part")
    assert full["val_loss"][-1] < full["val_loss"][0] - 0.3, full["val_loss"]
    np.testing.assert_allclose(resumed["step_loss"], full["step_loss"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(resumed["val_loss"], full["val_loss"], rtol=0, atol=1e-6)

    # the checkpoint says it is a Llama; the run directory holds the folder's tokenizer
    run = tmp_path / "full"
    model, ckpt = load_model_from_checkpoint(run / "checkpoint")
    assert isinstance(ckpt.config, DecoderConfig) and ckpt.config.model_type == "llama" and ckpt.step == 4
    assert ckpt.extra["prompt_template"] == "alpaca"
    tokenizer = HFTokenizer.from_folder(run)
    eot = tokenizer.added_tokens["<|eot_id|>"]  # tokenizer_config.json's eos_token: ends and pads
    loaded = load_for_inference(run)
    assert loaded.chat.name == "alpaca" and loaded.chat.stop_ids == (eot,)
    prompt = loaded.chat.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                 {"role": "user", "content": "Bye"}])
    assert prompt[0] == tokenizer.added_tokens["<|begin_of_text|>"] and prompt.count(eot) == 1  # one ended reply
    capsys.readouterr()
    cli.main(["generate", "--checkpoint", str(run), "--prompt", "Name a color", "--max-new-tokens", "3"])
    assert "prompt template alpaca applied" in capsys.readouterr().err

    # exported back to the Hugging Face layout, transformers computes our logits
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    assert cli.main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    ids = np.asarray([prompt[:100]])  # (1, 100) within the 128-token context
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad(), engine.no_grad():
        assert_close(model(ids).numpy(), reference(torch.from_numpy(ids)).logits.numpy(), 1e-4, 1e-4, "exported")


def test_instruct_lora_on_qwen3_adapts_the_blocks_and_the_untied_head(decoder_folders, tmp_path):
    out = tmp_path / "lora"
    assert instruct_main(instruct_args(decoder_folders, "qwen3", out, "--max-steps", "2", "--lora-rank", "2")) == 0
    adapted = json.loads((out / "lora.json").read_text())["targets"]
    assert adapted[:7] == [f"layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                       "mlp.down_proj")]
    assert len(adapted) == 15 and adapted[-1] == "lm_head"
    model, ckpt = load_model_from_checkpoint(out / "checkpoint")  # merged: the plain names
    assert "layers.1.self_attn.q_proj.weight" in model.state_dict() and not ckpt.config.tie_weights
    assert len(json.loads((out / "instruction-data-with-response.json").read_text())) == 1


def test_instruct_on_the_triton_backend_takes_the_numpy_steps(decoder_folders, tmp_path):
    """The same two steps under the Triton interpreter: the kernels' losses are the NumPy twins'."""
    short = ["--max-steps", "2", "--max-length", "40", "--max-new-tokens", "1"]
    assert instruct_main(instruct_args(decoder_folders, "qwen3", tmp_path / "np", *short, "--backend", "numpy")) == 0
    assert instruct_main(instruct_args(decoder_folders, "qwen3", tmp_path / "tr", *short, "--backend", "triton")) == 0
    np.testing.assert_allclose(history(tmp_path / "tr")["step_loss"], history(tmp_path / "np")["step_loss"],
                               rtol=0, atol=1e-4)


def test_classify_on_qwen3_learns_and_reloads(decoder_folders, tmp_path, capsys):
    out = tmp_path / "classify"
    args = ["--hf-dir", str(decoder_folders["qwen3"]), "--train-all", "--lr", "3e-3", "--batch-size", "32",
            "--max-steps", "8", "--max-length", "16", "--eval-interval", "7", "--eval-iters", "2", "--no-progress",
            "--out-dir", str(out)]
    assert classify_main(args) == 0
    h = history(out)
    assert h["train_loss"][-1] < h["train_loss"][0], h["train_loss"]
    assert 0.6 < h["final_accuracy"]["val"] <= 1, h["final_accuracy"]  # chance is 0.5
    model, info = load_classifier(out / "checkpoint")
    assert isinstance(model.config, DecoderConfig)
    assert info["pad_token_id"] == HFTokenizer.from_folder(decoder_folders["qwen3"]).added_tokens["<|im_end|>"]
    assert load_checkpoint(out / "checkpoint").state_dict["classifier.weight"].shape == (2, 48)
    from model.data.spam import create_spam_loaders

    data = create_spam_loaders(HFTokenizer.from_folder(out), 128, info["max_length"], pad_token_id=info["pad_token_id"])
    assert calc_accuracy_loader(data.val_loader, model) == pytest.approx(h["final_accuracy"]["val"])
    capsys.readouterr()
    assert classify_main(["predict", "Call now to claim your free prize", "--checkpoint", str(out)]) == 0
    assert capsys.readouterr().out.split(" (")[0] in ("spam", "not spam")


def test_decoder_mistakes_are_one_line(decoder_folders, tmp_path, capsys):
    other = shutil.copytree(decoder_folders["llama"], tmp_path / "mistral")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    common = ["--data-file", str(decoder_folders["instructions"]), "--no-progress"]
    assert instruct_main(["--hf-dir", str(other), *common, "--out-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model_type 'mistral' is not supported" in err, err
    assert instruct_main(["--hf-dir", str(decoder_folders["llama"]), "--drop-rate", "0.1", *common,
                          "--out-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "llama model, which has no dropout" in err, err
    assert cli.main(["train", "--hf-dir", str(decoder_folders["llama"]), "--drop-rate", "0", "--no-progress",
                     "--out-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trains GPT-2 models only" in err, err
