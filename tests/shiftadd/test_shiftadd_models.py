"""Blocks of vitkernels.models.shiftadd against an eager transcription, in float64, of ShiftAddViT's
official forward (pvt_v2.py's LinAngularAttention_binary and Block, fmoe_fc.py's PyTorchFMoE_FC and
Mlp_FMoE, fmoe_new.py's NaiveGate, NoisyGate and SparseDispatcher) with the same weights; state-dict
names; torch.compile(fullgraph=True) of a block.

The shift expert is a factory argument of the MoE layers. Most tests give them an nn.Linear, since the
experts' own arithmetic is not what they check (the routing, dispatch and combine are); the default
expert, a trainable ShiftLinear frozen to 4-bit shift codes, has tests of its own at the end."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import vitkernels  # noqa: F401
from vitkernels.models import shiftadd as sa
from vitkernels.models.lowbit import ShiftLinear
from vitkernels.reference import shiftadd as ref

from attention_checks import close_to, randomize


def linear_expert(i, o, bias):
    return nn.Linear(i, o, bias=bias)


# ---------------------------------------------------------------- the official forward, transcribed
def official_attention(m, x, H, W):
    B, N, C = x.shape
    qkv = m.qkv(x).reshape(B, N, 3, m.num_heads, C // m.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    binary_q_no_grad = torch.gt(q - q.mean(), 0).type(q.dtype)
    cliped_q = torch.clamp(q, 0, 1.0)
    q = binary_q_no_grad.detach() - cliped_q.detach() + cliped_q
    binary_k_no_grad = torch.gt(k - k.mean(), 0).type(k.dtype)
    cliped_k = torch.clamp(k, 0, 1.0)
    k = binary_k_no_grad.detach() - cliped_k.detach() + cliped_k
    dconv_v = m.dconv(v)
    attn = k.transpose(-2, -1) @ v
    x = 0.5 * v + 1.0 / math.pi * (q @ attn)
    x = x / x.norm(dim=-1, keepdim=True)
    x += dconv_v
    x = x.transpose(1, 2).reshape(B, N, C)
    return m.proj(x)


def official_naive_gates(g, inp):
    gate = g.gate(inp)
    _, idx = torch.sort(gate, dim=-1, descending=True)
    top = idx[:, :1]
    return torch.zeros_like(gate).scatter(1, top, torch.ones_like(top, dtype=gate.dtype))


def official_moe_fc(m, inp):
    B, N, C = inp.shape
    inp = inp.reshape(-1, m.d_model)
    out = ref.sparse_dispatcher_moe(inp, official_naive_gates(m.gate, inp), m.experts)
    return out.reshape(B, N, m.d_hidden)


def official_mlp(m, x, H, W):
    x = official_moe_fc(m.fc1, x)
    x = m.act(m.dwconv(x, H, W))
    return official_moe_fc(m.fc2, x)


def official_block(m, x, H, W):
    x = x + official_attention(m.attn, m.norm1(x), H, W)
    return x + official_mlp(m.mlp, m.norm2(x), H, W)


def _randomized(module):
    return randomize(module, 0.3)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("heads,N", [(1, 49), (2, 15), (5, 7)])
def test_attention_matches_official(heads, N):
    m = _randomized(sa.LinAngularAttention_binary(10 * heads, num_heads=heads, qkv_bias=True))
    x = torch.randn(2, N, 10 * heads)
    expect = official_attention(copy.deepcopy(m).double(), x.double(), N, 1)
    close_to(m(x, N, 1), expect, 2e-5)
    m.use_reference = True
    close_to(m.double()(x.double(), N, 1), expect, 1e-12)


def test_attention_gradients_match_official():
    m = _randomized(sa.LinAngularAttention_binary(32, num_heads=2, qkv_bias=True)).double()
    x = torch.randn(2, 21, 32, dtype=torch.float64, requires_grad=True)
    m(x, 21, 1).square().sum().backward()
    got = [x.grad] + [p.grad for p in m.parameters()]
    m2 = copy.deepcopy(m)
    m2.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    official_attention(m2, x2, 21, 1).square().sum().backward()
    for g, e in zip(got, [x2.grad] + [p.grad for p in m2.parameters()]):
        close_to(g, e, 1e-10)


def test_moe_fc_matches_sparse_dispatcher():
    m = _randomized(sa.PyTorchFMoE_FC(12, 20, shift_expert=linear_expert)).double()
    x = torch.randn(3, 17, 12, dtype=torch.float64)
    out = m(x)
    close_to(out, official_moe_fc(m, x), 1e-10)
    routed = m.gate.gate(x.reshape(-1, 12)).argmax(-1)
    assert abs(m.gate.shift_ratio - float(routed.double().mean())) < 1e-6


def test_block_and_stage_match_official_with_gradients():
    blk = _randomized(sa.Block(16, 2, mlp_ratio=2.0, qkv_bias=True, shift_expert=linear_expert)).double()
    x = torch.randn(2, 35, 16, dtype=torch.float64, requires_grad=True)
    out = blk(x, 5, 7)
    expect = official_block(blk, x, 5, 7)
    close_to(out, expect, 1e-10)
    gx, = torch.autograd.grad(out.square().sum(), x)
    ex, = torch.autograd.grad(expect.square().sum(), x)
    close_to(gx, ex, 1e-9, "grad x")
    stage = _randomized(sa.pvt_v2_b0_stage(2, linear_expert)).double()
    img = torch.randn(2, 32, 14, 10, dtype=torch.float64)
    y = stage(img)
    assert y.shape == (2, 64, 7, 5)
    s64 = stage
    t, H, W = s64.patch_embed(img)
    for b in s64.block:
        t = official_block(b, t, H, W)
    close_to(y, s64.norm(t).reshape(2, H, W, -1).permute(0, 3, 1, 2), 1e-10)


def test_noisy_gate_routes_and_sets_its_loss():
    torch.manual_seed(1)
    g = sa.NoisyGate(8, 2)
    x = torch.randn(40, 8)
    torch.manual_seed(7)
    index, gate = g.route(x)
    # The official computation with the same noise draw.
    torch.manual_seed(7)
    clean = x @ g.w_gate
    std = nn.functional.softplus(x @ g.w_noise) + 1e-2
    noisy = clean + torch.randn_like(clean) * std
    top, idx = noisy.topk(2, dim=1)
    assert torch.equal(index, idx[:, 0]) and torch.equal(gate, torch.ones(40))
    gates = torch.zeros_like(clean).scatter(1, idx[:, :1], torch.ones(40, 1))
    normal = torch.distributions.Normal(0.0, 1.0)
    prob = torch.where(noisy > top[:, 1:2], normal.cdf((clean - top[:, 1:2]) / std),
                       normal.cdf((clean - top[:, 0:1]) / std))
    load, importance = prob.sum(0), gates.sum(0)
    load[0], load[1] = load[0] * 6, load[1] * 4
    importance[0], importance[1] = importance[0] * 6, importance[1] * 4
    expect = importance.var() / (importance.mean() ** 2 + 1e-10) + load.var() / (load.mean() ** 2 + 1e-10)
    close_to(g.get_loss(), expect, 1e-6)
    assert g.get_loss() is None
    assert abs(g.shift_ratio - float((index != 0).float().mean())) < 1e-7


def test_state_dict_names():
    blk = sa.Block(32, 1, mlp_ratio=8.0, qkv_bias=True, shift_expert=linear_expert)
    keys = set(blk.state_dict())
    for name in ["norm1.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.dconv.weight",
                 "norm2.bias", "mlp.fc1.gate.gate.weight", "mlp.fc1.experts.0.weight", "mlp.fc1.experts.1.weight",
                 "mlp.dwconv.dwconv.weight", "mlp.fc2.gate.gate.bias", "mlp.fc2.experts.0.bias"]:
        assert name in keys, name
    assert blk.attn.dconv.weight.shape == (1, 1, 9, 1)
    noisy = sa.PyTorchFMoE_FC(8, 4, gate=sa.NoisyGate, shift_expert=linear_expert)
    assert {"gate.w_gate", "gate.w_noise"} <= set(noisy.state_dict())


def test_compile_fullgraph_attention():
    m = _randomized(sa.LinAngularAttention_binary(16, num_heads=2, qkv_bias=True))
    x = torch.randn(2, 35, 16, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True)(x, 5, 7)
    out.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    expect = m(x2, 5, 7)
    expect.square().sum().backward()
    close_to(out, expect, 1e-5)
    close_to(x.grad, x2.grad, 1e-4, "grad x")
    torch._dynamo.reset()


def test_bad_configuration():
    with pytest.raises(ValueError, match="^shift_expert:"):
        sa.PyTorchFMoE_FC(8, 4, shift_expert="ShiftLinear")
    with pytest.raises(ValueError, match="^top_k:"):
        sa.NaiveGate(8, 2, top_k=2)
    with pytest.raises(ValueError, match="^dim:"):
        sa.LinAngularAttention_binary(10, num_heads=3)


# ---------------------------------------------------------------- the default shift expert
def _shift_stage(i, **kw):
    """A PVTv2-b0 stage with the default experts, their powers of two spread over every exponent and sign."""
    torch.manual_seed(i)
    stage = sa.pvt_v2_b0_stage(i, **kw)
    with torch.no_grad():
        for name, p in stage.named_parameters():
            if name.endswith("experts.1.shift"):
                p.uniform_(-6.4, 0.4)
            elif name.endswith("experts.1.sign"):
                p.uniform_(-1.5, 1.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif not name.endswith("experts.1.bias"):
                p.normal_(0, 0.3)
    return stage


def test_default_shift_expert_is_a_trainable_shift_linear():
    m = sa.PyTorchFMoE_FC(16, 24)
    e = m.experts[1]
    assert isinstance(e, ShiftLinear) and e.shift is not None and e.shift.requires_grad
    assert {"experts.1.shift", "experts.1.sign", "experts.1.bias", "experts.1.w_scale"} <= set(m.state_dict())
    assert e.weight().abs().max() > 0                      # rounded from nn.Linear's init, not zeros
    x = torch.randn(2, 9, 16, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad.abs().sum() > 0
    if m.shift_ratio > 0:                                  # straight-through rounding: both get gradients
        assert e.shift.grad is not None and e.sign.grad is not None


@pytest.mark.parametrize("i,HW", [(2, (14, 10)), (4, (6, 6))])
def test_frozen_stage_matches_trainable_and_official(i, HW):
    stage = _shift_stage(i)
    c_in = 3 if i == 1 else sa.PVT_V2_B0["embed_dims"][i - 2]
    img = torch.randn(2, c_in, *HW)
    trained = stage(img)
    # The eager transcription of the official blocks, in float64, with the trainable experts' weights.
    official = copy.deepcopy(stage).double()
    t, H, W = official.patch_embed(img.double())
    for b in official.block:
        t = official_block(b, t, H, W)
    want = official.norm(t).reshape(2, H, W, -1).permute(0, 3, 1, 2)
    close_to(trained, want, 2e-4, "trainable")
    ratio = stage.shift_ratio
    assert ratio is not None and 0.0 < ratio < 1.0          # both experts have tokens
    frozen = sa.freeze_shift_experts(copy.deepcopy(stage))
    experts = [m for m in frozen.modules() if isinstance(m, ShiftLinear)]
    assert len(experts) == 2 * 2 and all(e.shift is None and e.w_packed.dtype == torch.uint8 for e in experts)
    assert not any(n.endswith((".shift", ".sign")) for n in frozen.state_dict())
    got = frozen(img)
    close_to(got, trained, 2e-4, "frozen vs trainable")
    close_to(got, want, 2e-4, "frozen vs official")
    assert frozen.shift_ratio == pytest.approx(ratio)


def test_frozen_expert_runs_the_shift_linear_op(monkeypatch):
    m = sa.freeze_shift_experts(sa.PyTorchFMoE_FC(16, 24))
    from vitkernels.ops import lowbit
    calls = []
    real = lowbit.shift_linear

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(lowbit, "shift_linear", spy)
    x = torch.randn(3, 11, 16)
    m(x)
    shifted = int(round(m.shift_ratio * 33))
    assert calls == [torch.Size([shifted, 16])]


@pytest.mark.parametrize("freeze", [False, True], ids=["trainable", "frozen"])
def test_compile_fullgraph_moe_layers(freeze):
    torch.manual_seed(3)
    mlp = _randomized(sa.Mlp_FMoE(16, 48, gate=sa.NaiveGate))
    if freeze:
        sa.freeze_shift_experts(mlp)
    x = torch.randn(2, 35, 16, requires_grad=not freeze)
    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True)
    out = compiled(x, 5, 7)
    close_to(out, mlp(x, 5, 7), 1e-5)
    if not freeze:
        out.square().sum().backward()
        x2 = x.detach().clone().requires_grad_(True)
        mlp(x2, 5, 7).square().sum().backward()
        close_to(x.grad, x2.grad, 1e-4, "grad x")
    torch._dynamo.reset()
