"""Whole-model forward at 224 px, batch 8: DeiT-S and ViT-B/16 (vitkernels.models.vision_transformer,
timm's architecture and init), fp32 weights from a fixed seed, inputs drawn like normalized images.

Contenders, on the same model and inputs:
  vitk      W8A8 + quantized attention: quantize_(model, Int8DynamicConfig(attn_bits=4)) after calibrate
            on one batch (Int8Linear on the VNNI kernels, quant_attention with RepQ-ViT's 4-bit log√2
            softmax quantizer)
  eager     the fp32 model with eager attention (use_reference=True: softmax(q k^T) v)
  compile   torch.compile of that fp32 model
  peer      bf16 autocast of the fp32 eager model
  peer2     the simulated-quant model (quantize_(..., simulate=True): the papers' fake-quant graph)
  peer3     fbgemm/x86 dynamic quantization of the linear layers (torch.ao.quantization.quantize_dynamic,
            qint8), fp32 eager attention

Swin-T (vitkernels.models.window_attention.swin_t, timm's architecture), 224 px, batch 8:
  vitk      W8A8: quantize_(model, Int8DynamicConfig()): every linear layer on the VNNI kernels; the
            windowed attention stays the float fused window_attention (quant_attention has no window form)
  eager     the fp32 model with each block's attention run by the eager reference (timm's partition,
            q k^T + bias + shift mask, softmax, @ v, reverse), and torch.compile of it
  peer4     the fp32 model with vitk's fused window attention only (vitkernels.convert_'s result)
  bf16 autocast, the simulated-quant model and fbgemm dynamic quantization as for the ViTs.

ViT-B training step (forward + backward, fp32): vitk is the model with the fused attention op
(reduced_attention, autograd through its CPU backward), eager the same weights with eager attention;
the inference-only contenders skip it.

Check: every contender's logits against the fp32 model's in float64: cosine similarity >= 0.99 (the
quantized ones are not meant to equal fp32; the JSON records the cosine); the training step also checks
the input gradient. FLOPs: the linear layers' and attention's matmuls (2 per multiply-add; three times
the forward for a training step); bytes: the fp32 weights once.
"""
import types

import pytest
import torch
import torch.nn as nn

from harness import Case, Family, Peer

BATCH = 8
COS_MIN = 0.99
MODELS = {"DeiT-S": (384, 6), "ViT-B": (768, 12)}


def _flops(dim, heads, N=197, depth=12, mlp=4):
    per_block = 2 * N * (3 * dim * dim + dim * dim + 2 * mlp * dim * dim) + 4 * N * N * dim
    return BATCH * (depth * per_block + 2 * 196 * 768 * dim)


def _swin_t_flops():
    """Swin-T at 224: per block 12 d^2 MACs per token in its linear layers and 2 * 49 * d in windowed
    attention; patch embedding, the three patch mergings (each of a stage's tokens from 4 tokens of width
    d/2 of the stage before, 2d -> d) and the head."""
    macs = 56 * 56 * 48 * 96 + 768 * 1000
    for i, (depth, side) in enumerate(zip((2, 2, 6, 2), (56, 28, 14, 7))):
        d, tokens = 96 << i, side * side
        macs += depth * tokens * (12 * d * d + 2 * 49 * d)
        if i:
            macs += tokens * 4 * (d // 2) * d
    return 2.0 * BATCH * macs


SWIN_T_PARAMS = 28.3e6


def _case(name, train=False):
    dim, heads = MODELS[name]
    params = 12 * (12 * dim * dim) + 768 * dim
    return Case(name=f"{name}-{'train' if train else 'fwd'}", shape=f"B={BATCH} 224px dim={dim} heads={heads}",
                params=dict(model=name, train=train), flops=float(_flops(dim, heads)) * (3 if train else 1),
                bytes=4.0 * params, backward=train)


CASES = [_case("DeiT-S"), _case("ViT-B"),
         Case(name="Swin-T-fwd", shape=f"B={BATCH} 224px dims 96-768 window 7", params=dict(model="Swin-T"),
              flops=_swin_t_flops(), bytes=4.0 * SWIN_T_PARAMS),
         _case("ViT-B", train=True)]


def _eager_window_forward(self, x, shift_size=(0, 0)):
    from vitkernels.reference.window_attention import window_attention
    qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))
    q, k, v = qkv.unbind(-3)
    out = window_attention(q, k, v, self.window_size, shift_size, self.relative_position_bias_table, self.scale)
    return self.proj_drop(self.proj(out.flatten(-2)))


