"""Quantized attention (quant_attention) at DeiT-S and ViT-B shapes: batch 8, N = 197 tokens, d = 64,
6 and 12 heads, 4-bit log√2 (RepQ-ViT) and 8-bit log2 softmax quantizers, forward (inference).

Inputs as the models produce them: q, k, v are strided slices of one packed [B, N, 3, heads, d]
projection; per-tensor int8 scales from the data (asymmetric zero points for q), δ half the largest
probability (so the clamp to code 0 happens).

Contenders: vitk (torch.ops.vitk.quant_attention, the fused CPU kernel); eager: the papers' fake-quant
simulation in fp32 (what RepQ-ViT and AdaLog run: fake-quantized q, k, v, dense softmax, log-grid
quantization of the [B, heads, N, N] probabilities, P̂ v̂), and torch.compile of it.

FLOPs: useful matmul work, 2 d per (query, key) pair for q k^T and 2 d for P̂ v̂ (the int8 products
counted like float ones). Bytes: q, k, v read once and the output written once, fp32. Checked against
the float64 reference: relative Frobenius error <= 1e-2 (a probability on a code boundary may round to
the neighbouring code in fp32, in the simulation as in the kernel).
"""
import math

import torch

from harness import Case, Family

CHECK_TOL = 1e-2
FP32 = 4.0
BATCH = 8
N = 197
D = 64


def _case(model, heads, bits, quantizer):
    base = math.sqrt(2.0) if quantizer == "log_sqrt2" else 2.0
    pairs = BATCH * heads * N * N
    return Case(name=f"{model}-{bits}bit-{quantizer}", shape=f"B={BATCH} N={N} {heads}x{D} {bits}-bit {quantizer}",
                params=dict(heads=heads, bits=bits, base=base), flops=pairs * 4.0 * D,
                bytes=4 * BATCH * N * heads * D * FP32,
                est_bytes={"eager": 6 * pairs * FP32, "compile": 2 * pairs * FP32},
                est_why={"eager": "a few [B, heads, N, N] fp32 tensors"})


CASES = [_case("DeiT-S", 6, 4, "log_sqrt2"), _case("ViT-B", 12, 4, "log_sqrt2"), _case("ViT-B", 12, 8, "log2")]


def make_inputs(case, gen):
    heads = case.params["heads"]
    qkv = torch.randn(BATCH, N, 3, heads, D, generator=gen) * 1.5
    q, k, v = qkv.unbind(2)
    lo, hi = float(q.min()), float(q.max())
    qs = (hi - lo) / 255
    qz = -128 - round(lo / qs)
    ks, vs = float(k.abs().max()) / 127, float(v.abs().max()) / 127
    from vitkernels.reference import quant_attention as ref
    p = torch.softmax(D ** -0.5 * ref.fake_quant_int8(q[:1], qs, qz).transpose(1, 2)
                      @ ref.fake_quant_int8(k[:1], ks).transpose(1, 2).transpose(-1, -2), -1)
    args = dict(q_scale=qs, k_scale=ks, v_scale=vs, q_zero=qz, k_zero=0, v_zero=0, attn_bits=case.params["bits"],
                attn_base=case.params["base"], attn_delta=float(p.max()) * 0.5)
    return {"q": q, "k": k, "v": v, "args": args}


def simulate(q, k, v, q_scale, k_scale, v_scale, q_zero, k_zero, v_zero, attn_bits, attn_base, attn_delta):
    """The papers' fake-quant attention, in fp32 as they run it."""
    from vitkernels.reference import quant_attention as ref
    qh = ref.fake_quant_int8(q, q_scale, q_zero).transpose(1, 2)
    kh = ref.fake_quant_int8(k, k_scale, k_zero).transpose(1, 2)
    vh = ref.fake_quant_int8(v, v_scale, v_zero).transpose(1, 2)
    p = torch.softmax(q.shape[-1] ** -0.5 * (qh @ kh.transpose(-1, -2)), -1)
    return (ref.log_quantize(p, attn_bits, attn_base, attn_delta) @ vh).transpose(1, 2)


def vitk(case, x):
    a = x["args"]
    return (torch.ops.vitk.quant_attention, (x["q"], x["k"], x["v"], a["q_scale"], a["k_scale"], a["v_scale"]),
            {n: a[n] for n in ("q_zero", "k_zero", "v_zero", "attn_bits", "attn_base", "attn_delta")})


def reference(case, x):
    return simulate, (x["q"], x["k"], x["v"]), dict(x["args"])


def check(case, x, contender, out, cache):
    if "want" not in cache:
        from vitkernels.reference import quant_attention as ref
        cache["want"] = ref.quant_attention(x["q"].double(), x["k"].double(), x["v"].double(), **x["args"])
    want = cache["want"]
    err = float((out.double() - want).norm() / want.norm())
    assert err <= CHECK_TOL, f"output: relative error {err:.2e} (tolerance {CHECK_TOL:.0e})"
    return {"tol": CHECK_TOL, "out_error": err}


FAMILY = Family("quant_attention", CASES, make_inputs, vitk=vitk, reference=reference, check=check)
test_quant_attention = FAMILY.pytest_function()
