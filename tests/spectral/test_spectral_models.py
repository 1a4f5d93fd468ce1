"""The spectral models: SVT_channel_mixing against a transcription of SVT's own module (on
pytorch_wavelets), same weights; GFNet's and SpectFormer's blocks and Multi-Dimensional Hyena's operator
against their use_reference twins (torch.fft), forward and gradients; compile with no graph break."""
import pytest
import torch

from vitkernels.models import (GFNetBlock, GlobalFilter, HyenaOperator2d, SpectFormerBlock, SpectralGatingNetwork,
                               SVT_channel_mixing)

from pytorch_wavelets_peer import transforms
from test_svt_spectral_mix import svt_channel_mixing


def _official(m, x, H, W, xfm, ifm):
    B, N, C = x.shape
    y = svt_channel_mixing(x.view(B, H, W, C).float(), m.complex_weight_ll, m.complex_weight_lh_1,
                           m.complex_weight_lh_b1, m.complex_weight_lh_2, m.complex_weight_lh_b2, xfm, ifm)
    return y.reshape(B, N, C)


@pytest.mark.parametrize("dim,H,W", [(64, 14, 14), (32, 8, 12)])
def test_matches_svt(dim, H, W):
    try:
        xfm, ifm = transforms(torch.float32)
    except ImportError as e:
        pytest.skip(f"pytorch_wavelets is not importable here: {e}")
    m = SVT_channel_mixing(dim, H, W)
    x = torch.randn(2, H * W, dim)
    torch.testing.assert_close(m(x, H, W), _official(m, x, H, W, xfm, ifm), rtol=0, atol=1e-5)


def test_reference_path_and_state_dict():
    m = SVT_channel_mixing(16, 6, 8)
    r = SVT_channel_mixing(16, 6, 8, use_reference=True)
    r.load_state_dict(m.state_dict())
    assert set(m.state_dict()) == {"complex_weight_ll", "complex_weight_lh_1", "complex_weight_lh_2",
                                   "complex_weight_lh_b1", "complex_weight_lh_b2"}
    x = torch.randn(2, 48, 16, requires_grad=True)
    torch.testing.assert_close(m(x, 6, 8), r(x, 6, 8), rtol=0, atol=1e-5)
    g = torch.randn(2, 48, 16)
    (gm,) = torch.autograd.grad(m(x, 6, 8), x, g)
    (gr,) = torch.autograd.grad(r(x, 6, 8), x, g)
    torch.testing.assert_close(gm, gr, rtol=0, atol=1e-5)


def test_compile_fullgraph():
    torch._dynamo.reset()
    m = SVT_channel_mixing(16, 6, 8)
    x = torch.randn(2, 48, 16, requires_grad=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        y = torch.compile(m, fullgraph=True)(x, 6, 8)
    y.sum().backward()
    torch.testing.assert_close(y, m(x, 6, 8))
    assert m.complex_weight_lh_1.grad is not None


# ---------------------------------------------------------------- GFNet, SpectFormer, Hyena
def _twins(cls, *args, **kwargs):
    """The fused module and its use_reference twin with the same parameters."""
    m = cls(*args, **kwargs)
    r = cls(*args, use_reference=True, **kwargs)
    r.load_state_dict(m.state_dict())
    return m, r


def _same_outputs_and_grads(m, r, x, atol=1e-5):
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = m(x1), r(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=atol)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=atol)
    for (name, p1), p2 in zip(m.named_parameters(), r.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=0, atol=atol * max(1.0, p2.grad.abs().max().item()),
                                   msg=lambda s: f"{name}: {s}")


def test_gfnet_global_filter_and_block():
    f, fr = _twins(GlobalFilter, 32, h=14, w=8)
    assert set(f.state_dict()) == {"complex_weight"} and f.complex_weight.shape == (14, 8, 32, 2)
    _same_outputs_and_grads(f, fr, torch.randn(2, 196, 32))
    assert f(torch.randn(1, 196, 32).bfloat16()).dtype == torch.float32      # GFNet computes in fp32
    b, br = _twins(GFNetBlock, 32, h=7, w=4)
    assert {"norm1.weight", "filter.complex_weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc2.bias"} <= set(b.state_dict())
    _same_outputs_and_grads(b, br, torch.randn(2, 49, 32))


def test_spectformer_block():
    g = SpectralGatingNetwork(16, h=6, w=3)
    assert g(torch.randn(1, 24, 16).bfloat16(), spatial_size=(6, 4)).dtype == torch.bfloat16
    b, br = _twins(SpectFormerBlock, 16, h=6, w=4)
    assert isinstance(b.filter, SpectralGatingNetwork)
    _same_outputs_and_grads(b, br, torch.randn(2, 36, 16))


@pytest.mark.parametrize("mode", ["standard", "4dir"])
def test_hyena_operator_2d(mode):
    h, hr = _twins(HyenaOperator2d, 12, 7, directional_mode=mode)
    names = {"in_proj.weight", "in_proj.bias", "out_proj.weight", "short_filter.weight", "filter", "bias"}
    assert names <= set(h.state_dict()) and h.filter.shape == (2, 12, 7, 7) and h.bias.shape == (2, 12)
    _same_outputs_and_grads(h, hr, torch.randn(2, 49, 12), atol=1e-4)
    x = torch.randn(2, 7, 7, 12)
    torch.testing.assert_close(h(x).reshape(2, 49, 12), h(x.reshape(2, 49, 12)))


def test_hyena_matches_its_direct_formulation():
    """Order 2 by hand: v = conv(v * x1, filter[0] / (2L)) + bias[0] (v * x1), y = out_proj(v * x0)."""
    h = HyenaOperator2d(8, 5)
    x = torch.randn(1, 5, 5, 8, dtype=torch.float64)
    h = h.double()
    z = h.short_filter(h.in_proj(x).permute(0, 3, 1, 2))
    x0, x1, v = z.split(8, dim=1)
    w = v * x1
    k = h.filter[0] / 10
    conv = torch.zeros_like(w)
    for a in range(5):
        for q in range(5):
            conv[..., a:, q:] += k[:, a, q, None, None] * w[..., :5 - a, :5 - q]
    want = h.out_proj(((conv + w * h.bias[0][:, None, None]) * x0).permute(0, 2, 3, 1))
    torch.testing.assert_close(h(x), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("make,shape", [(lambda: GFNetBlock(16, h=6, w=4), (2, 36, 16)),
                                        (lambda: SpectFormerBlock(16, h=6, w=4), (2, 36, 16)),
                                        (lambda: HyenaOperator2d(8, 6, directional_mode="4dir"), (2, 36, 8))],
                         ids=["gfnet", "spectformer", "hyena"])
def test_compile_fullgraph_models(make, shape):
    torch._dynamo.reset()
    m = make()
    x = torch.randn(*shape, requires_grad=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        y = torch.compile(m, fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None for p in m.parameters())
