// The spectral family's CPU entry points, each with its op's schema signature and registered as the
// op's kernel for its device.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/core/SymIntArrayRef.h>

#include <optional>
#include <tuple>

namespace vitk {
namespace cpu {

// One level of the 2-D DTCWT (near_sym_b), as pytorch_wavelets' DTCWTForward(J=1): x [B, C, H, W] ->
// (lowpass [B, C, H', W'], highpass [B, C, 6, H'/2, W'/2, 2]), H' and W' rounded up to even by
// repeating the last row or column.
std::tuple<at::Tensor, at::Tensor> dtcwt2d(const at::Tensor& x);
// The adjoint of dtcwt2d: the gradient of x [B, C, input_size[0], input_size[1]].
at::Tensor dtcwt2d_backward(const at::Tensor& grad_lowpass, const at::Tensor& grad_highpass,
                            c10::SymIntArrayRef input_size);
// The inverse: lowpass [B, C, H, W] (even) and highpass [B, C, 6, H/2, W/2, 2] -> [B, C, H, W].
at::Tensor idtcwt2d(const at::Tensor& lowpass, const at::Tensor& highpass);
// The adjoint of idtcwt2d: (grad_lowpass, grad_highpass) of grad_output [B, C, H, W].
std::tuple<at::Tensor, at::Tensor> idtcwt2d_backward(const at::Tensor& grad_output);

// SVT's spectral layer on channels-last x [B, H, W, C] (H, W even): dtcwt2d, lowpass * weight_ll
// [C, H, W], the complex block MLP (weight_1, weight_2 [2, nb, bs, bs], bias_1, bias_2 [2, nb, bs],
// ReLU between) on the highpass, idtcwt2d; returns [B, H, W, C] without forming the full highpass.
at::Tensor svt_spectral_mix(const at::Tensor& x, const at::Tensor& weight_ll, const at::Tensor& weight_1,
                            const at::Tensor& bias_1, const at::Tensor& weight_2, const at::Tensor& bias_2);
// Its gradients (x, weight_ll, weight_1, bias_1, weight_2, bias_2) for grad_output [B, H, W, C].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> svt_spectral_mix_backward(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& weight_ll, const at::Tensor& weight_1,
    const at::Tensor& bias_1, const at::Tensor& weight_2, const at::Tensor& bias_2);
// The argument checks both share (shapes, dtypes, devices), raising ValueError naming the argument.
void check_svt_arguments(const at::Tensor& x, const at::Tensor& weight_ll, const at::Tensor& weight_1,
                         const at::Tensor& bias_1, const at::Tensor& weight_2, const at::Tensor& bias_2);

// GFNet's GlobalFilter on channels-last x [B, H, W, C]: irfft2(rfft2(x) * weight) (norm="ortho"),
// weight [H, W // 2 + 1, C, 2] (real, imaginary), as FFTs over the channel vectors.
at::Tensor global_filter(const at::Tensor& x, const at::Tensor& weight);
// (grad_x, grad_weight), each empty when not asked for.
std::tuple<at::Tensor, at::Tensor> global_filter_backward(const at::Tensor& grad_output, const at::Tensor& x,
                                                          const at::Tensor& weight, bool x_grad, bool weight_grad);

// Multi-Dimensional Hyena's 2-D long convolution: u [B, C, H, W], k [C, H, W], D [C] ->
// y[b, c, i, j] = sum_{a <= i, q <= j} k[c, a, q] u[b, c, i - a, j - q] + D[c] u[b, c, i, j].
at::Tensor fftconv2d(const at::Tensor& u, const at::Tensor& k, const std::optional<at::Tensor>& D);
// (grad_u, grad_k, grad_D), each empty when not asked for (grad_D also when D is None).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fftconv2d_backward(const at::Tensor& grad_output, const at::Tensor& u,
                                                                  const at::Tensor& k,
                                                                  const std::optional<at::Tensor>& D, bool u_grad,
                                                                  bool k_grad, bool D_grad);

}  // namespace cpu
}  // namespace vitk
