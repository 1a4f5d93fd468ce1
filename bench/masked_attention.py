"""Structured-mask and reduced attention (issue 4), batch 8 unless stated, forward and forward+backward:

  polyline   torch.ops.vitk.polyline_attention, symmetric (PPMA "whole"): 14x14 8x32, 7x7 16x32, 28x28 4x32
  axial      torch.ops.vitk.axial_decay_attention (PPMA "chunk"): 56x56 4x16, 28x28 4x32
  manhattan  vitkernels.manhattan_attention (RMT MaSA, polyline with a per-head constant decay): 14x14 8x32
  gaussian   torch.ops.vitk.gaussian_mask_attention (GMM-ViT): batch 64, 16x16, 6x32, M = 5
  reduced    torch.ops.vitk.reduced_attention: PVTv2 stage 1 (56x56 queries vs 7x7 keys, 1x64), stage 2
             (28x28 vs 7x7, 2x64), S2AFormer's strip form (56x56 vs 7x7, dqk = 8, dv = 64)

Inputs are laid out as the models produce them: q, k, v of the image cases are strided slices of one
packed [B, H, W, 3, heads, hd] projection (PVT: k, v slices of one packed kv [B, Nk, 2, heads, hd]);
the decays are negative, as softplus(.) * -exp(A_log) makes them; the mixture is random around the
paper's init scale. Modes as in window_attention.py: fwd (no grad) and fwd+bwd (out.backward(grad_out),
.grad reset inside the timed region). In fwd+bwd the leaves are q, k, v and, where the models train
them, the decays (PPMA: log_alpha, log_beta, outputs of its path embedding) and the mixture
parameters (GMM); RMT's decay is a fixed buffer and stays a constant.

FLOPs count useful matmul work only: 2*d per (query, key) pair for q k^T and 2*dv for P v. polyline,
manhattan, gaussian: 2*B*heads*N^2*(d + dv) (the symmetric form's averaged probabilities make one
P v; the kernel's second softmax is not counted). axial: q k^T once per row and per column, and four
P v products (A_w v, A_h v, and each applied to the other's result): 2*B*heads*H*W*(H + W)*(d + 2 dv).
reduced: 2*B*heads*Nq*Nk*(dqk + dv). fwd+bwd: 3x the forward (window_attention.py explains the
convention). Bytes: every input and output once (fwd+bwd: plus grad_out and one gradient per leaf).

Memory: eager builds the dense masks and score tensors, [B, heads, N, N] for the whole-image forms:
the 28x28 polyline case is where that shows (a 78.7 MB fp32 tensor per copy, several alive at once);
peak MiB records it per contender. est_bytes declares it so a device without the room skips eager
instead of running out of memory.

Peers: FlexAttention on the CPU (torch.compile(flex_attention), inductor's C++ template), score_mods
over O(N) captured tables, never an N x N one:
  polyline   prefix sums of log_alpha along each row and of log_beta down each column; the mask is a
             difference of two entries per direction. Symmetric = two flex calls, one per mask
             direction (the transposed mask swaps the roles of query and key), outputs averaged.
  manhattan  score + log_gamma[h] * (|dy| + |dx|).
  gaussian   score * G[h, offset]: the mixture tabulated once per call over the (2H-1)(2W-1) grid
             offsets (O(N) per head), gathered by the pair's offset.
  reduced    plain flex over Nq x Nk (no score_mod).
  axial      the same chain as PPMA's chunk form, four flex calls: each image row (or column) re-batched
             as a sequence of its own ([B H, heads, W, d] or [B W, heads, H, d], copies counted in the
             peer's time), with score + sgn(i - j) (P[i] - P[j]) over the line's prefix sums P of
             log_alpha (rows) or log_beta (columns).
FlexAttention has no CPU backward in torch 2.13 (NotImplementedError): fwd+bwd peer items are skipped
with that reason, as in window_attention.py. The peer's setup (compile + first call) is its setup_s.
"""
import torch
import torch.nn.functional as F

from harness import Case, Family, Peer
from harness.checks import rel_error

CHECK_TOL = 1e-4        # max |error| / max |fp64 value|, per output and per gradient
FWD_BWD_FLOPS = 3.0
FP32 = 4.0
BATCH = 8


# ---------------------------------------------------------------- cases
def _name(name, backward):
    return name + ("-fwd+bwd" if backward else "-fwd")