def _build(case, use_reference):
    torch.manual_seed(0)
    if case.params["model"] == "Swin-T":
        from vitkernels.models import window_attention as wa
        m = wa.swin_t().eval()
        if use_reference:
            for mod in m.modules():
                if isinstance(mod, wa.WindowAttention):
                    mod.forward = types.MethodType(_eager_window_forward, mod)
        return m
    from vitkernels.models import vision_transformer as vt
    fn = vt.deit_small_patch16_224 if case.params["model"] == "DeiT-S" else vt.vit_base_patch16_224
    m = fn(use_reference=use_reference)
    return m.train() if case.params.get("train") else m.eval()


def make_inputs(case, gen):
    x = torch.randn(BATCH, 3, 224, 224, generator=gen)
    if not case.params.get("train"):
        return {"x": x}
    return {"x": x.requires_grad_(), "grad_out": torch.randn(BATCH, 1000, generator=gen)}


def _training_step(m):
    """The model's forward with its parameters' gradients cleared first (the harness clears only the
    inputs'), so every timed backward writes them afresh as a training step does."""
    params = list(m.parameters())

    def call(x):
        for p in params:
            p.grad = None
        return m(x)
    return call


def _inference_only(case):
    if case.params.get("train"):
        pytest.skip("an inference contender: the training step compares fp32 vitk ops with fp32 eager only")


def _quantized(case, x, simulate):
    from vitkernels import quant
    if case.params["model"] == "Swin-T":
        # The vitk Swin (fused window attention, which quantize_ keeps float) with int8 linear layers.
        m = _build(case, use_reference=False)
        quant.quantize_(m, quant.Int8DynamicConfig(), simulate=simulate)
        return m
    m = _build(case, use_reference=True)
    state = quant.calibrate(m, [x["x"][:2]])
    quant.quantize_(m, quant.Int8DynamicConfig(attn_bits=4), state, simulate=simulate)
    return m


def vitk(case, x):
    if case.params.get("train"):
        return _training_step(_build(case, use_reference=False)), (x["x"],), {}
    m = _quantized(case, x, simulate=False)
    return torch.no_grad()(m), (x["x"],), {}


def reference(case, x):
    if case.params.get("train"):
        return _training_step(_build(case, use_reference=True)), (x["x"],), {}
    return torch.no_grad()(_build(case, use_reference=True)), (x["x"],), {}


def _bf16(case, x):
    _inference_only(case)
    m = _build(case, use_reference=True)

    @torch.no_grad()
    def call():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x["x"]).float()
    return call


def _simulated(case, x):
    _inference_only(case)
    m = _quantized(case, x, simulate=True)
    return lambda: torch.no_grad()(m)(x["x"])


def _fbgemm(case, x):
    _inference_only(case)
    m = torch.ao.quantization.quantize_dynamic(_build(case, use_reference=True), {nn.Linear}, dtype=torch.qint8)
    return lambda: torch.no_grad()(m)(x["x"])


def _fused_fp32(case, x):
    if case.params["model"] != "Swin-T":
        pytest.skip("the ViT rows time the fused fp32 attention as the training step and inside W8A8")
    m = _build(case, use_reference=False)
    return lambda: torch.no_grad()(m)(x["x"])


PEERS = (Peer(name="bf16-autocast", label=lambda: "bf16 autocast (eager)", setup=_bf16),
         Peer(name="simulated-quant", label=lambda: "simulated W8A8 + 4-bit log√2 attention (references)",
              setup=_simulated),
         Peer(name="fbgemm-dynamic", label=lambda: f"torch.ao quantize_dynamic qint8 ({torch.backends.quantized.engine})",
              setup=_fbgemm),
         Peer(name="vitk-fp32", label=lambda: "fp32 with vitk's fused attention only (convert_)", setup=_fused_fp32))


def check(case, x, contender, out, cache):
    if "fp32" not in cache:
        with torch.no_grad():
            cache["fp32"] = _build(case, use_reference=True)(x["x"]).double()
    if case.params.get("train"):
        (logits, (grad_x,)) = out
        facts = _compare("logits", logits, cache["fp32"])
        if "fp32_grad" not in cache:
            xr = x["x"].detach().double().requires_grad_()
            m = _build(case, use_reference=True).double()
            m(xr).backward(x["grad_out"].double())
            cache["fp32_grad"] = xr.grad
        facts.update(_compare("grad_x", grad_x, cache["fp32_grad"]))
        return facts
    return _compare("logits", out, cache["fp32"])


def _compare(what, got, want):
    got = got.double()
    cos = float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0))
    assert cos >= COS_MIN, f"{what}: cosine similarity to fp32 {cos:.4f} < {COS_MIN}"
    key = "" if what == "logits" else f"{what}_"
    return {f"{key}cosine_vs_fp32": cos, f"{key}rel_err_vs_fp32": float((got - want).norm() / want.norm())}


FAMILY = Family("models", CASES, make_inputs, vitk=vitk, reference=reference, check=check, peer=PEERS)
test_models = FAMILY.pytest_function()
