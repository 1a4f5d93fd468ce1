"""The spectral family: token mixing in a transformed domain.

torch.ops.vitk.dtcwt2d(x) -> (lowpass, highpass)                          (differentiable)
torch.ops.vitk.idtcwt2d(lowpass, highpass) -> Tensor                      (differentiable)
torch.ops.vitk.dtcwt2d_backward(grad_lowpass, grad_highpass, input_size) -> Tensor
torch.ops.vitk.idtcwt2d_backward(grad_output) -> (grad_lowpass, grad_highpass)
torch.ops.vitk.svt_spectral_mix(x, weight_ll, weight_1, bias_1, weight_2, bias_2) -> Tensor (differentiable)
torch.ops.vitk.global_filter(x, weight) -> Tensor                          (differentiable)
torch.ops.vitk.fftconv2d(u, k, D=None) -> Tensor                          (differentiable)

Schemas in csrc/vitk.cpp, C++ kernels in csrc/cpu/spectral/, Triton kernels in vitkernels/triton/spectral.py
(global_filter, fftconv2d) and spectral_dtcwt.py (the wavelet ops); this module declares the rest (checks,
fakes, backends, autograd) through ops/_define.py. The transforms are linear, so each backward is the
adjoint filter bank, itself an op whose own backward is the forward op again (double backward works).
"""
from typing import List, Optional, Tuple

import torch

from ..dispatch import ALL_FLOAT_DTYPES
from . import _checks as check
from ._define import cpp, define, triton


def _image(name, t):
    check.tensor(name, t, dtypes=ALL_FLOAT_DTYPES, dims=4, layout="[B, C, H, W]")


def _highpass(name, hp, ref_name, ref):
    check.tensor(name, hp, dtypes=ALL_FLOAT_DTYPES, like=(ref_name, ref))
    check.same_dtype(name, hp, ref_name, ref)
    if hp.dim() != 6:
        raise ValueError(f"{name}: expected 6 dimensions [B, C, 6, H/2, W/2, 2], got shape {tuple(hp.shape)}")
    if hp.shape[2] != 6:
        raise ValueError(f"{name}: expected 6 orientations in dimension 2, got shape {tuple(hp.shape)}")
    if hp.shape[5] != 2:
        raise ValueError(f"{name}: expected a last dimension of 2 (real, imaginary), got shape {tuple(hp.shape)}")
    B, C, H, W = ref.shape
    if H % 2 or W % 2:
        raise ValueError(f"{ref_name}: expected even H and W, got shape {tuple(ref.shape)}")
    want = (B, C, 6, H // 2, W // 2, 2)
    if tuple(hp.shape) != want:
        raise ValueError(f"{name}: expected shape {list(want)} to match {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(hp.shape)}")


# The wavelet ops' Triton kernels (vitkernels/triton/spectral_dtcwt.py), each a function of the op's name.
_WAVELET_TRITON = triton("spectral_dtcwt", dtypes=ALL_FLOAT_DTYPES)


def _highpass_of(t: torch.Tensor) -> torch.Tensor:
    B, C, H, W = t.shape
    return t.new_empty((B, C, 6, H // 2, W // 2, 2))


# ---------------------------------------------------------------- dtcwt2d
def _check_dtcwt(x):
    _image("x", x)
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"x: expected non-empty H and W, got shape {tuple(x.shape)}")


def _dtcwt_fake(x):
    B, C, H, W = x.shape
    low = x.new_empty((B, C, H + H % 2, W + W % 2))
    return low, _highpass_of(low)


def _dtcwt_setup(ctx, inputs, output):
    ctx.input_size = list(inputs[0].shape[2:])


def _dtcwt_backward(ctx, grad_low, grad_high):
    return torch.ops.vitk.dtcwt2d_backward(grad_low, grad_high, ctx.input_size)


define("dtcwt2d", check=_check_dtcwt, fake=_dtcwt_fake, autograd=(_dtcwt_backward, _dtcwt_setup),
       backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES), _WAVELET_TRITON])