def _image(name, kind, H, W, heads, hd, backward, B=BATCH, M=0):
    N = H * W
    tensor = B * N * heads * hd * FP32
    side = B * N * heads * FP32                               # one [B, H, W, heads] decay
    if kind == "axial":
        fwd_flops = 2.0 * B * heads * N * (H + W) * (hd + 2 * hd)
        dense = B * heads * N * max(H, W) * FP32              # the per-row / per-column masks
    else:
        fwd_flops = 2.0 * B * heads * N * N * (hd + hd)
        dense = B * heads * N * N * FP32                      # one [B, heads, N, N] fp32 tensor
    # Per leaf and output: inputs once, the output once; backward adds grad_out and one grad per leaf.
    n_side = {"polyline": 2, "axial": 2}.get(kind, 0)
    side_bytes = n_side * side + (2 * heads * M * FP32 if kind == "gaussian" else 0)
    bytes_ = 4 * tensor + side_bytes
    if backward:
        bytes_ += 4 * tensor + (side_bytes if kind != "manhattan" else 0)
    # Eager's live dense tensors (mask, scores, masked scores, softmax; symmetric: the transposed
    # direction's too; the polyline mask is built through [B, heads, H, H, W, W] expands and a
    # reshape copy); the backward keeps them and adds their gradients. Inductor's graph peaks lower.
    copies = {"polyline": 10, "manhattan": 5, "gaussian": 5, "axial": 12}[kind]
    est = dense * copies * (2 if backward else 1)
    why = "[B, heads, N, N] fp32 mask and score tensors" if kind != "axial" else "per-row/column score tensors"
    shape = f"B={B} {H}x{W} {heads}x{hd}" + (f" M={M}" if M else "")
    return Case(name=_name(name, backward), shape=shape,
                params=dict(kind=kind, B=B, H=H, W=W, heads=heads, hd=hd, M=M),
                flops=fwd_flops * (FWD_BWD_FLOPS if backward else 1.0), bytes=bytes_,
                est_bytes={"eager": est, "compile": est}, est_why={"eager": why, "compile": why},
                backward=backward)


def _reduced(name, Hq, Hk, heads, dqk, dv, backward, B=BATCH, packed_kv=True):
    Nq, Nk = Hq * Hq, Hk * Hk
    fwd_flops = 2.0 * B * heads * Nq * Nk * (dqk + dv)
    io = B * heads * (Nq * dqk + Nk * dqk + Nk * dv + Nq * dv) * FP32
    scores = B * heads * Nq * Nk * FP32
    est = 3 * scores * (2 if backward else 1)
    return Case(name=_name(name, backward), shape=f"B={B} {Hq}x{Hq} vs {Hk}x{Hk} {heads}x({dqk},{dv})",
                params=dict(kind="reduced", B=B, Nq=Nq, Nk=Nk, heads=heads, dqk=dqk, dv=dv, packed_kv=packed_kv),
                flops=fwd_flops * (FWD_BWD_FLOPS if backward else 1.0),
                bytes=io + (io + B * heads * Nq * dv * FP32 if backward else 0),
                est_bytes={"eager": est, "compile": est},
                est_why={"eager": "[B, heads, Nq, Nk] fp32 scores", "compile": "[B, heads, Nq, Nk] fp32 scores"},
                backward=backward)


def _cases(backward):
    return [
        _image("PPMA-whole-14x14", "polyline", 14, 14, 8, 32, backward),
        _image("PPMA-whole-7x7", "polyline", 7, 7, 16, 32, backward),
        _image("PPMA-whole-28x28", "polyline", 28, 28, 4, 32, backward),
        _image("PPMA-chunk-56x56", "axial", 56, 56, 4, 16, backward),
        _image("PPMA-chunk-28x28", "axial", 28, 28, 4, 32, backward),
        _image("RMT-MaSA-14x14", "manhattan", 14, 14, 8, 32, backward),
        _image("GMM-ViT-16x16", "gaussian", 16, 16, 6, 32, backward, B=64, M=5),
        _reduced("PVTv2-s1", 56, 7, 1, 64, 64, backward),
        _reduced("PVTv2-s2", 28, 7, 2, 64, 64, backward),
        _reduced("S2A-strip", 56, 7, 1, 8, 64, backward, packed_kv=False),
    ]


