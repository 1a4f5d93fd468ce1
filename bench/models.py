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

Check: every contender's logits against the fp32 model's in float64: cosine similarity >= 0.99 (the
quantized ones are not meant to equal fp32; the JSON records the cosine). FLOPs: the linear layers'
and attention's matmuls (2 per multiply-add); bytes: the fp32 weights once.
"""

import torch
import torch.nn as nn

from harness import Case, Family, Peer

BATCH = 8
COS_MIN = 0.99
MODELS = {"DeiT-S": (384, 6), "ViT-B": (768, 12)}


def _flops(dim, heads, N=197, depth=12, mlp=4):
    per_block = 2 * N * (3 * dim * dim + dim * dim + 2 * mlp * dim * dim) + 4 * N * N * dim
    return BATCH * (depth * per_block + 2 * 196 * 768 * dim)


def _case(name):
    dim, heads = MODELS[name]
    params = 12 * (12 * dim * dim) + 768 * dim
    return Case(name=f"{name}-fwd", shape=f"B={BATCH} 224px dim={dim} heads={heads}", params=dict(model=name),
                flops=float(_flops(dim, heads)), bytes=4.0 * params)


CASES = [_case("DeiT-S"), _case("ViT-B")]


def _build(case, use_reference):
    from vitkernels.models import vision_transformer as vt
    fn = vt.deit_small_patch16_224 if case.params["model"] == "DeiT-S" else vt.vit_base_patch16_224
    torch.manual_seed(0)
    return fn(use_reference=use_reference).eval()


def make_inputs(case, gen):
    return {"x": torch.randn(BATCH, 3, 224, 224, generator=gen)}


def _quantized(case, x, simulate):
    from vitkernels import quant
    m = _build(case, use_reference=True)
    state = quant.calibrate(m, [x["x"][:2]])
    quant.quantize_(m, quant.Int8DynamicConfig(attn_bits=4), state, simulate=simulate)
    return m


def vitk(case, x):
    m = _quantized(case, x, simulate=False)
    return torch.no_grad()(m), (x["x"],), {}


def reference(case, x):
    return torch.no_grad()(_build(case, use_reference=True)), (x["x"],), {}


def _bf16(case, x):
    m = _build(case, use_reference=True)

    @torch.no_grad()
    def call():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x["x"]).float()
    return call


def _simulated(case, x):
    m = _quantized(case, x, simulate=True)
    return lambda: torch.no_grad()(m)(x["x"])


def _fbgemm(case, x):
    m = torch.ao.quantization.quantize_dynamic(_build(case, use_reference=True), {nn.Linear}, dtype=torch.qint8)
    return lambda: torch.no_grad()(m)(x["x"])


PEERS = (Peer(name="bf16-autocast", label=lambda: "bf16 autocast (eager)", setup=_bf16),
         Peer(name="simulated-quant", label=lambda: "simulated W8A8 + 4-bit log√2 attention (references)",
              setup=_simulated),
         Peer(name="fbgemm-dynamic", label=lambda: f"torch.ao quantize_dynamic qint8 ({torch.backends.quantized.engine})",
              setup=_fbgemm))


def check(case, x, contender, out, cache):
    if "fp32" not in cache:
        with torch.no_grad():
            cache["fp32"] = _build(case, use_reference=True)(x["x"]).double()
    want = cache["fp32"]
    got = out.double()
    cos = float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0))
    assert cos >= COS_MIN, f"logits: cosine similarity to fp32 {cos:.4f} < {COS_MIN}"
    return {"cosine_vs_fp32": cos, "rel_err_vs_fp32": float((got - want).norm() / want.norm())}


FAMILY = Family("models", CASES, make_inputs, vitk=vitk, reference=reference, check=check, peer=PEERS)
test_models = FAMILY.pytest_function()
