"""Plain eager PyTorch ground truth for the spectral family.

The one-level 2-D dual-tree complex wavelet transform (DTCWT) with Kingsbury's near_sym_b biorthogonal
filters, as Selesnick, Baraniuk and Kingsbury describe it ("The dual-tree complex wavelet transform",
IEEE Signal Processing Magazine, 2005) and as pytorch_wavelets' DTCWTForward(J=1) lays it out:

  - every row, then every column, is filtered with the lowpass h0 (13 taps) and the highpass h1
    (19 taps), undecimated, over the half-sample symmetric extension of the signal
    (..., x1, x0 | x0, x1, ..., x_{n-1} | x_{n-1}, x_{n-2}, ...);
  - the lowpass of both (ll) is the lowpass output, at full resolution;
  - each of the three highpass subbands (lh: rows low, columns high; hl; hh) is split into its 2 x 2
    quads (a b / c d), scaled by 1/sqrt(2), and combined into two complex subimages, (a - d) + i(b + c)
    and (a + d) + i(b - c): the two trees' outputs as one complex coefficient. That gives the six
    orientations, in the order 15, 45, 75, 105, 135 and 165 degrees:
    [lh first, hh first, hl first, hl second, hh second, lh second].

The inverse undoes the quad combination (the 4 x 4 map is orthonormal, so its inverse is its
transpose) and filters with the synthesis filters g0 (19 taps) and g1 (13 taps) the same way, summing
the four subbands. Odd sizes: the last row (column) is repeated once first, as pytorch_wavelets does.

Written for clarity in float64; the taps are Kingsbury's published near_sym_b coefficients.
"""
import math

import torch
import torch.nn.functional as F

# Kingsbury's near_sym_b level-1 analysis filters (both symmetric): h0 lowpass (13 taps), h1 highpass
# (19 taps). The synthesis filters follow from them: g0[n] = (-1)^(n+1) h1[n], g1[n] = (-1)^n h0[n].
H0 = (-0.0017578125, 0.0, 0.022265625, -0.046875, -0.0482421875, 0.296875, 0.55546875,
      0.296875, -0.0482421875, -0.046875, 0.022265625, 0.0, -0.0017578125)
H1 = (-7.062639508928571e-05, 0.0, 0.0013419015066964285, -0.0018833705357142855, -0.007156808035714285,
      0.023856026785714284, 0.05564313616071428, -0.05168805803571428, -0.29975760323660716,
      0.5594308035714286, -0.29975760323660716, -0.05168805803571428, 0.05564313616071428,
      0.023856026785714284, -0.007156808035714285, -0.0018833705357142855, 0.0013419015066964285, 0.0,
      -7.062639508928571e-05)
G0 = tuple(h * (-1) ** (n + 1) for n, h in enumerate(H1))
G1 = tuple(h * (-1) ** n for n, h in enumerate(H0))


def symmetric_index(n: int, m: int) -> torch.Tensor:
    """Indices of the half-sample symmetric extension of a length-n signal by m on each side (repeated
    reflections when m > n)."""
    p = torch.arange(-m, n + m) % (2 * n)
    return torch.where(p < n, p, 2 * n - 1 - p)


def filter_along(x: torch.Tensor, taps, dim: int) -> torch.Tensor:
    """x filtered along ``dim`` with the odd-length symmetric ``taps``, over the symmetric extension;
    same length out."""
    m = len(taps) // 2
    n = x.shape[dim]
    xe = x.index_select(dim, symmetric_index(n, m).to(x.device)).movedim(dim, -1)
    h = torch.tensor(taps, dtype=x.dtype, device=x.device)
    y = F.conv1d(xe.reshape(-1, 1, n + 2 * m), h.view(1, 1, -1))
    return y.reshape(*xe.shape[:-1], n).movedim(-1, dim)


def pad_even(x: torch.Tensor) -> torch.Tensor:
    """Repeats the last row and/or column of an odd-sized [..., H, W] image once."""
    if x.shape[-2] % 2:
        x = torch.cat([x, x[..., -1:, :]], dim=-2)
    if x.shape[-1] % 2:
        x = torch.cat([x, x[..., -1:]], dim=-1)
    return x


def quads_to_complex(y: torch.Tensor):
    """[..., 2h, 2w] -> two complex subimages [..., h, w, 2] (real, imaginary last)."""
    y = y / math.sqrt(2)
    a, b = y[..., 0::2, 0::2], y[..., 0::2, 1::2]
    c, d = y[..., 1::2, 0::2], y[..., 1::2, 1::2]
    return torch.stack([a - d, b + c], -1), torch.stack([a + d, b - c], -1)


