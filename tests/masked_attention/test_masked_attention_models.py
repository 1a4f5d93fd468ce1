"""Blocks of vitkernels.models.masked_attention: PPMA (whole, chunk), RMT MaSA, GMM-ViT, PVTv2, S2AFormer.

(1) Each block's reference path (use_reference=True, the eager dense-mask functions) equals an eager
    transcription, written here in float64, of the paper's forward as its code computes it: PPMA's
    and RMT's [b, heads, h, w, d] layout with k scaled before RoPE and the mask built from cumulative
    sums, GMM's power form of the Gaussian, timm's PVTv2 reshapes. This pins the models' wiring.
(2) Fused vs reference: the same weights, fused in float32 against the reference in float64, output
    and the gradients of the input and of every parameter (PPMA's path embedding included), on odd,
    non-square grids.
(3) torch.compile(fullgraph=True) of a PPMA whole and chunk block, forward + backward, two batch
    sizes without recompiling.
(4) State-dict key names and shapes, hard-coded from the official code (PPMA.py, RMT.py, timm
    pvt_v2.py, GMM's models/vit.py + gmm.py), and loading the originals' extra buffers.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

import vitkernels  # noqa: F401
from vitkernels.models import masked_attention as ma

from attention_checks import check_compiles_without_recompiles, close_to as _close, randomize


def _unit(p):
    p.normal_(0, 1)


def _sigma(p):
    p.copy_(2 + torch.randn_like(p))


def _randomize(module):
    # Moderate scales keep the softmaxes away from one-hot so every gradient is exercised.
    return randomize(module, 0.2, dt_bias=_unit, A_log=lambda p: p.normal_(0, 0.5), alpha=_unit, mix_weight=_unit,
                     sigma=_sigma, mix_sigma=_sigma)


# ---------------------------------------------------------------- eager transcriptions of the papers
def _rot2(x):
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([-odd, even], -1).flatten(-2)


def _rope(x, sin, cos):                  # x [b, n, h, w, d], sin/cos [h, w, d]: the papers' layout
    return x * cos + _rot2(x) * sin


def _rope_table(key_dim, H, W, dtype):
    angle = (1.0 / (10000 ** torch.linspace(0, 1, key_dim // 2))).repeat_interleave(2).to(dtype)
    idx = torch.arange(H * W, dtype=dtype)[:, None] * angle[None]
    return idx.sin().view(H, W, -1), idx.cos().view(H, W, -1)


def _paper_decays(pe, x):
    """PPMA's PathEmbeding2D arithmetic: dt_linear per head, softplus(dt + dt_bias) * -exp(A_log)."""
    B, H, W, C = x.shape
    dt = pe.dt_linear(x.reshape(B, H * W, pe.nheads, C // pe.nheads))
    A = -torch.exp(pe.A_log)
    la = torch.nn.functional.softplus(dt[..., 0] + pe.dt_bias) * A
    lb = torch.nn.functional.softplus(dt[..., 1] + pe.dt_bias) * A
    return la.view(B, H, W, -1), lb.view(B, H, W, -1)


def _segsum(c, i, j):
    """sum over (min(i, j), max(i, j)] of x, given c = cumsum(x) along the indexed axis."""
    return c.gather(-1, torch.maximum(i, j)) - c.gather(-1, torch.minimum(i, j))


def _polyline_mask_paper(la, lb):
    """[B, heads, N, N] from the issue's formula: along the query's row with log_alpha, then down the
    key's column with log_beta, from cumulative sums (independent of the reference's construction)."""
    B, H, W, nh = la.shape
    N = H * W
    t = torch.arange(N)
    yq, xq = (t // W)[:, None].expand(N, N), (t % W)[:, None].expand(N, N)
    yk, xk = (t // W)[None, :].expand(N, N), (t % W)[None, :].expand(N, N)
    ca = la.permute(0, 3, 1, 2).cumsum(-1)                      # [B, nh, H, W] along W
    cb = lb.permute(0, 3, 2, 1).cumsum(-1)                      # [B, nh, W, H] along H
    row = ca[:, :, yq, :]                                       # [B, nh, N, N, W]: the query's row
    row = _segsum(row, xq[None, None, ..., None].expand(B, nh, N, N, 1),
                  xk[None, None, ..., None].expand(B, nh, N, N, 1))[..., 0]
    col = cb[:, :, xk, :]                                       # [B, nh, N, N, H]: the key's column
    col = _segsum(col, yq[None, None, ..., None].expand(B, nh, N, N, 1),
                  yk[None, None, ..., None].expand(B, nh, N, N, 1))[..., 0]
    return row + col


def _axis_mask_paper(decay):
    """[..., L] -> [..., L, L] segment sums, from the cumulative sum."""
    L = decay.shape[-1]
    c = decay.cumsum(-1)
    i = torch.arange(L)
    lo, hi = torch.minimum(i[:, None], i[None]), torch.maximum(i[:, None], i[None])
    return c[..., hi] - c[..., lo]


def _paper_qkv(blk, x, sin, cos):
    B, H, W, C = x.shape
    n = blk.num_heads
    q = blk.q_proj(x)
    k = blk.k_proj(x) * blk.scaling                              # PPMA / RMT: k scaled before RoPE
    v = blk.v_proj(x)
    lepe = blk.lepe.conv(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    q = _rope(q.view(B, H, W, n, -1).permute(0, 3, 1, 2, 4), sin, cos)
    k = _rope(k.view(B, H, W, n, -1).permute(0, 3, 1, 2, 4), sin, cos)
    v = v.view(B, H, W, n, -1).permute(0, 3, 1, 2, 4)
    return q, k, v, lepe


def paper_ppma_whole(blk, x, sin, cos):
    B, H, W, C = x.shape
    q, k, v, lepe = _paper_qkv(blk, x, sin, cos)
    mask = _polyline_mask_paper(*_paper_decays(blk.path_embed, x))
    s = q.flatten(2, 3) @ k.flatten(2, 3).transpose(-1, -2)
    p = 0.5 * torch.softmax(s + mask, -1) + 0.5 * torch.softmax(s + mask.transpose(-1, -2), -1)
    o = (p @ v.flatten(2, 3)).transpose(1, 2).reshape(B, H, W, -1)
    return blk.out_proj(o + lepe)


def paper_ppma_chunk(blk, x, sin, cos):
    B, H, W, C = x.shape
    q, k, v, lepe = _paper_qkv(blk, x, sin, cos)
    la, lb = _paper_decays(blk.path_embed, x)
    mask_w = _axis_mask_paper(la.permute(0, 1, 3, 2))            # [B, H, nh, W, W]
    mask_h = _axis_mask_paper(lb.permute(0, 2, 3, 1))            # [B, W, nh, H, H]
    a_w = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) + mask_w, -1)
    a_h = torch.softmax(q.permute(0, 3, 1, 2, 4) @ k.permute(0, 3, 1, 2, 4).transpose(-1, -2) + mask_h, -1)
    rows = a_w @ v.transpose(1, 2)                                # [B, H, nh, W, d]
    wh = (a_h @ rows.permute(0, 3, 2, 1, 4)).permute(0, 3, 1, 2, 4)          # cols after rows -> [B, H, W, nh, d]
    cols = a_h @ v.permute(0, 3, 1, 2, 4)                         # [B, W, nh, H, d]
    hw = (a_w @ cols.permute(0, 3, 2, 1, 4)).permute(0, 1, 3, 2, 4)          # rows after cols
    return blk.out_proj((0.5 * wh + 0.5 * hw).flatten(-2) + lepe)


def paper_rmt_all(blk, x, sin, cos, decay):
    B, H, W, C = x.shape
    q, k, v, lepe = _paper_qkv(blk, x, sin, cos)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    grid = torch.stack([ys, xs], -1).reshape(H * W, 2).to(x.dtype)
    mask = (grid[:, None] - grid[None]).abs().sum(-1) * decay[:, None, None]
    p = torch.softmax(q.flatten(2, 3) @ k.flatten(2, 3).transpose(-1, -2) + mask, -1)
    o = (p @ v.flatten(2, 3)).transpose(1, 2).reshape(B, H, W, -1)
    return blk.out_proj(o + lepe)


def paper_gmm(blk, x, H, W, alpha, sigma, to_qkv, to_out, heads, scale):
    """GMM-ViT: dots * scale, times sum_m alpha * table ** (1 / (sigma^2 + 1e-5)) with the paper's
    table exp(-d^2) ** (1/2), softmax, times v. alpha, sigma: [M, heads, 1, 1]."""
    B, N, _ = x.shape
    q, k, v = (t.view(B, N, heads, -1).transpose(1, 2) for t in to_qkv(x).chunk(3, dim=-1))
    t = torch.arange(N)
    dy, dx = (t // W)[:, None] - (t // W)[None], (t % W)[:, None] - (t % W)[None]
    table = torch.exp(-(dy ** 2 + dx ** 2).to(x.dtype)) ** 0.5
    g = torch.sum(alpha * table ** (1 / (sigma ** 2 + 1e-5)), 0)
    p = torch.softmax(g * ((q @ k.transpose(-1, -2)) * scale), -1)
    return to_out((p @ v).transpose(1, 2).reshape(B, N, -1))


def timm_pvt(blk, x, H, W):
    B, N, C = x.shape
    q = blk.q(x).reshape(B, N, blk.num_heads, -1).permute(0, 2, 1, 3)
    if blk.pool is not None:
        x_ = blk.sr(blk.pool(x.permute(0, 2, 1).reshape(B, C, H, W))).reshape(B, C, -1).permute(0, 2, 1)
        x_ = blk.act(blk.norm(x_))
    elif blk.sr is not None:
        x_ = blk.norm(blk.sr(x.permute(0, 2, 1).reshape(B, C, H, W)).reshape(B, C, -1).permute(0, 2, 1))
    else:
        x_ = x
    k, v = blk.kv(x_).reshape(B, -1, 2, blk.num_heads, blk.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    p = ((q @ k.transpose(-2, -1)) * blk.scale).softmax(-1)
    return blk.proj((p @ v).transpose(1, 2).reshape(B, N, C))


def ssa_dense(blk, x):
    """The SSA of the docstring, spelled out with a materialized [B, heads, N, Nk] attention."""
    B, H, W, C = x.shape
    r = x if blk.sr is None else blk.norm(blk.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    r = r.reshape(B, -1, C)
    q = blk.q(x).reshape(B, H * W, blk.num_heads, -1).transpose(1, 2)
    k = blk.k(r).reshape(B, r.shape[1], blk.num_heads, -1).transpose(1, 2)
    v = blk.v(r).reshape(B, r.shape[1], blk.num_heads, -1).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(blk.qk_dim), -1)
    return blk.proj((p @ v).transpose(1, 2).reshape(B, H, W, C))


# ---------------------------------------------------------------- block factories: (block, call, x)
GRIDS = [(5, 7), (4, 1), (6, 6)]


def _ppma(kind, H, W):
    cls = ma.MambaAttentionAllDouble if kind == "whole" else ma.MambaAttentionChunkDouble
    blk = _randomize(cls(32, 4))
    rp = ma.RotaryPositionEmbedding2D(32, 4, 2, 4)

    def call(b, x):
        return b(x, rp.to(x.dtype)((x.shape[1], x.shape[2])))
    return blk, call, torch.randn(2, H, W, 32)


def _rmt(H, W):
    blk = _randomize(ma.VisionRetentionAll(32, 4))
    rp = ma.RetNetRelPos2d(32, 4, 2, 4)

    def call(b, x):
        return b(x, rp.to(x.dtype)((x.shape[1], x.shape[2])))
    return blk, call, torch.randn(2, H, W, 32)


def _gmm(H, W):
    blk = _randomize(ma.GMMAttention(24, heads=3, dim_head=8, num_kernals=5))
    return blk, (lambda b, x: b(x, (H, W))), torch.randn(2, H * W, 24)


def _gmm_timm(H, W):
    blk = _randomize(ma.GMMViTAttention(24, num_heads=3, num_kernals=5, qkv_bias=True))
    return blk, (lambda b, x: b(x, (H, W))), torch.randn(2, H * W, 24)


def _pvt(H, W, sr_ratio=2, linear=False):
    blk = _randomize(ma.SpatialReductionAttention(32, num_heads=2, sr_ratio=sr_ratio, linear_attn=linear))
    return blk, (lambda b, x: b(x, (H, W))), torch.randn(2, H * W, 32)


def _ssa(H, W):
    blk = _randomize(ma.StripSelfAttention(32, num_heads=2, qk_dim=4, sr_ratio=2))
    return blk, (lambda b, x: b(x)), torch.randn(2, H, W, 32)


def _hpb(H, W):
    blk = _randomize(ma.HybridPerceptionBlock(32, num_heads=1, qk_dim=8, sr_ratio=2))
    return blk, (lambda b, x: b(x)), torch.randn(2, H, W, 32)


FACTORIES = {
    "ppma-whole": lambda H, W: _ppma("whole", H, W),
    "ppma-chunk": lambda H, W: _ppma("chunk", H, W),
    "rmt": _rmt,
    "gmm": _gmm,
    "gmm-timm": _gmm_timm,
    "pvt-sr2": _pvt,
    "pvt-sr1": lambda H, W: _pvt(H, W, sr_ratio=1),
    "pvt-linear": lambda H, W: _pvt(H, W, linear=True),
    "s2a-ssa": _ssa,
    "s2a-hpb": _hpb,
}


def _reference_copy(block, dtype=torch.float64):
    ref = copy.deepcopy(block).to(dtype)
    ref.use_reference = True
    return ref


# ---------------------------------------------------------------- (1) reference paths equal the papers
@pytest.mark.parametrize("H,W", GRIDS)
def test_ppma_blocks_match_ppma(H, W):
    for kind, paper in (("whole", paper_ppma_whole), ("chunk", paper_ppma_chunk)):
        blk, call, x = _ppma(kind, H, W)
        ref = _reference_copy(blk)
        x = x.double()
        sin, cos = _rope_table(8, H, W, torch.float64)
        with torch.no_grad():
            _close(call(ref, x), paper(ref, x, sin, cos), 1e-10, kind)


@pytest.mark.parametrize("H,W", GRIDS)
def test_rmt_block_matches_rmt(H, W):
    blk, call, x = _rmt(H, W)
    ref = _reference_copy(blk)
    x = x.double()
    sin, cos = _rope_table(8, H, W, torch.float64)
    decay = torch.log(1 - 2 ** (-2 - 4 * torch.arange(4, dtype=torch.float) / 4)).double()   # RMT's, in fp32
    with torch.no_grad():
        _close(call(ref, x), paper_rmt_all(ref, x, sin, cos, decay), 1e-10)


@pytest.mark.parametrize("H,W", [(5, 7), (4, 4)])
def test_gmm_blocks_match_the_paper(H, W):
    blk, call, x = _gmm(H, W)
    ref, x = _reference_copy(blk), x.double()
    with torch.no_grad():
        expect = paper_gmm(ref, x, H, W, ref.mask.alpha, ref.mask.sigma, ref.to_qkv, ref.to_out, 3, ref.scale)
        _close(call(ref, x), expect, 1e-10)
    blk, call, x = _gmm_timm(H, W)
    ref, x = _reference_copy(blk), x.double()
    with torch.no_grad():
        alpha, sigma = (p.t()[:, :, None, None] for p in (ref.mix_weight, ref.mix_sigma))
        _close(call(ref, x), paper_gmm(ref, x, H, W, alpha, sigma, ref.qkv, ref.proj, 3, ref.scale), 1e-10)


def test_gmm_square_grid_default():
    blk, _, x = _gmm(4, 4)
    ref = _reference_copy(blk)
    with torch.no_grad():
        _close(ref(x.double()), ref(x.double(), (4, 4)), 0)
    with pytest.raises(ValueError, match="feat_size"):
        ref(torch.randn(1, 17, 24, dtype=torch.float64))        # a class token + 16 grid tokens


@pytest.mark.parametrize("variant", ["pvt-sr2", "pvt-sr1", "pvt-linear"])
@pytest.mark.parametrize("H,W", [(7, 5), (8, 8)])
def test_pvt_block_matches_timm(variant, H, W):
    blk, call, x = FACTORIES[variant](H, W)
    ref, x = _reference_copy(blk), x.double()
    with torch.no_grad():
        _close(call(ref, x), timm_pvt(ref, x, H, W), 1e-10)


@pytest.mark.parametrize("H,W", [(7, 5), (8, 8)])
def test_s2aformer_blocks_match_their_definition(H, W):
    blk, call, x = _ssa(H, W)
    ref, x = _reference_copy(blk), x.double()
    with torch.no_grad():
        _close(call(ref, x), ssa_dense(ref, x), 1e-10)
        hpb = _reference_copy(_hpb(H, W)[0])
        y = x + hpb.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = y + ssa_dense(hpb.attn, hpb.norm1(y))
        y = y + hpb.lim.pwconv(hpb.lim.act(hpb.lim.dwconv(hpb.norm2(y).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)))
        y = y + hpb.mlp.fc2(hpb.mlp.act(hpb.mlp.fc1(hpb.norm3(y))))
        _close(hpb(x), y, 1e-10, "hpb")


def test_rmt_decay_and_rejects_dense_mask():
    rp = ma.RetNetRelPos2d(64, 8, 2, 4)
    h = torch.arange(8, dtype=torch.float)
    torch.testing.assert_close(rp.decay, torch.log(1 - 2 ** (-2 - 4 * h / 8)))
    blk = ma.VisionRetentionAll(64, 8, use_reference=True)
    (sin, cos), decay = rp((3, 4))
    dense = decay[:, None, None].expand(8, 12, 12)
    with pytest.raises(ValueError, match="rel_pos"):
        blk(torch.randn(1, 3, 4, 64), ((sin, cos), dense))


# ---------------------------------------------------------------- (2) fused vs reference
def _run(block, call, x, g):
    x = x.clone().requires_grad_(True)
    block.zero_grad()
    out = call(block, x)
    (out * g).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


@pytest.mark.parametrize("H,W", GRIDS)
@pytest.mark.parametrize("name", list(FACTORIES))
def test_fused_block_matches_reference(name, H, W):
    if name.startswith("pvt") or name.startswith("s2a"):
        H, W = H + 2, W + 2            # reduction by 2 needs at least 2 x 2; still odd shapes
    block, call, x = FACTORIES[name](H, W)
    assert not block.use_reference
    ref = _reference_copy(block)
    g = torch.randn_like(call(ref, x.double()))
    out, dx, dp = _run(block, call, x, g)
    out_r, dx_r, dp_r = _run(ref, call, x.double(), g)
    assert out.dtype == torch.float32
    _close(out, out_r, 1e-4)
    _close(dx, dx_r, 1e-3, "grad x")
    assert dp.keys() == dp_r.keys()
    for n in dp:
        assert dp[n] is not None, f"{n}: no gradient"
        _close(dp[n], dp_r[n], 1e-3, f"grad {n}")


def test_fused_blocks_pass_strided_views(monkeypatch):
    # q, k, v reach the ops as views of the projections (no contiguous copies in the model code).
    seen = []
    real = ma._ops.reduced_attention

    def spy(*args):
        seen.append(args[:3])
        return real(*args)
    monkeypatch.setattr(ma._ops, "reduced_attention", spy)
    blk, call, x = _pvt(6, 6)
    call(blk, x)
    q, k, v = seen[-1]
    assert k._base is not None and k._base is v._base and not k.is_contiguous()


# ---------------------------------------------------------------- (3) torch.compile
class _PPMALayer(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.Relpos = ma.RotaryPositionEmbedding2D(32, 4, 2, 4)
        cls = ma.MambaAttentionAllDouble if kind == "whole" else ma.MambaAttentionChunkDouble
        self.retention = _randomize(cls(32, 4))

    def forward(self, x):
        return self.retention(x, self.Relpos((x.shape[1], x.shape[2])))


@pytest.mark.parametrize("kind", ["whole", "chunk"])
def test_ppma_block_compiles_without_graph_breaks_or_recompiles(kind):
    check_compiles_without_recompiles(_PPMALayer(kind), (5, 7, 32))


# ---------------------------------------------------------------- (4) parameter names of the originals
PPMA_KEYS = {  # PPMA.py MambaAttentionAllDouble / MambaAttentionChunkDouble(embed_dim=32, num_heads=4)
    "q_proj.weight": (32, 32), "q_proj.bias": (32,), "k_proj.weight": (32, 32), "k_proj.bias": (32,),
    "v_proj.weight": (32, 32), "v_proj.bias": (32,), "lepe.conv.weight": (32, 1, 5, 5), "lepe.conv.bias": (32,),
    "out_proj.weight": (32, 32), "out_proj.bias": (32,),
    "path_embed.dt_bias": (4,), "path_embed.A_log": (4,), "path_embed.dt_linear.weight": (2, 8)}
RMT_KEYS = {k: s for k, s in PPMA_KEYS.items() if not k.startswith("path_embed")}   # RMT.py VisionRetentionAll
GMM_KEYS = {  # GMM models/vit.py Attention(dim=24, heads=3, dim_head=8, is_GMM=True, num_kernals=5)
    "to_qkv.weight": (72, 24), "to_out.0.weight": (24, 24), "to_out.0.bias": (24,),
    "mask.sigma": (5, 3, 1, 1), "mask.alpha": (5, 3, 1, 1)}
PVT_KEYS = {  # timm pvt_v2.py Attention(dim=32, num_heads=2, sr_ratio=2)
    "q.weight": (32, 32), "q.bias": (32,), "kv.weight": (64, 32), "kv.bias": (64,),
    "proj.weight": (32, 32), "proj.bias": (32,), "sr.weight": (32, 32, 2, 2), "sr.bias": (32,),
    "norm.weight": (32,), "norm.bias": (32,)}
TIMM_VIT_KEYS = {"qkv.weight": (72, 24), "qkv.bias": (72,), "proj.weight": (24, 24), "proj.bias": (24,)}


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_state_dict_names_match_the_papers():
    assert _shapes(ma.MambaAttentionAllDouble(32, 4)) == PPMA_KEYS
    assert _shapes(ma.MambaAttentionChunkDouble(32, 4)) == PPMA_KEYS
    assert _shapes(ma.VisionRetentionAll(32, 4)) == RMT_KEYS
    assert _shapes(ma.RotaryPositionEmbedding2D(32, 4, 2, 4)) == {"angle": (8,)}
    assert _shapes(ma.RetNetRelPos2d(32, 4, 2, 4)) == {"angle": (8,), "decay": (4,)}
    assert _shapes(ma.GMMAttention(24, heads=3, dim_head=8, num_kernals=5)) == GMM_KEYS
    assert _shapes(ma.SpatialReductionAttention(32, 2, sr_ratio=2)) == PVT_KEYS
    lin = dict(PVT_KEYS, **{"sr.weight": (32, 32, 1, 1)})
    assert _shapes(ma.SpatialReductionAttention(32, 2, sr_ratio=8, linear_attn=True)) == lin
    assert _shapes(ma.SpatialReductionAttention(32, 2, sr_ratio=1)) == {
        k: s for k, s in PVT_KEYS.items() if k.split(".")[0] in ("q", "kv", "proj")}
    timm_like = ma.GMMViTAttention(24, num_heads=3, num_kernals=5, qkv_bias=True)
    assert _shapes(timm_like) == dict(TIMM_VIT_KEYS, mix_weight=(3, 5), mix_sigma=(3, 5))
    # A plain timm ViT attention's weights load; only the two mixture parameters are new.
    result = timm_like.load_state_dict({k: torch.randn(s) for k, s in TIMM_VIT_KEYS.items()}, strict=False)
    assert sorted(result.missing_keys) == ["mix_sigma", "mix_weight"] and not result.unexpected_keys
    assert list(ma.StripSelfAttention(32, 2, 4, 2).state_dict()) == [
        "q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "sr.weight", "sr.bias",
        "norm.weight", "norm.bias", "proj.weight", "proj.bias"]


def test_original_checkpoints_load():
    # PPMA / RMT checkpoints of a block (PathEmbeding2D's init is random: load a different one).
    src = _randomize(ma.MambaAttentionAllDouble(32, 4))
    dst = ma.MambaAttentionChunkDouble(32, 4)
    dst.load_state_dict(src.state_dict(), strict=True)
    assert torch.equal(dst.path_embed.A_log, src.path_embed.A_log)
    # GMM's checkpoints carry the [1, 1, N, N] distance table as mask.mask: dropped, recomputed.
    gmm = ma.GMMAttention(24, heads=3, dim_head=8, num_kernals=5)
    sd = {k: torch.randn(s) for k, s in GMM_KEYS.items()}
    sd["mask.mask"] = torch.rand(1, 1, 16, 16)
    gmm.load_state_dict(sd, strict=True)
    assert torch.equal(gmm.mask.alpha, sd["mask.alpha"])
    # RMT's RetNetRelPos2d buffers are persistent, as in RMT.
    rp = ma.RetNetRelPos2d(32, 4, 2, 4)
    rp.load_state_dict({"angle": torch.rand(8), "decay": -torch.rand(4)}, strict=True)
