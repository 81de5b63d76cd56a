"""`scratchgpt export`: a Hugging Face folder that transformers loads with our logits and our
tokens, and a weights-only checkpoint that the commands take and --resume refuses."""

import numpy as np
import pytest

import engine
from engine import functional as F
from engine import optim
from model import cli
from model.config import GPTConfig
from model.gpt import GPTModel
from model.tokenizers.gpt2 import encode_text, gpt2_tokenizer
from model.weights.checkpoint import (
    CheckpointNotFoundError,
    checkpoint_paths,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)

# GPT-2's vocabulary (the tokenizer files must fit it), a tiny body; untied so the head is exported too.
CONFIG = GPTConfig(context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0, tie_weights=False)
TEXT = "Every effort moves you, <|endoftext|> naïve café 12345"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory whose checkpoint holds AdamW state after two steps."""
    engine.manual_seed(3)
    model = GPTModel(CONFIG)
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(2, 9))
    for _ in range(2):
        loss = F.cross_entropy(model(ids[:, :-1]), ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("run")
    save_checkpoint(out / "checkpoint", model, CONFIG, opt, step=2,
                    extra={"train_state": {"step": 2}, "train_args": {"batch_size": 2}, "prompt_template": "alpaca"})
    return out


def test_a_run_directory_means_its_latest_checkpoint_and_best_is_checked(run_dir):
    assert resolve_checkpoint(run_dir) == run_dir / "checkpoint"
    assert resolve_checkpoint(run_dir / "checkpoint.safetensors") == run_dir / "checkpoint"
    with pytest.raises(CheckpointNotFoundError, match="no best checkpoint"):
        resolve_checkpoint(run_dir, best=True)


def test_weights_only_drops_the_optimizer_keeps_the_weights_and_cannot_resume(run_dir, tmp_path, capsys):
    assert cli.main(["export", str(run_dir), "--weights-only", str(tmp_path / "w")]) == 0
    full, small = load_checkpoint(run_dir), load_checkpoint(tmp_path / "w")
    assert full.optimizer_state is not None and small.optimizer_state is None
    assert small.step == 2 and small.extra == {"train_args": {"batch_size": 2}, "prompt_template": "alpaca"}
    assert small.state_dict.keys() == full.state_dict.keys()
    for name, value in full.state_dict.items():
        np.testing.assert_array_equal(small.state_dict[name], value, err_msg=name)
    size = lambda base: checkpoint_paths(base)[0].stat().st_size  # noqa: E731
    assert size(tmp_path / "w") < 0.4 * size(run_dir / "checkpoint")  # AdamW keeps two more copies
    # generate takes it and writes what the full checkpoint writes
    outputs = []
    for source in (run_dir, tmp_path / "w"):
        capsys.readouterr()
        assert cli.main(["generate", "--checkpoint", str(source), "--prompt", "Hello", "--max-new-tokens", "5",
                         "--backend", "numpy"]) in (0, None)
        outputs.append(capsys.readouterr().out.splitlines()[0])
    assert outputs[0] == outputs[1]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--resume", str(tmp_path / "w")])
    assert exit_info.value.code == 2 and "holds no training state" in capsys.readouterr().err


def test_hf_export_loads_in_transformers_with_our_logits_and_tokens(run_dir, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")
    torch = pytest.importorskip("torch")
    out = tmp_path / "hf"
    assert cli.main(["export", str(run_dir), "--to", "hf", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "vocab.json", "merges.txt",
                                               "tokenizer_config.json", "special_tokens_map.json",
                                               "generation_config.json"}
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)

    ids = encode_text(gpt2_tokenizer(), TEXT)
    assert hf_tokenizer(TEXT)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == TEXT and hf_tokenizer.eos_token_id == 50256
    ours = load_checkpoint(run_dir)
    model = GPTModel(CONFIG)
    model.load_state_dict(ours.state_dict)
    with engine.no_grad():
        expected = model(np.asarray([ids])).numpy()  # (1, T, V)
    with torch.no_grad():
        got = hf_model(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)  # float32 both sides, sums in another order


def test_export_errors_are_one_line(run_dir, tmp_path, capsys):
    assert cli.main(["export", str(run_dir), "--best", "--to", "hf", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: run directory")
    assert cli.main(["export", str(tmp_path / "nothing"), "--to", "hf", str(tmp_path / "x")]) == 2
    assert "missing" in capsys.readouterr().err
