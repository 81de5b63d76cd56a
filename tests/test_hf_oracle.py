"""Our GPT-2 loader and exporter against Hugging Face ``transformers`` itself, an oracle we did not
write: if our model and bench/torch_gpt.py read a checkpoint the same wrong way, this still fails."""

import numpy as np
import pytest
import torch

import engine
from model.config import get_config
from model.gpt import GPTModel
from model.lora import apply_lora, merge_lora
from model.weights.hf import export_hf, load_hf_gpt2
from tests.helpers.op_check import assert_close

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")

V, C, E, H, L = 71, 16, 32, 4, 2
IDS = np.random.default_rng(1).integers(0, V, size=(2, C))
# float32 on both sides; only the order of the sums differs.
ATOL = RTOL = 1e-4


def hf_logits(hf_model) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(IDS)).logits.numpy()  # (B, T, V)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_checkpoint_loads_with_our_loader(tmp_path, tied):
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=V, n_positions=C, n_embd=E, n_head=H, n_layer=L,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # random LayerNorm and bias values, so a misread one cannot hide behind 1 or 0
        for name, p in hf_model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()

    ours = load_hf_gpt2(tmp_path)
    assert ours.config.tie_weights == tied
    assert_close(ours(IDS).numpy(), hf_logits(hf_model), ATOL, RTOL, "logits: ours vs transformers")


@pytest.mark.parametrize("head", [
    "tied",
    "untied",
    # a tied head that merge_lora untied: the config still says tied, the weights do not
    "untied_by_lora_merge",
])
def test_our_export_loads_in_transformers(tmp_path, head):
    engine.manual_seed(0)
    config = get_config("tiny", vocab_size=V, context_length=C, emb_dim=E, n_heads=H, n_layers=L, drop_rate=0.0,
                        qkv_bias=True, tie_weights=head != "untied")
    model = GPTModel(config)
    if head == "untied_by_lora_merge":
        apply_lora(model, rank=2, alpha=4, targets=["lm_head"])
        model.lm_head.lora_B.data = np.ones_like(model.lm_head.lora_B.data)
        merge_lora(model)
    tied = head == "tied"
    # an untied head is not the embedding, so exporting the wrong one shows in the logits
    assert np.allclose(model.lm_head.weight.numpy(), model.wte.weight.numpy()) == tied
    export_hf(model, tmp_path)

    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf_model.config.tie_word_embeddings == tied
    assert_close(hf_logits(hf_model), model(IDS).numpy(), ATOL, RTOL, "logits: transformers vs ours")
