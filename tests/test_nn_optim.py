"""nn modules, optimizers, clipping and schedules against torch."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import engine
from engine import functional as F
from engine import nn, optim
from tests.helpers.models import D, H, OurBlock, T, V


# --- the one-layer transformer's torch twin (ours: tests.helpers.models.OurBlock) ---
def torch_forward(p, ids):
    B, t = ids.shape
    x = p["tok.weight"][ids] + p["pos.weight"][torch.arange(t)]
    h = TF.layer_norm(x, (D,), p["ln1.weight"], p["ln1.bias"])
    qkv = TF.linear(h, p["qkv.weight"], p["qkv.bias"]).reshape(B, t, 3, H, D // H).permute(2, 0, 3, 1, 4)
    a = TF.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
    x = x + TF.linear(a.permute(0, 2, 1, 3).reshape(B, t, D), p["proj.weight"], p["proj.bias"])
    h = TF.layer_norm(x, (D,), p["ln2.weight"], p["ln2.bias"])
    h = TF.gelu(TF.linear(h, p["mlp.0.weight"], p["mlp.0.bias"]), approximate="tanh")
    x = x + TF.linear(h, p["mlp.2.weight"], p["mlp.2.bias"])
    return TF.linear(x, p["head.weight"])


def test_one_layer_transformer_trains_like_torch_for_50_steps():
    engine.manual_seed(0)
    model = OurBlock().to("float64")
    params = {k: torch.tensor(v, requires_grad=True) for k, v in model.state_dict().items()}
    ours_opt = optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    torch_opt = torch.optim.AdamW(params.values(), lr=3e-3, weight_decay=0.1)
    # torch's optimizer must walk the same parameters in the same order
    assert list(params) == [name for name, _ in model.named_parameters()]
    rng = np.random.default_rng(0)
    ours_losses, torch_losses = [], []
    for _ in range(50):
        ids = rng.integers(0, V, size=(3, T))
        targets = (ids * 3 + 1) % V  # a learnable rule
        loss = F.cross_entropy(model(ids), targets)
        ours_opt.zero_grad()
        loss.backward()
        optim.clip_grad_norm_(model.parameters(), 1.0)
        ours_opt.step()
        ours_losses.append(loss.item())

        ref = TF.cross_entropy(
            torch_forward(params, torch.tensor(ids)).reshape(-1, V), torch.tensor(targets).reshape(-1)
        )
        torch_opt.zero_grad()
        ref.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        torch_opt.step()
        torch_losses.append(ref.item())
    np.testing.assert_allclose(ours_losses, torch_losses, atol=1e-5, rtol=0)
    assert ours_losses[-1] < ours_losses[0] - 0.3  # it actually learned something
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(value, params[name].detach().numpy(), atol=1e-6, err_msg=name)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_over_100_steps(weight_decay):
    rng = np.random.default_rng(0)
    init = [rng.standard_normal((4, 3)), rng.standard_normal(3)]
    ours = [nn.Parameter(a.copy(), dtype="float64") for a in init]
    ref = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    o_opt = optim.AdamW(ours, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    t_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    for _ in range(100):
        grads = [rng.standard_normal(a.shape) for a in init]
        for p, g in zip(ours, grads):
            p.grad = g.copy()
        for p, g in zip(ref, grads):
            p.grad = torch.tensor(g)
        o_opt.step()
        t_opt.step()
    for p, r in zip(ours, ref):
        np.testing.assert_allclose(p.numpy(), r.detach().numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=0.01), {}])
def test_sgd_matches_torch(kwargs):
    rng = np.random.default_rng(1)
    init = rng.standard_normal(5)
    ours = nn.Parameter(init.copy(), dtype="float64")
    ref = torch.tensor(init.copy(), requires_grad=True)
    o_opt, t_opt = optim.SGD([ours], lr=0.1, **kwargs), torch.optim.SGD([ref], lr=0.1, **kwargs)
    for _ in range(20):
        g = rng.standard_normal(5)
        ours.grad, ref.grad = g.copy(), torch.tensor(g)
        o_opt.step()
        t_opt.step()
    np.testing.assert_allclose(ours.numpy(), ref.detach().numpy(), atol=1e-12)


def test_optimizer_state_round_trips():
    p = nn.Parameter(np.ones(3), dtype="float64")
    opt = optim.AdamW([p], lr=0.1)
    p.grad = np.array([1.0, -1.0, 0.5])
    opt.step()
    state = opt.state_dict()
    q = nn.Parameter(np.ones(3), dtype="float64")
    opt2 = optim.AdamW([q], lr=0.5)
    opt2.load_state_dict(state)
    assert opt2.step_count == 1 and opt2.lr == 0.1
    np.testing.assert_array_equal(opt2.exp_avg[0], opt.exp_avg[0])
    with pytest.raises(ValueError, match="does not match this optimizer"):
        optim.AdamW([q, nn.Parameter(np.ones(2))]).load_state_dict(state)


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal((3, 4)), rng.standard_normal(7)]
    ours = [nn.Parameter(np.zeros(g.shape), dtype="float64") for g in grads]
    ref = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for p, r, g in zip(ours, ref, grads):
        p.grad, r.grad = g.copy(), torch.tensor(g)
    norm = optim.clip_grad_norm_(ours, 0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    assert norm == pytest.approx(ref_norm.item())
    for p, r in zip(ours, ref):
        np.testing.assert_allclose(p.grad, r.grad.numpy(), rtol=1e-12)


def test_warmup_cosine_schedule():
    lrs = [
        optim.warmup_cosine_lr(s, 1.0, warmup_steps=10, total_steps=110, initial_lr=0.1, min_lr=0.01)
        for s in range(111)
    ]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.55)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.0)
    sched = optim.WarmupCosineSchedule(opt, 1.0, 10, 110, initial_lr=0.1, min_lr=0.01)
    for _ in range(5):
        sched.step()
    assert opt.lr == pytest.approx(0.55)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan"), float("inf"), None])
def test_clip_grad_norm_rejects_a_bad_max_norm(max_norm):
    p = nn.Parameter(np.zeros(3))
    p.grad = np.ones(3)
    with pytest.raises(ValueError, match=rf"max_norm must be a finite number > 0, got {max_norm}"):
        optim.clip_grad_norm_([p], max_norm)
    np.testing.assert_array_equal(p.grad, np.ones(3))  # untouched


@pytest.mark.parametrize("change, message", [
    ({"peak_lr": 0.0}, "peak_lr must be a finite number > 0, got 0.0"),
    ({"peak_lr": float("nan")}, "peak_lr must be a finite number > 0, got nan"),
    ({"min_lr": -1.0}, r"min_lr must be a finite number in \[0, peak_lr=1.0\], got -1.0"),
    ({"min_lr": 2.0}, "min_lr must be .* got 2.0"),
    ({"initial_lr": float("inf")}, "initial_lr must be .* got inf"),
    ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0, got -1"),
    ({"total_steps": 0}, "total_steps must be an integer >= 1, got 0"),
    ({"total_steps": 2.5}, "total_steps must be an integer >= 1, got 2.5"),
    ({"step": -1}, "step must be an integer >= 0, got -1"),
])
def test_schedule_rejects_bad_settings(change, message):
    kwargs = dict(step=0, peak_lr=1.0, warmup_steps=2, total_steps=10, initial_lr=0.0, min_lr=0.1)
    with pytest.raises(ValueError, match=f"warmup_cosine_lr: {message}"):
        optim.warmup_cosine_lr(**{**kwargs, **change})
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.0)
    kwargs.pop("step")
    if "step" not in change:
        with pytest.raises(ValueError, match=message):
            optim.WarmupCosineSchedule(opt, **{**kwargs, **change})


def test_module_registration_and_parameters():
    m = OurBlock()
    names = [n for n, _ in m.named_parameters()]
    assert names[:3] == ["tok.weight", "pos.weight", "ln1.weight"]
    assert "mlp.0.weight" in names and "head.bias" not in names
    assert m.num_parameters() == sum(p.size for p in m.parameters())
    m.eval()
    assert all(not sub.training for sub in m.modules())
    m.train()
    assert all(sub.training for sub in m.modules())
    m.requires_grad_(False)
    assert m.num_parameters(trainable_only=True) == 0


@pytest.mark.parametrize("mode", [True, False])
def test_evaluating_restores_the_mode_also_after_an_error(mode):
    m = OurBlock().train(mode)
    with m.evaluating() as same:
        assert same is m and not any(sub.training for sub in m.modules())
    assert all(sub.training == mode for sub in m.modules())
    with pytest.raises(RuntimeError), m.evaluating():
        raise RuntimeError("inside")
    assert all(sub.training == mode for sub in m.modules())


def test_tied_weights_are_one_parameter_but_two_state_dict_keys():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

    m = Tied()
    assert len(m.parameters()) == 1
    assert set(m.state_dict()) == {"emb.weight", "out.weight"}


def test_load_state_dict_errors_name_the_keys_and_leave_the_model_unchanged():
    m = nn.Linear(3, 2)
    before = m.state_dict()
    with pytest.raises(KeyError, match=r"missing keys: bias"):
        m.load_state_dict({"weight": np.zeros((2, 3))})
    with pytest.raises(KeyError, match=r"unexpected keys: extra"):
        m.load_state_dict({**before, "extra": np.zeros(1)})
    with pytest.raises(KeyError, match=r"shape mismatch for weight: checkpoint has \(3, 2\), model has \(2, 3\)"):
        m.load_state_dict({"weight": np.zeros((3, 2)), "bias": np.zeros(2)})
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    m.load_state_dict({"weight": np.ones((2, 3)), "bias": np.zeros(2)})
    np.testing.assert_array_equal(m.weight.numpy(), np.ones((2, 3), dtype=np.float32))
    assert m.weight.dtype == np.float32


def test_linear_and_layernorm_match_torch_modules():
    m = nn.Linear(5, 4)
    x = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    ref = torch.nn.Linear(5, 4)
    ref.load_state_dict({k: torch.tensor(v) for k, v in m.state_dict().items()})
    np.testing.assert_allclose(m(engine.tensor(x)).numpy(), ref(torch.tensor(x)).detach().numpy(), atol=1e-6)
    bound = 1 / math.sqrt(5)  # torch's default init range
    assert np.abs(m.weight.numpy()).max() <= bound


def test_dropout_module_follows_train_and_eval():
    d = nn.Dropout(0.5)
    x = engine.ones(100)
    assert (d(x).numpy() == 0).any()
    d.eval()
    np.testing.assert_array_equal(d(x).numpy(), 1.0)
