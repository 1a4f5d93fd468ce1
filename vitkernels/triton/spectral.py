"""Triton kernels of the spectral family: GFNet's global filter and Multi-Dimensional Hyena's 2-D
long convolution.

Plain functions called by vitkernels/ops/spectral.py after it has validated the arguments:

    global_filter(x, weight) -> Tensor
    global_filter_backward(grad_output, x, weight, x_grad, weight_grad) -> (grad_x, grad_weight)
    fftconv2d(u, k, D) -> Tensor
    fftconv2d_backward(grad_output, u, k, D, u_grad, k_grad, D_grad) -> (grad_u, grad_k, grad_D)

global_filter: ViT grids are small and not powers of two, so each transform is a dense DFT, four
matrix products per channel plane that tl.dot runs on the tensor cores (the CPU kernel,
csrc/cpu/spectral/global_filter.cpp, runs FFTs over channel vectors instead, having no such units) (fp32, fp64 for fp64 inputs) (tl.dot on the H x W plane padded to powers of two, with the orthonormal DFT matrices):
the real DFT along W, the complex DFT along H, the filter, and the two inverses. Its adjoint is the
same operator with the filter conjugated; grad_weight sums the products of the two spectra over the
batch, counting the columns the real inverse counts twice.

The plan is the CPU kernel's (csrc/cpu/spectral/fftconv2d.cpp): on ViT grids the direct sum over
the taps, y[i, j] = sum_{a <= i, q <= j} k[a, q] u[i - a, j - q] + D u[i, j], costs less than any
transform and keeps a NaN where it belongs. One program computes one output row of a block of
channels, a [BLOCK_C, BLOCK_W] tile in fp32 registers (fp64 for fp64 inputs), looping over the rows a <= i and the column
lags q of the filter. The backward is the same kernel on flipped planes for grad_u
(flip(conv(flip(g), k)) + D g), and a second kernel for grad_k, the correlation of g with u summed
over the batch, whose (0, 0) lag is also grad_D.

The kernels also run on the CPU under TRITON_INTERPRET=1 (set before triton is imported), which is
how they are tested on machines without a GPU.
"""
import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import device_ctx, launcher


# ------------------------------------------------------------------------------- global_filter
@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _table(p, R: tl.constexpr, C: tl.constexpr):
    """A contiguous [R, C] table (fp32, or fp64 for fp64 inputs)."""
    return tl.load(p + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])


@triton.jit
def _rfft2(x_ptr, s_h, s_w, H, W, cw, sw, ch, sh, HP: tl.constexpr, WP: tl.constexpr, KP: tl.constexpr,
           ACC: tl.constexpr):
    """The orthonormal rfft2 of one plane read through strides: (re, im) [HP, KP]. cw, sw [WP, KP] are
    cos and sin of the W DFT, ch, sh [HP, HP] those of the H DFT (zero outside the plane)."""
    h = tl.arange(0, HP)
    w = tl.arange(0, WP)
    x = tl.load(x_ptr + h[:, None] * s_h + w[None, :] * s_w, mask=(h < H)[:, None] & (w < W)[None, :],
                other=0.0).to(ACC)
    ar = _mm(x, _table(cw, WP, KP))
    ai = -_mm(x, _table(sw, WP, KP))
    # (c - i s)(ar + i ai), summed over the rows
    c = _table(ch, HP, HP)
    s = _table(sh, HP, HP)
    return _mm(c, ar) + _mm(s, ai), _mm(c, ai) - _mm(s, ar)


