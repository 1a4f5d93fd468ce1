"""Lowbit family: the linear layers of ViT-B/16 at batch 8 (M = 8 x 197 = 1576 tokens) and of Swin-T's
first stage (M = 8 x 56 x 56 = 25088), plus the small-batch M = 1 and M = 16 cases of ViT-B's fc1, fp32
activations, for each weight format:

  dynamic_int8   torch.ops.vitk.dynamic_int8_linear (W8A8; weights in the blocked layout Int8Linear keeps)
  int4_int8      torch.ops.vitk.int4_int8_linear    (W4A8, one scale per output channel)
  int4           torch.ops.vitk.int4_linear         (W4A16, signed codes, one scale per group of 128)
  shift          torch.ops.vitk.shift_linear        (powers of two, one scale per output channel)

Shapes (M, K -> N, activation): qkv 768 -> 2304; fc1 768 -> 3072 with GELU; fc2 3072 -> 768; Swin-T
stage-1 fc1 96 -> 384 with GELU; fc1 at M = 1 and M = 16.

Contenders, all in the same run and on the same inputs:
  vitk      the op, weights packed once outside the timed region (as the modules keep them)
  eager     the format's eager PyTorch path, what a model without these kernels runs. Int8 formats
            (W8A8, W4A8): torchao's fallback, per-token quantization in eager ops, torch._int_mm
            (int8 x int8 -> int32), dequantize, bias, activation (W4A8 first unpacks its nibbles to
            int8); W4A16 and shift: dequantize the packed weights, then F.linear and the activation
  compile   torch.compile of that eager path
  fp32      F.linear (+ activation) on the float weights (MKL / oneDNN sgemm)
  bf16      F.linear (+ activation) in bfloat16 (x and weights converted outside the timed region)
  fbgemm    torch.ao.nn.quantized.dynamic.Linear, PyTorch's own dynamic int8 Linear (fbgemm engine,
            per-channel int8 weights packed at construction), then the activation

FLOPs: 2 M K N (a MAC is 2 ops). Bytes: x and the output in fp32 once, and the format's weight bytes
(scales included; the case's shape says them). Integer cases also report vitk's fraction of the
measured int8 ceiling (torch._int_mm 4096^3, in the run line).

Checks: vitk, eager and compile against the op's float64 reference (vitkernels.reference.lowbit:
the same integer codes, products exact), max error within 1e-4 of the largest output; fp32 within
1e-4, bf16 and fbgemm (their own quantization) within 5e-2 of the float64 output of the float weights.
"""
import torch
import torch.nn.functional as F

from harness import Case, Family, Peer

FP32 = 4
GROUP = 128            # int4 group size (K itself where 128 does not divide K: Swin-T's K = 96)
TOL = 1e-4
LOOSE_TOL = 5e-2

# (name, M, K, N, activation)
SHAPES = [
    ("ViT-B-qkv", 1576, 768, 2304, "none"),
    ("ViT-B-fc1", 1576, 768, 3072, "gelu"),
    ("ViT-B-fc2", 1576, 3072, 768, "none"),
    ("Swin-T-s1-fc1", 25088, 96, 384, "gelu"),
    ("ViT-B-fc1-M16", 16, 768, 3072, "gelu"),
    ("ViT-B-fc1-M1", 1, 768, 3072, "gelu"),
]
FORMATS = ("dynamic_int8", "int4_int8", "int4", "shift")