# ---------------------------------------------------------------- dtcwt2d_backward
def _check_dtcwt_backward(grad_lowpass, grad_highpass, input_size):
    _image("grad_lowpass", grad_lowpass)
    _highpass("grad_highpass", grad_highpass, "grad_lowpass", grad_lowpass)
    size = list(input_size)
    if len(size) != 2 or size[0] <= 0 or size[1] <= 0 or \
            [s + s % 2 for s in size] != list(grad_lowpass.shape[2:]):
        raise ValueError(f"input_size: expected sizes that round up to grad_lowpass's {list(grad_lowpass.shape[2:])}, "
                         f"got {size}")


def _dtcwt_backward_fake(grad_lowpass, grad_highpass, input_size):
    return grad_lowpass.new_empty((*grad_lowpass.shape[:2], *input_size))


def _dtcwt_backward_setup(ctx, inputs, output):
    pass


def _dtcwt_backward_backward(ctx, grad):
    low, high = torch.ops.vitk.dtcwt2d(grad)
    return low, high, None


define("dtcwt2d_backward", check=_check_dtcwt_backward, fake=_dtcwt_backward_fake,
       autograd=(_dtcwt_backward_backward, _dtcwt_backward_setup),
       backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES), _WAVELET_TRITON])


# ---------------------------------------------------------------- idtcwt2d
def _check_idtcwt(lowpass, highpass):
    _image("lowpass", lowpass)
    _highpass("highpass", highpass, "lowpass", lowpass)


def _idtcwt_setup(ctx, inputs, output):
    pass


def _idtcwt_backward(ctx, grad):
    return torch.ops.vitk.idtcwt2d_backward(grad)


define("idtcwt2d", check=_check_idtcwt, fake=lambda lowpass, highpass: check.grad_like(lowpass),
       autograd=(_idtcwt_backward, _idtcwt_setup), backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES), _WAVELET_TRITON])


# ---------------------------------------------------------------- idtcwt2d_backward
def _check_idtcwt_backward(grad_output):
    _image("grad_output", grad_output)
    if grad_output.shape[2] % 2 or grad_output.shape[3] % 2:
        raise ValueError(f"grad_output: expected even H and W, got shape {tuple(grad_output.shape)}")


def _idtcwt_backward_backward(ctx, grad_low, grad_high):
    return torch.ops.vitk.idtcwt2d(grad_low, grad_high)


define("idtcwt2d_backward", check=_check_idtcwt_backward,
       fake=lambda g: (check.grad_like(g), _highpass_of(g)),
       autograd=(_idtcwt_backward_backward, _idtcwt_setup),
       backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES), _WAVELET_TRITON])


# ---------------------------------------------------------------- svt_spectral_mix
def _check_svt(x, weight_ll, weight_1, bias_1, weight_2, bias_2):
    check.tensor("x", x, dtypes=ALL_FLOAT_DTYPES, dims=4, layout="[B, H, W, C]")
    B, H, W, C = x.shape
    if H == 0 or W == 0 or H % 2 or W % 2:
        raise ValueError(f"x: expected even, non-zero H and W (weight_ll is sized for the even grid), "
                         f"got shape {tuple(x.shape)}")
    check.tensor("weight_1", weight_1, dtypes=ALL_FLOAT_DTYPES, like=("x", x))
    if weight_1.dim() != 4:
        raise ValueError(f"weight_1: expected 4 dimensions [2, nb, bs, bs], got shape {tuple(weight_1.shape)}")
    nb, bs = weight_1.shape[1], weight_1.shape[2]
    if nb * bs != C or nb == 0:
        raise ValueError(f"weight_1: expected nb * bs = C = {C}, got shape {tuple(weight_1.shape)}")
    for name, t, shape, layout in (("weight_ll", weight_ll, (C, H, W), "[C, H, W]"),
                                   ("weight_1", weight_1, (2, nb, bs, bs), "[2, nb, bs, bs]"),
                                   ("bias_1", bias_1, (2, nb, bs), "[2, nb, bs]"),
                                   ("weight_2", weight_2, (2, nb, bs, bs), "[2, nb, bs, bs]"),
                                   ("bias_2", bias_2, (2, nb, bs), "[2, nb, bs]")):
        check.tensor(name, t, dtypes=ALL_FLOAT_DTYPES, like=("x", x))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {layout} = {list(shape)}, got {tuple(t.shape)}")


