"""ShiftAddViT family at PVTv2-b0's four stages, batch 8, fp32 (N = 3136, 784, 196, 49 tokens; C = 32,
64, 160, 256; heads 1, 2, 5, 8; head dim 32):

  attn        torch.ops.vitk.binary_linear_attention(q, k, v), q, k, v strided views of one packed qkv
              projection [B, N, 3, heads, d], forward and forward+backward (leaves q, k, v);
  moe         one MoE layer of the MLP (fc1: C -> mlp_ratio * C, ratios 8, 8, 4, 4), forward, with the
              tokens routed 50/50 and 90/10 between the multiplication and the shift expert (a fixed
              routing, drawn once per case, given to every contender; gates 1 as NaiveGate's).

Contenders, in one run:
  vitk        attn: the op. moe: PyTorchFMoE_FC with the ops: expert_dispatch, nn.Linear on expert 0's
              rows, the frozen ShiftLinear (shift_linear on 4-bit codes) on expert 1's, expert_combine.
  eager       the official eager formulations, transcribed in vitkernels.reference.shiftadd. attn:
              binary_linear_attention (normalize, global means, straight-through binarization, two
              matmuls, normalize). moe: sparse_dispatcher_moe, ShiftAddViT's SparseDispatcher path on
              dense [T, 2] gates (nonzero, sort, gathers, split, the experts, exp * gate, index_add,
              log), with the official trainable DeepShift-PS shift expert (its powers of two rebuilt
              from `shift` and `sign` each call, then F.linear), as ShiftAddViT runs it.
  compile     torch.compile of eager (moe: dynamo breaks the graph at the split sizes' .tolist()).
The shift expert's weights are the same signed powers of two times a per-channel scale in every
contender (freeze() packs exactly the trainable form's values).

Bytes: attn: q, k, v read and out written once (fwd+bwd: grad_out read, dq, dk, dv written too);
moe: x read, the output written, the weights read (fp32 for the multiplication expert, 4 bits for
the shift expert). FLOPs: attn: the additions over set bits, d/2 of d bits on average, for k_b^T v and
for q_b S (d * dv / 2 each per token and head), and ~12 per element for the norms, means and the
epilogue; fwd+bwd counts 3x. moe: 2 * T * C * mlp_ratio * C.

The binary codes compare normalized values with the global mean: an input value within rounding of
the mean would binarize differently in fp32 and in the fp64 ground truth, so the inputs are nudged
(once, deterministically) until every normalized value is at least 1e-5 away from its mean.
"""
import copy

import torch

from harness import Case, Family
from harness.checks import rel_error

CHECK_TOL = 1e-4        # max |error| / max |fp64 value|
FP32 = 4.0
BATCH = 8
HEAD_DIM = 32
TIE_MARGIN = 1e-5
# PVTv2-b0: (tokens, channels, heads, mlp ratio) per stage at 224 x 224.
STAGES = ((3136, 32, 1, 8), (784, 64, 2, 8), (196, 160, 5, 4), (49, 256, 8, 4))


def _attn(stage, backward):
    N, C, heads, _ = STAGES[stage - 1]
    d = C // heads
    tensor = BATCH * N * C * FP32
    per_token = heads * (2 * (d / 2) * d + 12 * d)
    return Case(name=f"PVTv2-b0-s{stage}-attn" + ("-fwd+bwd" if backward else "-fwd"),
                shape=f"B={BATCH} N={N} {heads}x{d}",
                params=dict(kind="attn", N=N, C=C, heads=heads, d=d),
                flops=BATCH * N * per_token * (3 if backward else 1),
                bytes=(8 if backward else 4) * tensor, backward=backward)


def _moe(stage, mult_share):
    N, C, _, ratio = STAGES[stage - 1]
    H = C * ratio
    T = BATCH * N
    split = f"{round(100 * mult_share)}-{round(100 * (1 - mult_share))}"
    return Case(name=f"PVTv2-b0-s{stage}-moe-{split}", shape=f"T={T} {C}->{H} split {split}",
                params=dict(kind="moe", N=N, C=C, H=H, T=T, mult_share=mult_share),
                flops=2.0 * T * C * H, bytes=(T * C + T * H + C * H + H) * FP32 + C * H / 2)


CASES = ([_attn(s, bwd) for bwd in (False, True) for s in (1, 2, 3, 4)]
         + [_moe(s, share) for share in (0.5, 0.9) for s in (1, 2, 3, 4)])


# ---------------------------------------------------------------- inputs
def _tie_safe(qkv):
    """Nudges q and k (qkv[:, :, 0] and [:, :, 1]) in place until no normalized value lies within
    TIE_MARGIN of its tensor's mean."""
    for which in (0, 1):
        t = qkv[:, :, which]
        for _ in range(20):
            n = t.double().norm(dim=-1, keepdim=True)
            xn = t.double() / n
            gap = xn - xn.mean()
            close = gap.abs() < TIE_MARGIN
            if not bool(close.any()):
                break
            # Push each such value 3 margins away from the mean, in its own direction.
            step = torch.where(gap >= 0, 1.0, -1.0) * 3 * TIE_MARGIN * n
            t.copy_(torch.where(close, t.double() + step, t.double()).to(t.dtype))
        else:
            raise AssertionError("could not move the inputs away from the binarization threshold")