@triton.jit
def _filter_kernel(x, x_b, x_h, x_w, x_c, wt, w_h, w_k, w_c, w_r, out, H, W, K, C, cw, sw, ch, sh, icw, isw,
                   CONJ: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr):
    """out[b, :, :, c] (contiguous [B, H, W, C]) = irfft2(rfft2(x[b, :, :, c]) * w[:, :, c]) (ortho);
    the conjugate filter with CONJ. icw, isw [KP, WP]: the real inverse's cos and sin, doubled where
    the inverse counts a column twice."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    yr, yi = _rfft2(x + b * x_b + c * x_c, x_h, x_w, H, W, cw, sw, ch, sh, HP, WP, KP, ACC)
    h = tl.arange(0, HP)
    k = tl.arange(0, KP)
    m = (h < H)[:, None] & (k < K)[None, :]
    wp = wt + h[:, None] * w_h + k[None, :] * w_k + c * w_c
    fr = tl.load(wp, mask=m, other=0.0).to(ACC)
    fi = tl.load(wp + w_r, mask=m, other=0.0).to(ACC)
    if CONJ:
        fi = -fi
    zr = yr * fr - yi * fi
    zi = yr * fi + yi * fr
    # the inverse along H, (c + i s) z, then the real inverse along W
    tc = _table(ch, HP, HP)
    ts = _table(sh, HP, HP)
    vr = _mm(tc, zr) - _mm(ts, zi)
    vi = _mm(tc, zi) + _mm(ts, zr)
    y = _mm(vr, _table(icw, KP, WP)) - _mm(vi, _table(isw, KP, WP))
    w = tl.arange(0, WP)
    tl.store(out + ((b * H + h[:, None]) * W + w[None, :]) * C + c, y.to(out.dtype.element_ty),
             mask=(h < H)[:, None] & (w < W)[None, :])


@triton.jit
def _filter_grad_w_kernel(g, g_b, g_h, g_w, g_c, x, x_b, x_h, x_w, x_c, out, B, H, K, W, C, cw, sw, ch, sh,
                          HP: tl.constexpr, WP: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr):
    """out[:, :, c, :] (fp32, contiguous [H, K, C, 2]) = sum_b m_k (Re, Im) of products of the spectra
    of g and x: dL/dwr = Re(G) Xr + Im(G) Xi, dL/dwi = Im(G) Xr - Re(G) Xi, G = m rfft2(g)."""
    c = tl.program_id(0)
    h = tl.arange(0, HP)
    k = tl.arange(0, KP)
    accr = tl.zeros([HP, KP], dtype=ACC)
    acci = tl.zeros([HP, KP], dtype=ACC)
    for b in range(0, B):
        xr, xi = _rfft2(x + b * x_b + c * x_c, x_h, x_w, H, W, cw, sw, ch, sh, HP, WP, KP, ACC)
        gr, gi = _rfft2(g + b * g_b + c * g_c, g_h, g_w, H, W, cw, sw, ch, sh, HP, WP, KP, ACC)
        accr += gr * xr + gi * xi
        acci += gi * xr - gr * xi
    mk = tl.where((k == 0) | (2 * k == W), 1.0, 2.0)
    m = (h < H)[:, None] & (k < K)[None, :]
    o = out + ((h[:, None] * K + k[None, :]) * C + c) * 2
    tl.store(o, accr * mk[None, :], mask=m)
    tl.store(o + 1, acci * mk[None, :], mask=m)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(dtype: torch.dtype):
    """The accumulation type: fp64 for fp64 inputs, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=32)