def weight_bytes(fmt, K, N):
    """The format's weight bytes, scales included (and the blocked int8 layout's row sums and padding)."""
    if fmt == "fp32":
        return 4 * K * N
    if fmt == "bf16":
        return 2 * K * N
    if fmt == "dynamic_int8":
        return -(-N // 16) * (-(-K // 4) + 1) * 64 + 4 * N
    if fmt == "int4":
        return K * N // 2 + 4 * N * (K // group(K))
    return K * N // 2 + 4 * N           # int4_int8, shift: one fp32 scale per channel


def group(K):
    return GROUP if K % GROUP == 0 else K


def _case(name, M, K, N, act, fmt):
    wb = weight_bytes(fmt, K, N)
    return Case(name=f"{name}-{fmt}",
                shape=f"M={M} {K}->{N}{' ' + act if act != 'none' else ''}; w {wb / 2**20:.2f} MiB "
                      f"({wb / weight_bytes('fp32', K, N):.3f} of fp32)",
                params=dict(M=M, K=K, N=N, act=act, fmt=fmt, weight_bytes=wb),
                flops=2.0 * M * K * N, bytes=float(FP32 * M * (K + N) + wb),
                int8_roof=fmt in ("dynamic_int8", "int4_int8"))


CASES = [_case(*shape, fmt) for shape in SHAPES for fmt in FORMATS]


def make_inputs(case, gen):
    from vitkernels import lowbit as pack
    p = case.params
    M, K, N = p["M"], p["K"], p["N"]
    w = torch.randn(N, K, generator=gen) * 0.02
    x = {"x": torch.randn(M, K, generator=gen), "w": w, "bias": torch.randn(N, generator=gen) * 0.02}
    fmt = p["fmt"]
    if fmt == "dynamic_int8":
        x["w_q"], x["w_scale"] = pack.pack_int8(w)
        x["w_blocked"] = pack.block_int8(x["w_q"])
        x["w_qt"] = x["w_q"].t()                         # [K, N] view, as torch._int_mm takes it
    elif fmt == "int4_int8":
        x["w_packed"], s, _ = pack.pack_int4(w, K, True)
        x["w_scale"] = s.view(-1).contiguous()
    elif fmt == "int4":
        x["w_packed"], x["w_scale"], _ = pack.pack_int4(w, group(K), True)
    else:
        x["w_packed"], x["w_scale"] = pack.pack_shift(w)
    return x


def _act(v, act):
    return F.gelu(v) if act == "gelu" else v


def vitk(case, x):
    import vitkernels
    p = case.params
    fmt, act = p["fmt"], p["act"]
    if fmt == "dynamic_int8":
        return vitkernels.dynamic_int8_linear, (x["x"], x["w_blocked"], x["w_scale"], x["bias"]), {"activation": act}
    if fmt == "int4_int8":
        return vitkernels.int4_int8_linear, (x["x"], x["w_packed"], x["w_scale"], x["bias"]), {"activation": act}
    if fmt == "int4":
        return vitkernels.int4_linear, (x["x"], x["w_packed"], x["w_scale"], None, group(p["K"]), x["bias"]), \
            {"activation": act}
    return vitkernels.shift_linear, (x["x"], x["w_packed"], x["w_scale"], x["bias"]), {"activation": act}


# ---------------------------------------------------------------- the eager paths (and compile's input)
def eager_w8a8(x, w_qt, w_scale, bias, act):
    """torchao's fallback for int8 dynamic activations x int8 weights: quantize x per token in eager ops,
    torch._int_mm, dequantize, bias, activation."""
    scale = x.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    xq = torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)
    acc = torch._int_mm(xq, w_qt)
    return _act(acc.float() * scale * w_scale + bias, act)


def _nibbles(w_packed):
    return torch.stack([w_packed & 15, w_packed >> 4], -1).reshape(w_packed.shape[0], -1)


def eager_w4a8(x, w_packed, w_scale, bias, act):
    """W4A8 in eager ops: the nibbles unpacked to int8 weights, then the W8A8 path."""
    c = _nibbles(w_packed).to(torch.int8)
    w_q = torch.where(c >= 8, c - 16, c).to(torch.int8)
    return eager_w8a8(x, w_q.t(), w_scale, bias, act)


