"""Non-finite inputs of window and varlen attention, on every backend: NaN in gives NaN out as eager
softmax(q k^T + bias) v spreads it, while the shifted-window mask (a finite -100) stays legal."""
import pytest
import torch

import vitkernels
from vitkernels.reference import window_attention as ref
from conftest import backend_params

NAN, INF = float("nan"), float("inf")
B, H, W, HEADS, D, WS = 1, 6, 6, 2, 8, 3


def _same_nonfinite_and_values(out, expect, tol=2e-5):
    """NaN exactly where the reference has NaN; where it has an infinity, the same infinity or NaN (fp32
    weights that underflow to 0 meet inf in v as 0 * inf); the finite outputs within tol."""
    expect = expect.to(out.dtype)
    assert not expect.isfinite().all(), "the case must make some outputs non-finite"
    inf = expect.isinf()
    assert torch.equal(out.isnan() & ~inf, expect.isnan()), (
        f"NaN pattern differs: {int(out.isnan().sum())} NaN here, {int(expect.isnan().sum())} in the reference")
    assert (out[inf].isnan() | (out[inf] == expect[inf])).all(), "an infinity of the reference is finite here"
    fin = expect.isfinite()
    assert torch.allclose(out[fin], expect[fin], atol=tol, rtol=0), "finite outputs differ from the reference"


def _window_inputs(where, value):
    q, k, v = (torch.randn(B, H, W, HEADS, D) for _ in range(3))
    bias = torch.randn((2 * WS - 1) ** 2, HEADS)
    scale = None
    if where == "scale":
        scale = value
    else:
        {"q": q, "k": k, "v": v, "bias": bias}[where].view(-1)[7] = value
    return q, k, v, bias, scale


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("where,value", [("q", NAN), ("k", NAN), ("k", INF), ("k", -INF), ("v", NAN), ("v", INF),
                                         ("bias", NAN), ("scale", NAN)])
@pytest.mark.parametrize("backend,device", backend_params("window_attention_fwd"))
def test_window_nonfinite_input_spreads_as_in_eager(backend, device, where, value, shift, run_on):
    q, k, v, bias, scale = _window_inputs(where, value)
    expect = ref.window_attention(q.double(), k.double(), v.double(), (WS, WS), (shift, shift), bias.double(), scale)
    out = run_on(backend, vitkernels.window_attention, q, k, v, WS, shift, bias, scale)
    _same_nonfinite_and_values(out, expect)


@pytest.mark.parametrize("where,value", [("q", NAN), ("k", NAN), ("k", INF), ("v", NAN), ("scale", NAN)])
@pytest.mark.parametrize("backend,device", backend_params("varlen_attention_fwd"))
def test_varlen_nonfinite_input_stays_in_its_segment(backend, device, where, value, run_on):
    total = 20
    q, k, v = (torch.randn(total, HEADS, D) for _ in range(3))
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    scale = value if where == "scale" else None
    if where != "scale":
        {"q": q, "k": k, "v": v}[where][7, 1, 2] = value          # token 7: the second segment
    expect = ref.varlen_attention(q.double(), k.double(), v.double(), cu, 8, scale)
    out = run_on(backend, vitkernels.varlen_attention, q, k, v, cu, 8, scale)
    _same_nonfinite_and_values(out, expect)
    if where != "scale":
        assert not out[:5].isnan().any() and not out[12:].isnan().any(), "NaN leaked into another segment"


def test_window_huge_finite_v_keeps_the_masked_weights(run_on):
    """The C++ forward flushes underflowing weights to zero only when |v| < 2^64 (flush_is_negligible).
    Here one value is 1e38: a key across the shift mask keeps its weight e^-100 (a denormal in fp32), so
    queries of the other region see about 1e38 * e^-100 / n ~ 1e-6, as the float64 reference does, not 0."""
    q, k = (torch.randn(B, H, W, HEADS, D) * 1e-3 for _ in range(2))
    v = torch.randn(B, H, W, HEADS, D) * 1e-12
    v[0, H - 1, W - 1, :, 0] = 1e38          # the last token: its own shift region in the last window
    expect = ref.window_attention(q.double(), k.double(), v.double(), (WS, WS), (1, 1), None, None)
    out = run_on("cpu", vitkernels.window_attention, q, k, v, WS, 1, None, None)
    tiny = (expect.abs() > 1e-8) & (expect.abs() < 1e-3)
    assert tiny.sum() > 0, "the case must give outputs that only the masked weight makes"
    assert (out[tiny] != 0).all(), "a masked key's underflowing weight was flushed to zero"
    torch.testing.assert_close(out[tiny].double(), expect[tiny], rtol=0.1, atol=0)