def complex_to_quads(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The inverse (and transpose) of quads_to_complex."""
    r1, i1, r2, i2 = z1[..., 0], z1[..., 1], z2[..., 0], z2[..., 1]
    *lead, h, w = r1.shape
    y = r1.new_empty(*lead, 2 * h, 2 * w)
    y[..., 0::2, 0::2] = r1 + r2
    y[..., 0::2, 1::2] = i1 + i2
    y[..., 1::2, 0::2] = i1 - i2
    y[..., 1::2, 1::2] = r2 - r1
    return y / math.sqrt(2)


def dtcwt2d(x: torch.Tensor):
    """(lowpass [B, C, H', W'], highpass [B, C, 6, H'/2, W'/2, 2]), H' and W' the sizes rounded up to even."""
    x = pad_even(x)
    lo = filter_along(x, H0, -1)
    hi = filter_along(x, H1, -1)
    ll = filter_along(lo, H0, -2)
    lh = filter_along(lo, H1, -2)
    hl = filter_along(hi, H0, -2)
    hh = filter_along(hi, H1, -2)
    (o15, o165), (o45, o135), (o75, o105) = quads_to_complex(lh), quads_to_complex(hh), quads_to_complex(hl)
    return ll, torch.stack([o15, o45, o75, o105, o135, o165], dim=2)


def idtcwt2d(lowpass: torch.Tensor, highpass: torch.Tensor) -> torch.Tensor:
    """[B, C, 2h, 2w] from lowpass [B, C, 2h, 2w] and highpass [B, C, 6, h, w, 2]."""
    o = highpass.unbind(2)
    lh = complex_to_quads(o[0], o[5])
    hh = complex_to_quads(o[1], o[4])
    hl = complex_to_quads(o[2], o[3])
    hi = filter_along(hh, G1, -2) + filter_along(hl, G0, -2)
    lo = filter_along(lh, G1, -2) + filter_along(lowpass, G0, -2)
    return filter_along(hi, G1, -1) + filter_along(lo, G0, -1)


def complex_block_mlp(xr, xi, weight_1, bias_1, weight_2, bias_2):
    """SVT's highpass mixing on [..., nb, bs] real and imaginary parts: a complex block-diagonal linear
    layer, ReLU on the real and imaginary parts, a second complex layer."""
    def layer(r, i, w, b):
        return (torch.einsum("...nd,ndk->...nk", r, w[0]) - torch.einsum("...nd,ndk->...nk", i, w[1]) + b[0],
                torch.einsum("...nd,ndk->...nk", r, w[1]) + torch.einsum("...nd,ndk->...nk", i, w[0]) + b[1])
    r, i = layer(xr, xi, weight_1, bias_1)
    return layer(torch.relu(r), torch.relu(i), weight_2, bias_2)


def svt_spectral_mix(x, weight_ll, weight_1, bias_1, weight_2, bias_2):
    """SVT's spectral layer on channels-last x [B, H, W, C] (H, W even), C = nb * bs."""
    B, H, W, C = x.shape
    nb, bs = weight_1.shape[1], weight_1.shape[2]
    ll, hp = dtcwt2d(x.permute(0, 3, 1, 2))
    ll = ll * weight_ll
    z = hp.permute(0, 2, 3, 4, 1, 5).reshape(B, 6, H // 2, W // 2, nb, bs, 2)
    r, i = complex_block_mlp(z[..., 0], z[..., 1], weight_1, bias_1, weight_2, bias_2)
    hp = torch.stack([r, i], -1).reshape(B, 6, H // 2, W // 2, C, 2).permute(0, 4, 1, 2, 3, 5)
    return idtcwt2d(ll, hp).permute(0, 2, 3, 1)


def global_filter(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """GFNet's GlobalFilter on [B, H, W, C]: the real 2-D FFT (orthonormal), a learned complex filter
    [H, W // 2 + 1, C] (real, imaginary last), the inverse."""
    B, H, W, C = x.shape
    if x.numel() == 0:  # torch.fft refuses an empty batch; the filter still takes part (zero gradient)
        return x + 0 * weight.sum()
    X = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")
    return torch.fft.irfft2(X * torch.view_as_complex(weight.contiguous()), s=(H, W), dim=(1, 2), norm="ortho")


def fftconv2d(u: torch.Tensor, k: torch.Tensor, D=None) -> torch.Tensor:
    """Multi-Dimensional Hyena's 2-D long convolution, as its code computes it: u [B, C, H, W] and the
    filter k [C, H, W] zero-padded to 2H x 2W, multiplied in the real 2-D Fourier domain, the top-left
    H x W of the inverse kept (a linear, non-circular convolution anchored at the top-left corner:
    y[i, j] = sum_{a <= i, b <= j} k[a, b] u[i - a, j - b]), plus the skip D [C] * u. The model's
    1/(2L) scaling and its four-direction flips are applied by the model, not here."""
    B, C, H, W = u.shape
    if u.numel() == 0:  # torch.fft refuses an empty batch; the filter still takes part (zero gradient)
        y = u + 0 * k.sum()
    else:
        uf = torch.fft.rfft2(u, s=(2 * H, 2 * W))
        kf = torch.fft.rfft2(k, s=(2 * H, 2 * W))
        y = torch.fft.irfft2(uf * kf, s=(2 * H, 2 * W))[..., :H, :W]
    if D is not None:
        y = y + u * D[:, None, None]
    return y.to(u.dtype)