def _svt_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _svt_backward(ctx, grad):
    return torch.ops.vitk.svt_spectral_mix_backward(grad, *ctx.saved_tensors)


define("svt_spectral_mix", check=_check_svt, fake=lambda x, *_: check.grad_like(x),
       autograd=(_svt_backward, _svt_setup), backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES), _WAVELET_TRITON])


# ---------------------------------------------------------------- svt_spectral_mix_backward
def _check_svt_backward(grad_output, x, weight_ll, weight_1, bias_1, weight_2, bias_2):
    _check_svt(x, weight_ll, weight_1, bias_1, weight_2, bias_2)
    check.tensor("grad_output", grad_output, dtypes=ALL_FLOAT_DTYPES, like=("x", x))
    check.same_dtype("grad_output", grad_output, "x", x)
    if grad_output.shape != x.shape:
        raise ValueError(f"grad_output: expected x's shape {tuple(x.shape)}, got {tuple(grad_output.shape)}")


def _svt_backward_fake(grad_output, x, *params):
    return (check.grad_like(x),) + tuple(check.grad_like(p) for p in params)


define("svt_spectral_mix_backward", check=_check_svt_backward, fake=_svt_backward_fake,
       backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES), _WAVELET_TRITON])


# ---------------------------------------------------------------- global_filter
def _check_global_filter(x, weight, x_name="x"):
    check.tensor(x_name, x, dtypes=ALL_FLOAT_DTYPES, dims=4, layout="[B, H, W, C]")
    B, H, W, C = x.shape
    if H == 0 or W == 0:
        raise ValueError(f"{x_name}: expected non-empty H and W, got shape {tuple(x.shape)}")
    check.tensor("weight", weight, dtypes=ALL_FLOAT_DTYPES, like=(x_name, x))
    want = (H, W // 2 + 1, C, 2)
    if tuple(weight.shape) != want:
        raise ValueError(f"weight: expected shape [H, W // 2 + 1, C, 2] = {list(want)}, got {tuple(weight.shape)}")


def _global_filter_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _global_filter_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    gx, gw = torch.ops.vitk.global_filter_backward(grad, x, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return (gx if ctx.needs_input_grad[0] else None), (gw if ctx.needs_input_grad[1] else None)


define("global_filter", check=_check_global_filter, fake=lambda x, weight: check.grad_like(x),
       autograd=(_global_filter_backward, _global_filter_setup),
       backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES), triton("spectral", dtypes=ALL_FLOAT_DTYPES)])


def _check_global_filter_backward(grad_output, x, weight, x_grad, weight_grad):
    _check_global_filter(x, weight)
    check.tensor("grad_output", grad_output, dtypes=ALL_FLOAT_DTYPES, like=("x", x))
    check.same_dtype("grad_output", grad_output, "x", x)
    if tuple(grad_output.shape) != tuple(x.shape):
        raise ValueError(f"grad_output: expected shape {list(x.shape)}, got {tuple(grad_output.shape)}")


def _global_filter_backward_fake(grad_output, x, weight, x_grad, weight_grad):
    return (check.grad_like(x) if x_grad else check.empty(x),
            check.grad_like(weight) if weight_grad else check.empty(weight))


define("global_filter_backward", check=_check_global_filter_backward, fake=_global_filter_backward_fake,
       backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES), triton("spectral", dtypes=ALL_FLOAT_DTYPES)])