def _dft_tables(H: int, W: int, device: torch.device, dtype: torch.dtype = torch.float32):
    """The orthonormal DFT tables, fp32, zero-padded to powers of two (at least 16, for tl.dot):
    cw, sw [WP, KP]; ch, sh [HP, HP]; icw, isw [KP, WP] (the real inverse, columns doubled)."""
    K = W // 2 + 1
    HP, WP, KP = _pow2(H), _pow2(W), _pow2(K)

    def table(n_out, n_in, n, rows, cols):
        f = torch.arange(n_out, dtype=torch.float64)[:, None]
        t = torch.arange(n_in, dtype=torch.float64)[None, :]
        ang = 2 * math.pi * torch.remainder(f * t, n) / n
        c, s = torch.zeros(rows, cols, dtype=torch.float64), torch.zeros(rows, cols, dtype=torch.float64)
        c[:n_out, :n_in], s[:n_out, :n_in] = torch.cos(ang) / math.sqrt(n), torch.sin(ang) / math.sqrt(n)
        return c, s

    cwk, swk = table(K, W, W, KP, WP)             # [k, w]
    ch, sh = table(H, H, H, HP, HP)
    mult = torch.full((KP, 1), 2.0, dtype=torch.float64)
    mult[0] = 1.0
    if W % 2 == 0:
        mult[W // 2] = 1.0
    tables = (cwk.T, swk.T, ch, sh, cwk * mult, swk * mult)
    return tuple(t.to(dtype).contiguous().to(device) for t in tables), (HP, WP, KP)


def _apply_filter(x: torch.Tensor, weight: torch.Tensor, conj: bool) -> torch.Tensor:
    B, H, W, C = x.shape
    out = torch.empty((B, H, W, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    (cw, sw, ch, sh, icw, isw), (HP, WP, KP) = _dft_tables(H, W, x.device, _acc_torch(x.dtype))
    with device_ctx(x):
        launcher(_filter_kernel)[(B, C)](
            x, *x.stride(), weight, *weight.stride(), out, H, W, W // 2 + 1, C, cw, sw, ch, sh, icw, isw,
            CONJ=conj, HP=HP, WP=WP, KP=KP, ACC=_acc(x.dtype))
    return out


def global_filter(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _apply_filter(x, weight, False)


def global_filter_backward(grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, x_grad: bool,
                           weight_grad: bool):
    gx = _apply_filter(grad_output, weight, True) if x_grad else x.new_empty((0,))
    gw = weight.new_empty((0,))
    if weight_grad:
        B, H, W, C = x.shape
        acc = torch.zeros((H, W // 2 + 1, C, 2), dtype=_acc_torch(x.dtype), device=x.device)
        if B and C:
            (cw, sw, ch, sh, _, _), (HP, WP, KP) = _dft_tables(H, W, x.device, _acc_torch(x.dtype))
            with device_ctx(x):
                launcher(_filter_grad_w_kernel)[(C,)](
                    grad_output, *grad_output.stride(), x, *x.stride(), acc, B, H, W // 2 + 1, W, C,
                    cw, sw, ch, sh, HP=HP, WP=WP, KP=KP, ACC=_acc(x.dtype))
        gw = acc.to(weight.dtype)
    return gx, gw


# ------------------------------------------------------------------------------- fftconv2d


@triton.jit
def _channels_by_columns(cb, C, W, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    """Channel block cb's channels and the columns of a row (or the column lags), with their masks."""
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, BLOCK_W)
    return c, c < C, j, j < W


@triton.jit
def _conv_rows_kernel(src, s_b, s_c, s_h, s_w, k, k_c, k_h, k_w, d_ptr, d_s, out, C, H, W,
                      HAS_D: tl.constexpr, FLIP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
                      ACC: tl.constexpr):
    """out[b, c, i, :] (contiguous [B, C, H, W]) of the top-left-anchored convolution of src with k, both
    read through their strides; with FLIP the planes are read and written flipped in both axes."""
    b = tl.program_id(0)
    i = tl.program_id(1)
    c, cm, j, jm = _channels_by_columns(tl.program_id(2), C, W, BLOCK_C, BLOCK_W)
    base = src + b * s_b + c[:, None] * s_c
    acc = tl.zeros([BLOCK_C, BLOCK_W], dtype=ACC)
    for a in range(0, i + 1):
        row = i - a
        if FLIP:
            row = H - 1 - row
        for q in range(0, W):
            kv = tl.load(k + c * k_c + a * k_h + q * k_w, mask=cm, other=0.0).to(ACC)
            col = j - q
            if FLIP:
                col = W - 1 - col
            m = cm[:, None] & (jm & (j >= q))[None, :]
            uv = tl.load(base + row * s_h + col[None, :] * s_w, mask=m, other=0.0).to(ACC)
            acc += tl.where(m, kv[:, None] * uv, 0.0)   # a tap outside the plane adds nothing, not 0 * inf
    oi = i
    oj = j
    if FLIP:
        oi = H - 1 - i
        oj = W - 1 - j
    m = cm[:, None] & jm[None, :]
    if HAS_D:
        dv = tl.load(d_ptr + c * d_s, mask=cm, other=0.0).to(ACC)
        uv = tl.load(base + oi * s_h + oj[None, :] * s_w, mask=m, other=0.0).to(ACC)
        acc += dv[:, None] * uv
    tl.store(out + ((b * C + c[:, None]) * H + oi) * W + oj[None, :], acc.to(out.dtype.element_ty), mask=m)


@triton.jit
def _filter_grad_kernel(g, g_b, g_c, g_h, g_w, u, u_b, u_c, u_h, u_w, out, B, C, H, W,
                        BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr):
    """out[c, a, :] (fp32, contiguous [C, H, W]) = sum_{b, i >= a, j >= q} g[b, c, i, j] u[b, c, i - a, j - q]."""
    a = tl.program_id(0)
    c, cm, q, qm = _channels_by_columns(tl.program_id(1), C, W, BLOCK_C, BLOCK_W)
    acc = tl.zeros([BLOCK_C, BLOCK_W], dtype=ACC)
    for b in range(0, B):
        for i in range(a, H):
            for j in range(0, W):
                gv = tl.load(g + b * g_b + c * g_c + i * g_h + j * g_w, mask=cm, other=0.0).to(ACC)
                m = cm[:, None] & (qm & (q <= j))[None, :]
                uv = tl.load(u + b * u_b + c[:, None] * u_c + (i - a) * u_h + (j - q)[None, :] * u_w,
                             mask=m, other=0.0).to(ACC)
                acc += tl.where(m, gv[:, None] * uv, 0.0)
    tl.store(out + (c[:, None] * H + a) * W + q[None, :], acc, mask=cm[:, None] & qm[None, :])


def _blocks(C: int, W: int) -> Tuple[int, int]:
    return min(triton.next_power_of_2(max(C, 1)), 16), triton.next_power_of_2(max(W, 1))


def _conv_planes(src: torch.Tensor, k: torch.Tensor, D: Optional[torch.Tensor], flip: bool) -> torch.Tensor:
    B, C, H, W = src.shape
    out = torch.empty((B, C, H, W), dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    BLOCK_C, BLOCK_W = _blocks(C, W)
    d = D if D is not None else k   # any pointer; never read without HAS_D
    with device_ctx(src):
        launcher(_conv_rows_kernel)[(B, H, triton.cdiv(C, BLOCK_C))](
            src, *src.stride(), k, *k.stride(), d, d.stride(0) if D is not None else 0, out, C, H, W,
            HAS_D=D is not None, FLIP=flip, BLOCK_C=BLOCK_C, BLOCK_W=BLOCK_W, ACC=_acc(src.dtype))
    return out


def fftconv2d(u: torch.Tensor, k: torch.Tensor, D: Optional[torch.Tensor]) -> torch.Tensor:
    return _conv_planes(u, k, D, False)


def fftconv2d_backward(grad_output: torch.Tensor, u: torch.Tensor, k: torch.Tensor, D: Optional[torch.Tensor],
                       u_grad: bool, k_grad: bool, D_grad: bool):
    gu = _conv_planes(grad_output, k, D, True) if u_grad else u.new_empty((0,))
    D_grad = D_grad and D is not None
    gk = k.new_empty((0,))
    gd = (D if D is not None else k).new_empty((0,))
    if k_grad or D_grad:
        B, C, H, W = u.shape
        acc = torch.zeros((C, H, W), dtype=_acc_torch(u.dtype), device=u.device)
        if B and C:
            BLOCK_C, BLOCK_W = _blocks(C, W)
            with device_ctx(u):
                launcher(_filter_grad_kernel)[(H, triton.cdiv(C, BLOCK_C))](
                    grad_output, *grad_output.stride(), u, *u.stride(), acc, B, C, H, W,
                    BLOCK_C=BLOCK_C, BLOCK_W=BLOCK_W, ACC=_acc(u.dtype))
        if k_grad:
            gk = acc.to(k.dtype)
        if D_grad:
            gd = acc[:, 0, 0].contiguous().to(D.dtype)   # the (0, 0) lag of the correlation is sum g u
    return gu, gk, gd