CASES = _cases(False) + _cases(True)


# ---------------------------------------------------------------- inputs and calls
def make_inputs(case, gen):
    p = case.params
    x = {}
    if p["kind"] == "reduced":
        B, heads = p["B"], p["heads"]
        x["q"] = torch.randn(B, p["Nq"], heads, p["dqk"], generator=gen)
        if p["packed_kv"]:
            x["kv"] = torch.randn(B, p["Nk"], 2, heads, p["dv"], generator=gen)
        else:
            x["k"] = torch.randn(B, p["Nk"], heads, p["dqk"], generator=gen)
            x["v"] = torch.randn(B, p["Nk"], heads, p["dv"], generator=gen)
        if case.backward:
            x["grad_out"] = torch.randn(B, p["Nq"], heads, p["dv"], generator=gen)
        return x
    lead = (p["B"], p["H"], p["W"])
    x["qkv"] = torch.randn(*lead, 3, p["heads"], p["hd"], generator=gen)
    if p["kind"] in ("polyline", "axial"):
        # PPMA's decays: softplus(dt + dt_bias) * -exp(A_log), per token and head.
        for name in ("log_alpha", "log_beta"):
            x[name] = -F.softplus(torch.randn(*lead, p["heads"], generator=gen) - 1.0)
    elif p["kind"] == "manhattan":
        from vitkernels.reference.masked_attention import log_gamma_rmt
        x["log_gamma"] = log_gamma_rmt(p["heads"])
    else:
        x["mix_weight"] = torch.randn(p["heads"], p["M"], generator=gen)
        x["mix_sigma"] = 2.0 + torch.randn(p["heads"], p["M"], generator=gen)
    if case.backward:
        x["grad_out"] = torch.randn(*lead, p["heads"], p["hd"], generator=gen)
    return x


_TRAINED = {"polyline": ("log_alpha", "log_beta"), "axial": ("log_alpha", "log_beta"),
            "gaussian": ("mix_weight", "mix_sigma")}


def _leaves(case, x):
    """q, k, v (views of the packed projection where the model has one) and the trained side inputs,
    made leaves once per case; the harness finds a backward case's leaves among the dict's tensors."""
    p = case.params
    if "_ready" not in x:
        if p["kind"] == "reduced":
            if p["packed_kv"]:
                x["k"], x["v"] = (x["kv"].select(2, i) for i in range(2))
            for n in "qkv":
                x[n] = x[n].detach().requires_grad_(case.backward)
        else:
            for i, n in enumerate("qkv"):
                x[n] = x["qkv"].select(3, i).detach().requires_grad_(case.backward)
            for n in _TRAINED.get(p["kind"], ()):
                x[n].requires_grad_(case.backward)
        x["_ready"] = True
    return x["q"], x["k"], x["v"]


def _args(case, x, q, k, v):
    kind = case.params["kind"]
    if kind in ("polyline", "axial"):
        return (q, k, v, x["log_alpha"], x["log_beta"])
    if kind == "manhattan":
        return (q, k, v, x["log_gamma"])
    if kind == "gaussian":
        return (q, k, v, x["mix_weight"], x["mix_sigma"])
    return (q, k, v)


_OPS = {"polyline": "polyline_attention", "axial": "axial_decay_attention", "manhattan": "manhattan_attention",
        "gaussian": "gaussian_mask_attention", "reduced": "reduced_attention"}


def vitk(case, x):
    import vitkernels
    q, k, v = _leaves(case, x)
    kind = case.params["kind"]
    if kind == "manhattan":         # a Python wrapper: polyline with a broadcast per-head decay
        return vitkernels.manhattan_attention, _args(case, x, q, k, v), {}
    return getattr(torch.ops.vitk, _OPS[kind]), _args(case, x, q, k, v), {}


def reference(case, x):
    from vitkernels.reference import masked_attention as ref
    q, k, v = _leaves(case, x)
    return getattr(ref, _OPS[case.params["kind"]]), _args(case, x, q, k, v), {}


# ---------------------------------------------------------------- peers: FlexAttention
def _flex_label():
    return f"flex (torch {torch.__version__} compiled flex_attention)"