def eager_w4a16(x, w_packed, w_scale, bias, act):
    """Weight-only int4 in eager ops: dequantize (signed code x group scale), F.linear, activation."""
    c = _nibbles(w_packed).to(torch.float32)
    c = torch.where(c >= 8, c - 16, c)
    N, K = c.shape
    G = group(K)
    w = (c.view(N, K // G, G) * w_scale[..., None]).view(N, K)
    return _act(F.linear(x, w, bias), act)


def eager_shift(x, w_packed, w_scale, bias, act):
    """Shift weights in eager ops: decode the codes through the table of powers of two, F.linear."""
    from vitkernels import lowbit as pack
    table = pack.shift_values(torch.float32)
    w = table[_nibbles(w_packed).long()] * w_scale[:, None]
    return _act(F.linear(x, w, bias), act)


def reference(case, x):
    p = case.params
    fmt, act = p["fmt"], p["act"]
    if fmt == "dynamic_int8":
        return eager_w8a8, (x["x"], x["w_qt"], x["w_scale"], x["bias"], act), {}
    if fmt == "int4_int8":
        return eager_w4a8, (x["x"], x["w_packed"], x["w_scale"], x["bias"], act), {}
    if fmt == "int4":
        return eager_w4a16, (x["x"], x["w_packed"], x["w_scale"], x["bias"], act), {}
    return eager_shift, (x["x"], x["w_packed"], x["w_scale"], x["bias"], act), {}


# ---------------------------------------------------------------- peers: fp32 / bf16 F.linear, fbgemm
def _fp32_setup(case, x):
    act = case.params["act"]
    return lambda: _act(F.linear(x["x"], x["w"], x["bias"]), act)


def _bf16_setup(case, x):
    act = case.params["act"]
    xb, wb, bb = (x[k].to(torch.bfloat16) for k in ("x", "w", "bias"))
    return lambda: _act(F.linear(xb, wb, bb), act)


def _fbgemm_setup(case, x):
    import torch.ao.nn.quantized.dynamic as nnqd
    torch.backends.quantized.engine = "fbgemm"
    N, K = x["w"].shape
    scale = x["w"].abs().amax(1).clamp(min=1e-12) / 127
    qw = torch.quantize_per_channel(x["w"], scale.double(), torch.zeros(N, dtype=torch.long), 0, torch.qint8)
    m = nnqd.Linear(K, N, dtype=torch.qint8)
    m.set_weight_bias(qw, x["bias"])
    act = case.params["act"]
    return lambda: _act(m(x["x"]), act)


def _label(what):
    return lambda: f"{what} (torch {torch.__version__})"


PEERS = [
    Peer(name="fp32", label=_label("fp32 F.linear"), setup=_fp32_setup, devices=("cpu", "cuda")),
    Peer(name="bf16", label=_label("bf16 F.linear"), setup=_bf16_setup, devices=("cpu", "cuda")),
    Peer(name="fbgemm", label=_label("fbgemm torch.ao.nn.quantized.dynamic.Linear"), setup=_fbgemm_setup),
]


# ---------------------------------------------------------------- correctness gate
def _rel_error(got, want, tol, what):
    scale = max(float(want.abs().max()), 1e-30)
    err = float((got.double() - want).abs().max()) / scale
    assert err <= tol, f"{what}: error {err:.2e} of the largest value (tolerance {tol:.0e})"
    return err


def check(case, x, contender, out, cache):
    from vitkernels.reference import lowbit as ref
    p = case.params
    fmt, act = p["fmt"], p["act"]
    if contender in ("vitk", "eager", "compile"):
        if "op" not in cache:
            if fmt == "dynamic_int8":
                want = ref.dynamic_int8_linear(x["x"], x["w_q"], x["w_scale"], x["bias"], act)
            elif fmt == "int4_int8":
                want = ref.int4_int8_linear(x["x"], x["w_packed"], x["w_scale"], x["bias"], act)
            elif fmt == "int4":
                want = ref.int4_linear(x["x"], x["w_packed"], x["w_scale"], None, group(p["K"]), x["bias"], act)
            else:
                want = ref.shift_linear(x["x"], x["w_packed"], x["w_scale"], x["bias"], act)
            cache["op"] = want
        err = _rel_error(out, cache["op"], TOL, f"{contender} vs the {fmt} reference")
        return {"tol": TOL, "out_error": err, "weight_bytes": p["weight_bytes"]}
    if "float" not in cache:
        cache["float"] = ref.activate(F.linear(x["x"].double(), x["w"].double(), x["bias"].double()), act)
    tol = TOL if contender == "peer" else LOOSE_TOL
    return {"tol": tol, "out_error": _rel_error(out, cache["float"], tol, f"{contender} vs float64")}


FAMILY = Family("lowbit", CASES, make_inputs, vitk=vitk, reference=reference, check=check, peer=PEERS)
test_lowbit = FAMILY.pytest_function()