# ---------------------------------------------------------------- fftconv2d
def _check_fftconv2d(u, k, D, u_name="u"):
    check.tensor(u_name, u, dtypes=ALL_FLOAT_DTYPES, dims=4, layout="[B, C, H, W]")
    B, C, H, W = u.shape
    if H == 0 or W == 0:
        raise ValueError(f"{u_name}: expected non-empty H and W, got shape {tuple(u.shape)}")
    check.tensor("k", k, dtypes=ALL_FLOAT_DTYPES, like=(u_name, u))
    if tuple(k.shape) != (C, H, W):
        raise ValueError(f"k: expected shape [C, H, W] = {[C, H, W]}, got {tuple(k.shape)}")
    if D is not None:
        check.tensor("D", D, dtypes=ALL_FLOAT_DTYPES, like=(u_name, u))
        if tuple(D.shape) != (C,):
            raise ValueError(f"D: expected shape [C] = {[C]}, got {tuple(D.shape)}")


def _fftconv2d_setup(ctx, inputs, output):
    u, k, D = inputs
    ctx.save_for_backward(u, k, D)


def _fftconv2d_backward(ctx, grad):
    u, k, D = ctx.saved_tensors
    need = ctx.needs_input_grad
    gu, gk, gd = torch.ops.vitk.fftconv2d_backward(grad, u, k, D, need[0], need[1], D is not None and need[2])
    return (gu if need[0] else None), (gk if need[1] else None), (gd if D is not None and need[2] else None)


define("fftconv2d", check=_check_fftconv2d, fake=lambda u, k, D: check.grad_like(u),
       autograd=(_fftconv2d_backward, _fftconv2d_setup),
       backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES), triton("spectral", dtypes=ALL_FLOAT_DTYPES)])


def _check_fftconv2d_backward(grad_output, u, k, D, u_grad, k_grad, D_grad):
    _check_fftconv2d(u, k, D)
    check.tensor("grad_output", grad_output, dtypes=ALL_FLOAT_DTYPES, like=("u", u))
    check.same_dtype("grad_output", grad_output, "u", u)
    if tuple(grad_output.shape) != tuple(u.shape):
        raise ValueError(f"grad_output: expected shape {list(u.shape)}, got {tuple(grad_output.shape)}")


def _fftconv2d_backward_fake(grad_output, u, k, D, u_grad, k_grad, D_grad):
    return (check.grad_like(u) if u_grad else check.empty(u),
            check.grad_like(k) if k_grad else check.empty(k),
            check.grad_like(D) if D is not None and D_grad else check.empty(k if D is None else D))


define("fftconv2d_backward", check=_check_fftconv2d_backward, fake=_fftconv2d_backward_fake,
       backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES), triton("spectral", dtypes=ALL_FLOAT_DTYPES)])


# ---------------------------------------------------------------- Python API
def dtcwt2d(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One level of the 2-D dual-tree complex wavelet transform with Kingsbury's near_sym_b filters:
    exactly pytorch_wavelets' ``DTCWTForward(J=1, biort='near_sym_b', qshift='qshift_b')`` (the
    qshift filters only act from level 2 on), its layout, orientation order (15, 45, 75, 105, 135,
    165 degrees) and symmetric boundary extension.

    x [B, C, H, W] -> (lowpass [B, C, H', W'], highpass [B, C, 6, H'/2, W'/2, 2], real and imaginary
    last). An odd H or W is first made even by repeating the last row or column, as pytorch_wavelets
    does, so H' and W' are H and W rounded up to even: a 7 x 9 input gives an 8 x 10 lowpass and a
    4 x 5 highpass, and idtcwt2d returns 8 x 10. fp32, fp16 and bf16 accumulate in fp32, fp64 in fp64;
    differentiable (the backward is the adjoint filter bank)."""
    return torch.ops.vitk.dtcwt2d(x)


def idtcwt2d(lowpass: torch.Tensor, highpass: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`dtcwt2d`, exactly pytorch_wavelets' ``DTCWTInverse(biort='near_sym_b',
    qshift='qshift_b')`` for one level: lowpass [B, C, H, W] (H, W even) and highpass
    [B, C, 6, H/2, W/2, 2] -> [B, C, H, W]. ``idtcwt2d(*dtcwt2d(x))`` is x (padded to even sizes) to
    the working precision. Differentiable."""
    return torch.ops.vitk.idtcwt2d(lowpass, highpass)