def _flex_backward_reason(device):
    from torch.nn.attention.flex_attention import flex_attention
    q = torch.randn(1, 1, 128, 16, device=device, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except NotImplementedError as exc:
        return f"no {device} backward (torch {torch.__version__}: {str(exc).splitlines()[0]})"
    return None


def _heads_first(t):
    # [B, H, W, heads, d] or [B, N, heads, d] (strided) -> [B, heads, N, d]: a view, last dim contiguous.
    return (t.flatten(1, 2) if t.dim() == 5 else t).transpose(1, 2)


def _polyline_mods(x, p):
    """score_mods of the two polyline mask directions and RMT's decay, over O(N) captured tables."""
    W = p["W"]
    if p["kind"] == "manhattan":
        lg = x["log_gamma"]

        def manhattan(score, b, h, q_idx, kv_idx):
            dist = (q_idx // W - kv_idx // W).abs() + (q_idx % W - kv_idx % W).abs()
            return score + lg[h] * dist
        return (manhattan,)
    # ca[b, h, y, x]: sum of log_alpha over columns 1..x of row y (column 0 never enters a segment,
    # so it is zeroed); cb[b, h, x, y]: the same for log_beta down column x.
    la, lb = x["log_alpha"].detach(), x["log_beta"].detach()
    ca = la.permute(0, 3, 1, 2).cumsum(-1) - la.permute(0, 3, 1, 2)[..., :1]
    cb = lb.permute(0, 3, 2, 1).cumsum(-1) - lb.permute(0, 3, 2, 1)[..., :1]

    def path(score, b, h, row_of, col_of, y1, x1, y2, x2):
        # along row `row_of` between columns x1 and x2, then down column `col_of` between rows y1, y2
        row = ca[b, h, row_of, torch.maximum(x1, x2)] - ca[b, h, row_of, torch.minimum(x1, x2)]
        col = cb[b, h, col_of, torch.maximum(y1, y2)] - cb[b, h, col_of, torch.minimum(y1, y2)]
        return score + row + col

    def forward_mask(score, b, h, q_idx, kv_idx):      # logM: the query's row, the key's column
        yq, xq, yk, xk = q_idx // W, q_idx % W, kv_idx // W, kv_idx % W
        return path(score, b, h, yq, xk, yq, xq, yk, xk)

    def transposed_mask(score, b, h, q_idx, kv_idx):   # logM^T: the key's row, the query's column
        yq, xq, yk, xk = q_idx // W, q_idx % W, kv_idx // W, kv_idx % W
        return path(score, b, h, yk, xq, yq, xq, yk, xk)
    return (forward_mask, transposed_mask)


def _gaussian_mod(x, p):
    H, W = p["H"], p["W"]
    w, s = x["mix_weight"].detach(), x["mix_sigma"].detach()
    dy = torch.arange(-(H - 1), H, device=w.device, dtype=w.dtype)
    dx = torch.arange(-(W - 1), W, device=w.device, dtype=w.dtype)
    d2 = (dy[:, None] ** 2 + dx[None, :] ** 2).reshape(-1)               # [(2H-1)(2W-1)]
    table = (w[:, :, None] * torch.exp(-d2 / (2 * (s[:, :, None] ** 2 + 1e-5)))).sum(1)   # [heads, offsets]

    def mixture(score, b, h, q_idx, kv_idx):
        off = (q_idx // W - kv_idx // W + H - 1) * (2 * W - 1) + (q_idx % W - kv_idx % W + W - 1)
        return score * table[h, off]
    return mixture


def _flex_setup(case, x):
    import pytest
    p = case.params
    device = x["q" if p["kind"] == "reduced" else "qkv"].device
    if case.backward:
        reason = _flex_backward_reason(device)
        if reason:
            pytest.skip(reason)
    from torch.nn.attention.flex_attention import flex_attention
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v = _leaves(case, x)
    scale = q.shape[-1] ** -0.5
    if p["kind"] == "axial":
        return _flex_axial(flex, q, k, v, x, scale)
    out_shape = q.shape[:-1] + v.shape[-1:]
    if p["kind"] == "reduced":
        mods = (None,)
    elif p["kind"] == "gaussian":
        mods = (_gaussian_mod(x, p),)
    else:
        mods = _polyline_mods(x, p)

    def call():
        qh, kh, vh = (_heads_first(t) for t in (q, k, v))
        outs = [flex(qh, kh, vh, score_mod=m, scale=scale) for m in mods]
        o = outs[0] if len(outs) == 1 else 0.5 * outs[0] + 0.5 * outs[1]
        return o.transpose(1, 2).reshape(out_shape)
    call()
    return call


def _lines(t, axis):
    """[B, H, W, heads, d] -> one sequence per image row (axis 2: [B H, heads, W, d]) or column
    (axis 1: [B W, heads, H, d]); a copy."""
    B, H, W, heads, d = t.shape
    if axis == 2:
        return t.permute(0, 1, 3, 2, 4).reshape(B * H, heads, W, d)
    return t.permute(0, 2, 3, 1, 4).reshape(B * W, heads, H, d)


def _image(t, axis, B, H, W):
    """The inverse of _lines."""
    heads, d = t.shape[1], t.shape[3]
    if axis == 2:
        return t.reshape(B, H, heads, W, d).permute(0, 1, 3, 2, 4)
    return t.reshape(B, W, heads, H, d).permute(0, 3, 1, 2, 4)


def _flex_axial(flex, q, k, v, x, scale):
    """0.5 A_h(A_w v) + 0.5 A_w(A_h v) as four flex calls on re-batched lines."""
    B, H, W = q.shape[:3]
    la, lb = x["log_alpha"].detach(), x["log_beta"].detach()
    # Inclusive prefix sums along each line, [lines, heads, L]: the segment (j, i] sums to P[i] - P[j].
    prefix = {2: la.permute(0, 1, 3, 2).reshape(B * H, -1, W).cumsum(-1),
              1: lb.permute(0, 2, 3, 1).reshape(B * W, -1, H).cumsum(-1)}

    def decay_mod(P):
        def mod(score, b, h, q_idx, kv_idx):
            d = P[b, h, q_idx] - P[b, h, kv_idx]
            return score + torch.where(q_idx >= kv_idx, d, -d)
        return mod
    mods = {axis: decay_mod(P) for axis, P in prefix.items()}

    def call():
        qk = {axis: (_lines(q, axis), _lines(k, axis)) for axis in (1, 2)}

        def attend(vals, axis):
            o = flex(*qk[axis], _lines(vals, axis), score_mod=mods[axis], scale=scale)
            return _image(o, axis, B, H, W)
        y_w, y_h = attend(v, 2), attend(v, 1)
        return 0.5 * attend(y_w, 1) + 0.5 * attend(y_h, 2)
    call()
    return call


PEERS = (Peer(name="flex", label=_flex_label, setup=_flex_setup, devices=("cpu", "cuda")),)


# ---------------------------------------------------------------- correctness gate
def _exact(case, x, cache):
    """fp64 output and gradients of every leaf (by name), from the reference's own math, once per case."""
    if "out" not in cache:
        from vitkernels.reference import masked_attention as ref
        q, k, v = _leaves(case, x)
        names = [n for n, t in x.items() if isinstance(t, torch.Tensor) and t.requires_grad]
        d = {n: t.detach().double().requires_grad_(n in names) for n, t in x.items()
             if isinstance(t, torch.Tensor) and n in ("q", "k", "v", *_TRAINED.get(case.params["kind"], ()),
                                                      "log_gamma")}
        args = _args(case, d, d["q"], d["k"], d["v"])
        out = getattr(ref, _OPS[case.params["kind"]])(*args)
        if case.backward:
            out.backward(x["grad_out"].double())
            cache["grads"] = {n: d[n].grad for n in names}
        cache["out"] = out.detach()
    return cache["out"], cache.get("grads")


def _rel_error(got, want, what):
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    return rel_error(got, want, what, CHECK_TOL)


def check(case, x, contender, out, cache):
    want, want_grads = _exact(case, x, cache)
    out, grads = out if case.backward else (out, None)
    facts = {"tol": CHECK_TOL, "out_error": _rel_error(out.detach(), want, "output")}
    if case.backward:
        # The harness returns the leaves' grads in the inputs dict's order, the order of want_grads.
        assert len(grads) == len(want_grads), f"{len(grads)} gradients, expected {list(want_grads)}"
        for (name, w), g in zip(want_grads.items(), grads):
            facts[f"d{name}_error"] = _rel_error(g, w, f"d{name}")
    return facts


FAMILY = Family("masked_attention", CASES, make_inputs, vitk=vitk, reference=reference, check=check, peer=PEERS)
test_masked_attention = FAMILY.pytest_function()