def make_inputs(case, gen):
    p = case.params
    if p["kind"] == "attn":
        qkv = torch.randn(BATCH, p["N"], 3, p["heads"], p["d"], generator=gen)
        _tie_safe(qkv)
        x = {"qkv": qkv}
        if case.backward:
            x["grad_out"] = torch.randn(BATCH, p["N"], p["heads"], p["d"], generator=gen)
        return x
    T = p["T"]
    index = torch.ones(T, dtype=torch.int64)
    index[torch.randperm(T, generator=gen)[:round(p["mult_share"] * T)]] = 0
    return {"x": torch.randn(BATCH, p["N"], p["C"], generator=gen), "index": index,
            "seed": torch.randint(0, 2**31, (1,), generator=gen)}


def _qkv(case, x):
    """q, k, v: views of the packed tensor, made once per case (the leaves of a backward case)."""
    if "q" not in x:
        for i, name in enumerate("qkv"):
            x[name] = x["qkv"].select(2, i).detach().requires_grad_(case.backward)
    return x["q"], x["k"], x["v"]


# ---------------------------------------------------------------- the MoE layer
def _moe_layers(case, x):
    """(vitk layer, trainable layer, dense gates), built once per case with the same weights: the trainable
    layer (the official shift expert; the fp64 ground truth runs it on the reference dispatch and combine)
    and vitk's frozen copy route as x["index"] says, the official path takes the dense gates."""
    if "_moe" not in x:
        from vitkernels.models import shiftadd as sa

        class FixedRoute(sa._Gate):
            """Routes every call as `index` says, gate 1 (NaiveGate's top-1 gate)."""

            def __init__(self, index):
                super().__init__(2, 1, 1)
                self.register_buffer("index", index)
                self.register_buffer("ones", torch.ones(index.shape, dtype=torch.float32, device=index.device))

            def route(self, inp):
                self._chosen(self.index)
                return self.index, self.ones

        p = case.params
        torch.manual_seed(int(x["seed"]))
        ref_layer = sa.PyTorchFMoE_FC(p["C"], p["H"], gate=sa.NaiveGate, use_reference=True)
        ref_layer.gate = FixedRoute(x["index"])
        ref_layer = ref_layer.to(x["x"].device).requires_grad_(False)
        vitk_layer = sa.freeze_shift_experts(copy.deepcopy(ref_layer))
        vitk_layer.use_reference = False
        gates = torch.nn.functional.one_hot(x["index"], 2).to(x["x"].dtype)
        x["_moe"] = (vitk_layer, ref_layer, gates)
    return x["_moe"]


def vitk(case, x):
    import vitkernels  # noqa: F401
    if case.params["kind"] == "attn":
        return torch.ops.vitk.binary_linear_attention, _qkv(case, x), {}
    return _moe_layers(case, x)[0], (x["x"],), {}


def reference(case, x):
    from vitkernels.reference import shiftadd as ref
    if case.params["kind"] == "attn":
        return ref.binary_linear_attention, _qkv(case, x), {}
    _, layer, gates = _moe_layers(case, x)
    return ref.sparse_dispatcher_moe, (x["x"].reshape(-1, case.params["C"]), gates, layer.experts), {}


# ---------------------------------------------------------------- correctness gate
def _exact(case, x, cache):
    if "want" not in cache:
        from vitkernels.reference import shiftadd as ref
        grads = None
        if case.params["kind"] == "attn":
            q, k, v = (t.detach().double().requires_grad_(case.backward) for t in _qkv(case, x))
            out = ref.binary_linear_attention(q, k, v)
            if case.backward:
                out.backward(x["grad_out"].double())
                grads = (q.grad, k.grad, v.grad)
        else:
            layer = copy.deepcopy(_moe_layers(case, x)[1]).double()
            out = layer(x["x"].double())
        cache["want"] = (out.detach(), grads)
    return cache["want"]


def check(case, x, contender, out, cache):
    want, want_grads = _exact(case, x, cache)
    out, grads = out if case.backward else (out, None)
    facts = {"tol": CHECK_TOL, "out_error": rel_error(out.detach(), want, "output", CHECK_TOL)}
    if case.backward:
        for name, g, w in zip("qkv", grads, want_grads):
            facts[f"d{name}_error"] = rel_error(g, w, f"d{name}", CHECK_TOL)
    return facts


FAMILY = Family("shiftadd", CASES, make_inputs, vitk=vitk, reference=reference, check=check)
test_shiftadd = FAMILY.pytest_function()