def svt_spectral_mix(x: torch.Tensor, weight_ll: torch.Tensor, weight_1: torch.Tensor, bias_1: torch.Tensor,
                     weight_2: torch.Tensor, bias_2: torch.Tensor) -> torch.Tensor:
    """SVT's spectral layer (its ``SVT_channel_mixing``) in one op, channels-last: x [B, H, W, C] with H
    and W even -> [B, H, W, C].

    (lowpass, highpass) = dtcwt2d(x as [B, C, H, W]); lowpass *= weight_ll [C, H, W]; the highpass
    goes through a complex block MLP over nb blocks of bs channels (C = nb * bs): (a + ib)(W1r + iW1i)
    + (b1r + i b1i), ReLU on the real and imaginary parts, then the same with weight_2 and bias_2
    without ReLU (weights [2, nb, bs, bs], real part first; biases [2, nb, bs]); the output is
    idtcwt2d of the result. The CPU kernel works one image at a time and never forms the
    [B, C, 6, H/2, W/2, 2] highpass; the Triton kernels (vitkernels/triton/spectral_dtcwt.py) run the
    transform, the MLP and the inverse one after the other and do form it, in fp32 (fp64 for fp64),
    as does the backward (every input), which recomputes the transform."""
    return torch.ops.vitk.svt_spectral_mix(x, weight_ll, weight_1, bias_1, weight_2, bias_2)


def global_filter(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """GFNet's GlobalFilter on channels-last x [B, H, W, C]:
    ``irfft2(rfft2(x, dim=(1, 2), norm="ortho") * view_as_complex(weight), s=(H, W), dim=(1, 2),
    norm="ortho")`` with weight [H, W // 2 + 1, C, 2] (real, imaginary). The CPU kernel computes the
    transforms as mixed-radix FFTs whose points are vectors of channels, accumulating in fp32 for
    fp32, fp16 and bf16 (fp64 in fp64); the Triton kernel as four dense DFT matrix products per
    channel plane. A NaN in x makes its image's channel NaN, one in weight that channel of every
    image, as torch.fft does; the CPU kernel treats an infinity the same way.
    Differentiable in x and weight."""
    return torch.ops.vitk.global_filter(x, weight)


def fftconv2d(u: torch.Tensor, k: torch.Tensor, D: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-Dimensional Hyena's 2-D long convolution: u [B, C, H, W], a per-channel filter k [C, H, W]
    and an optional skip D [C] -> [B, C, H, W] with

        y[b, c, i, j] = sum_{a <= i, q <= j} k[c, a, q] * u[b, c, i - a, j - q] + D[c] * u[b, c, i, j],

    the linear (zero-padded, non-circular) convolution anchored at the top-left corner, which Hyena
    computes as ``irfft2(rfft2(u, s=(2H, 2W)) * rfft2(k, s=(2H, 2W)))[..., :H, :W]``. It stays a plain
    convolution: the model applies Hyena's 1/(2L) filter scaling and its four-direction flips (see
    ``vitkernels.models.spectral.HyenaOperator2d``). The CPU kernel sums directly over the taps (cheaper
    than any transform on ViT grids, and exact), fp32 accumulation for fp32 / fp16 / bf16 (fp64 in fp64);
    a NaN reaches only the outputs below and to the right of it. Differentiable in u, k and D."""
    return torch.ops.vitk.fftconv2d(u, k, D)


__all__: List[str] = ["dtcwt2d", "idtcwt2d", "svt_spectral_mix", "global_filter", "fftconv2d"]
