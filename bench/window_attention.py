"""Shifted-window attention family: torch.ops.vitk.window_attention at Swin / Swin-V2 stage shapes and
torch.ops.vitk.varlen_attention at Qwen2.5-VL's windowed vision encoder, forward and forward+backward.

Inputs are laid out as the models produce them: q, k, v are strided slices of one packed qkv-linear
output, [B, H, W, 3, heads, hd] (varlen: [tokens, 3, heads, hd]), never made contiguous, and the
relative-position bias is a random [(2wh-1)(2ww-1), heads] table. Every case runs in two modes:
  fwd       the call alone (q, k, v do not require grad: inference);
  fwd+bwd   out = f(q, k, v, ...); out.backward(grad_out), with q, k, v three leaves that still view
            the packed storage (detached slices, so autograd's select-backward into one packed
            gradient is not part of anyone's time); .grad is reset to None inside the timed region,
            for every contender alike. The bias table is a constant, not a leaf, in both modes.

FLOPs count the real tokens of each window, 4*heads*N^2*hd per window for the forward (Q K^T and
P V); no case here has padded windows (every H, W is a multiple of its window, and Qwen's short edge
windows are separate segments). fwd+bwd counts 3x that: the backward's useful work is four such
matmuls (dV, dP, dQ, dK); FlashAttention's "2.5x" convention is the backward alone including its
recomputation of Q K^T, which is not useful arithmetic. Bytes: q, k, v, out (fwd+bwd: plus grad_out,
dq, dk, dv) once each, and the bias table.

Peers: FlexAttention on the CPU (torch.compile(flex_attention), inductor's C++ template). Swin cases:
the relative-position bias is a score_mod gathering from the table by the two tokens' in-window
coordinates, plus -100 between different shift regions (timm's rule, as in the reference); the
windows are a BlockMask (same-window pairs only, one block per window: BLOCK_SIZE = wh*ww) built
once in setup, which needs the tokens in window order. So there are two Flex contenders:
  flex       end to end on the same image-layout inputs as everyone else: the roll + window partition
             of q, k, v (one gather each) and the reverse of the output run inside the timed region;
  flex-pre   the same compiled call on q, k, v permuted in setup (output left in window order): Flex's
             attention alone, without the permutation cost the other contenders pay.
Varlen: a document-id BlockMask from the segment ids (32-token blocks: every segment boundary is a
multiple of 32, and 32 ran faster than 64 or 128 here); the tokens are already in window order, so
flex-pre would repeat flex and is skipped.

Varlen fwd+bwd, eager and compile: the reference slices q, k, v and writes the output per segment,
and autograd turns each slice into a full-size [tokens, heads, hd] gradient (zeros + copy + add, per
segment and tensor: O(segments x tokens) memory traffic), which dominates their time (~20 s a call
here). Qwen's own loop (torch.split + torch.cat) has one split/cat backward instead; this file times
the reference as it is, so read those two numbers as the reference's, not Qwen's.

The peers' setup time (block mask + compile + first call) is their setup_s in the JSON, as compile_s
is the compile contender's. FlexAttention has no CPU backward in torch 2.13 (NotImplementedError):
fwd+bwd Flex items are skipped with that reason.
"""
import torch

from harness import Case, Family, Peer
from harness.checks import rel_error

CHECK_TOL = 1e-4        # max |error| / max |fp64 value|, per output and per gradient
FWD_BWD_FLOPS = 3.0     # fwd+bwd useful FLOPs / forward FLOPs (see the docstring)
FP32 = 4.0              # bytes per element: every case is fp32


# ---------------------------------------------------------------- cases
def _swin(name, B, H, W, heads, hd, win, shift, backward):
    N = win * win
    nW = (H // win) * (W // win)
    fwd_flops = 4.0 * B * nW * heads * N * N * hd
    tensor = B * H * W * heads * hd * FP32
    table = (2 * win - 1) ** 2 * heads * FP32
    scores = B * nW * heads * N * N * FP32
    return Case(
        name=name + ("-fwd+bwd" if backward else "-fwd"),
        shape=f"B={B} {H}x{W} w{win} s{shift} {heads}x{hd}",
        params=dict(kind="window", B=B, H=H, W=W, heads=heads, hd=hd, win=win, shift=shift),
        flops=fwd_flops * (FWD_BWD_FLOPS if backward else 1.0),
        bytes=(8 if backward else 4) * tensor + table,
        # Eager holds the scores, scores + bias, + mask and the softmax (backward: their grads too),
        # and copies q, k, v twice (roll, partition); inductor's graph peaks lower, never higher.
        est_bytes={"eager": (8 if backward else 4) * scores + 8 * tensor,
                   "compile": (8 if backward else 4) * scores + 8 * tensor},
        est_why={"eager": "[B*windows, heads, N, N] fp32 score tensors",
                 "compile": "[B*windows, heads, N, N] fp32 score tensors"},
        backward=backward,
    )


def _qwen_window_lengths(grid, window):
    """Segment lengths in Qwen2.5-VL's window order: windows row-major over the patch grid, the last
    row and column cut short when the grid is not a multiple of the window."""
    sides = [min(window, grid - s) for s in range(0, grid, window)]
    return [a * b for a in sides for b in sides]


def _varlen(name, grid, window, heads, hd, backward):
    lens = _qwen_window_lengths(grid, window)
    T = sum(lens)
    fwd_flops = 4.0 * heads * hd * sum(n * n for n in lens)
    tensor = T * heads * hd * FP32
    return Case(
        name=name + ("-fwd+bwd" if backward else "-fwd"),
        shape=f"T={T} {len(lens)} windows<={window * window} {heads}x{hd}",
        params=dict(kind="varlen", grid=grid, window=window, heads=heads, hd=hd, lens=lens, T=T),
        flops=fwd_flops * (FWD_BWD_FLOPS if backward else 1.0),
        bytes=(8 if backward else 4) * tensor,
        backward=backward,
    )


_CONFIGS = [
    # Swin-T at 224: stages 1-4 (the last stage's 7x7 map is one window, so timm drops the shift).
    ("Swin-T-224-s1", dict(B=8, H=56, W=56, heads=3, hd=32, win=7, shift=3)),
    ("Swin-T-224-s2", dict(B=8, H=28, W=28, heads=6, hd=32, win=7, shift=3)),
    ("Swin-T-224-s3", dict(B=8, H=14, W=14, heads=12, hd=32, win=7, shift=3)),
    ("Swin-T-224-s4", dict(B=8, H=7, W=7, heads=24, hd=32, win=7, shift=0)),
    ("Swin-B-384-s1", dict(B=8, H=96, W=96, heads=4, hd=32, win=12, shift=6)),
    ("SwinV2-T-256-s1", dict(B=8, H=64, W=64, heads=3, hd=32, win=8, shift=4)),
]

CASES = [_swin(name, backward=bwd, **cfg) for bwd in (False, True) for name, cfg in _CONFIGS] + [
    # 1288x1288 px / 14 px patches = 92x92 tokens; 112 px windows = 8x8 patches, 92 = 11*8 + 4.
    _varlen("Qwen2.5-VL-1288px", grid=92, window=8, heads=16, hd=80, backward=bwd) for bwd in (False, True)]


# ---------------------------------------------------------------- inputs and calls
def make_inputs(case, gen):
    p = case.params
    if p["kind"] == "window":
        lead = (p["B"], p["H"], p["W"])
        x = {"qkv": torch.randn(*lead, 3, p["heads"], p["hd"], generator=gen),
             "bias": torch.randn((2 * p["win"] - 1) ** 2, p["heads"], generator=gen)}
    else:
        # Generated directly in window order: Qwen permutes the tokens once before the blocks, and a
        # permutation of i.i.d. tokens is i.i.d. tokens; only the segment lengths matter here.
        lead = (p["T"],)
        x = {"qkv": torch.randn(*lead, 3, p["heads"], p["hd"], generator=gen),
             "cu_seqlens": torch.tensor([0] + p["lens"], dtype=torch.int64).cumsum(0).to(torch.int32)}
    if case.backward:
        x["grad_out"] = torch.randn(*lead, p["heads"], p["hd"], generator=gen)
    return x


def _qkv(case, x):
    """q, k, v as views of the packed tensor, created once per case (after the harness moved the
    inputs to the device, so they stay views there) and stored in the inputs dict: the harness finds
    the leaves of a backward case among its tensors."""
    if "q" not in x:
        dim = 3 if case.params["kind"] == "window" else 1
        for i, name in enumerate("qkv"):
            x[name] = x["qkv"].select(dim, i).detach().requires_grad_(case.backward)
    return x["q"], x["k"], x["v"]


def _window_args(case):
    p = case.params
    return [p["win"], p["win"]], [p["shift"], p["shift"]]


def vitk(case, x):
    import vitkernels.ops.window_attention  # noqa: F401  (registers torch.ops.vitk.*_attention)
    q, k, v = _qkv(case, x)
    if case.params["kind"] == "varlen":
        return torch.ops.vitk.varlen_attention, (q, k, v, x["cu_seqlens"], max(case.params["lens"])), {}
    win, shift = _window_args(case)
    return torch.ops.vitk.window_attention, (q, k, v, win, shift, x["bias"]), {}


def reference(case, x):
    from vitkernels.reference import window_attention as ref
    q, k, v = _qkv(case, x)
    if case.params["kind"] == "varlen":
        return ref.varlen_attention, (q, k, v, x["cu_seqlens"], max(case.params["lens"])), {}
    win, shift = _window_args(case)
    return ref.window_attention, (q, k, v, win, shift, x["bias"]), {}


# ---------------------------------------------------------------- peers: FlexAttention
def _flex_label(variant):
    def label():
        return f"{variant} (torch {torch.__version__} compiled flex_attention)"
    return label


def _flex_backward_reason(device):
    """Why FlexAttention cannot run a backward on `device` (None: it can), from a tiny eager try:
    the compiled CPU lowering refuses training for the same reason."""
    from torch.nn.attention.flex_attention import flex_attention
    q = torch.randn(1, 1, 128, 16, device=device, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except NotImplementedError as exc:
        return f"no {device} backward (torch {torch.__version__}: {str(exc).splitlines()[0]})"
    return None


def _window_order(case, device):
    """[H*W] image-token index of each token in window order: roll by -shift, then partition, so
    window w holds tokens w*N .. w*N + N - 1 in row-major order within the window; and for each
    window-order token its shift region (timm's 3 x 3 slices of the rolled grid)."""
    p = case.params
    H, W, win, s = p["H"], p["W"], p["win"], p["shift"]
    t = torch.arange(H * W, device=device)
    window, pos = t // (win * win), t % (win * win)
    y = (window // (W // win)) * win + pos // win                  # in the rolled grid
    x = (window % (W // win)) * win + pos % win
    order = ((y + s) % H) * W + (x + s) % W                        # torch.roll(-s): rolled[y] = img[y + s]

    def axis_region(c, n):
        # timm's slices (0, -win), (-win, -s), (-s, None)
        return torch.where(c < n - win, 0, torch.where(c < n - s, 1, 2))
    region = axis_region(y, H) * 3 + axis_region(x, W)
    return order, region


def _flex_build(case, x):
    """The compiled flex call, its block mask and score_mod, shared by flex and flex-pre of a case
    (same shapes and strides, so flex-pre reuses flex's compiled graph)."""
    if "_flex" in x:
        return x["_flex"]
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    p = case.params
    device = x["qkv"].device
    # Its own dynamo state, as the harness gives the compile contender, and no automatic dynamic
    # shapes if cases run back to back without a reset (-k peer).
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    if p["kind"] == "varlen":
        lens = torch.tensor(p["lens"], device=device)
        seg = torch.repeat_interleave(torch.arange(len(p["lens"]), device=device), lens)

        def same_segment(b, h, q_idx, kv_idx):
            return seg[q_idx] == seg[kv_idx]
        # Every segment boundary is a multiple of 32 (64- and 32-token windows; the one 16-token
        # window is last), so 32-token blocks are all full or empty: no partial-block mask work.
        mask = create_block_mask(same_segment, None, None, p["T"], p["T"], device=device, BLOCK_SIZE=32)
        built = {"flex": flex, "mask": mask, "score_mod": None}
    else:
        win, H, W = p["win"], p["H"], p["W"]
        N, L = win * win, H * W
        order, region = _window_order(case, device)
        table = x["bias"]
        shifted = p["shift"] > 0

        def same_window(b, h, q_idx, kv_idx):
            return q_idx // N == kv_idx // N

        def rel_bias(score, b, h, q_idx, kv_idx):
            qp, kp = q_idx % N, kv_idx % N
            idx = (qp // win - kp // win + win - 1) * (2 * win - 1) + (qp % win - kp % win + win - 1)
            score = score + table[idx, h]
            if shifted:
                score = score + torch.where(region[q_idx] == region[kv_idx], 0.0, -100.0)
            return score
        mask = create_block_mask(same_window, None, None, L, L, device=device, BLOCK_SIZE=N)
        built = {"flex": flex, "mask": mask, "score_mod": rel_bias, "order": order,
                 "inverse": torch.argsort(order)}
    x["_flex"] = built
    return built


def _to_windows(t, order):
    # [B, H, W, heads, d] (strided) -> [B, heads, H*W, d] in window order: one gather, and a
    # transposed view that flex reads as it is (only the last dim must be contiguous).
    return t.flatten(1, 2).index_select(1, order).transpose(1, 2)


def _flex_setup(prepermuted):
    def setup(case, x):
        p = case.params
        if case.backward:
            reason = _flex_backward_reason(x["qkv"].device)
            if reason:
                import pytest
                pytest.skip(reason)
        if prepermuted and p["kind"] == "varlen":
            import pytest
            pytest.skip("same as flex: varlen tokens are already in window order")
        if prepermuted and case.backward:
            # Its leaves would be the permuted copies, not q, k, v: no comparable gradients.
            import pytest
            pytest.skip("forward only")
        f = _flex_build(case, x)
        flex, mask, score_mod = f["flex"], f["mask"], f["score_mod"]
        q, k, v = _qkv(case, x)
        if p["kind"] == "varlen":
            def call():
                o = flex(*(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)), block_mask=mask)
                # [T, heads, d] rows, the layout the op returns and the output projection reads.
                return o[0].transpose(0, 1).contiguous()
        elif prepermuted:
            qw, kw, vw = (_to_windows(t, f["order"]) for t in (q, k, v))

            def call():
                return flex(qw, kw, vw, score_mod=score_mod, block_mask=mask)
        else:
            order, inverse = f["order"], f["inverse"]
            shape = q.shape[:-1] + v.shape[-1:]

            def call():
                o = flex(*(_to_windows(t, order) for t in (q, k, v)), score_mod=score_mod, block_mask=mask)
                return o.transpose(1, 2).index_select(1, inverse).view(shape)
        call()                  # compile (flex) or load the compiled graph (flex-pre): setup_s
        return call
    return setup


PEERS = (Peer(name="flex", label=_flex_label("flex"), setup=_flex_setup(False), devices=("cpu", "cuda")),
         Peer(name="flex-pre", label=_flex_label("flex-pre"), setup=_flex_setup(True), devices=("cpu", "cuda")))


# ---------------------------------------------------------------- correctness gate
def _varlen_fp64(q, k, v, lens):
    """Block-diagonal attention per segment through one split and one cat: the reference's per-segment
    slicing makes autograd build a full-size gradient for every segment (~20 s at fp32 here)."""
    outs = []
    for qs, ks, vs in zip(*(t.split(lens) for t in (q, k, v))):
        qs, ks, vs = (t.transpose(0, 1) for t in (qs, ks, vs))
        p = ((qs * qs.shape[-1] ** -0.5) @ ks.transpose(-2, -1)).softmax(-1)
        outs.append((p @ vs).transpose(0, 1))
    return torch.cat(outs)


def _exact(case, x, cache):
    """fp64 output (and gradients of q, k, v for a backward case), once per case: the reference's
    own math in fp64 (varlen: the same math, see _varlen_fp64)."""
    if "out" not in cache:
        from vitkernels.reference import window_attention as ref
        p = case.params
        q, k, v = (t.detach().double().requires_grad_(case.backward) for t in _qkv(case, x))
        if p["kind"] == "varlen":
            out = _varlen_fp64(q, k, v, p["lens"])
        else:
            win, shift = _window_args(case)
            out = ref.window_attention(q, k, v, win, shift, x["bias"].double())
        if case.backward:
            out.backward(x["grad_out"].double())
            cache["grads"] = (q.grad, k.grad, v.grad)
        cache["out"] = out.detach()
    return cache["out"], cache.get("grads")


def _rel_error(got, want, what):
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    return rel_error(got, want, what, CHECK_TOL)


def check(case, x, contender, out, cache):
    want, want_grads = _exact(case, x, cache)
    out, grads = out if case.backward else (out, None)
    if contender == "peer2":            # flex-pre: output left in window order, [B, heads, H*W, d]
        out = out.detach().transpose(1, 2).index_select(1, x["_flex"]["inverse"]).view(want.shape)
    facts = {"tol": CHECK_TOL, "out_error": _rel_error(out.detach(), want, "output")}
    if case.backward:
        for name, g, w in zip("qkv", grads, want_grads):
            facts[f"d{name}_error"] = _rel_error(g, w, f"d{name}")
    return facts


FAMILY = Family("window_attention", CASES, make_inputs, vitk=vitk, reference=reference, check=check, peer=PEERS)
test_window_attention = FAMILY.pytest_function()
