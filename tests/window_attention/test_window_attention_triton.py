"""window_attention family, Triton backend (under TRITON_INTERPRET=1 on CPU tensors): non-finite
values. A NaN in q, k, v, the bias table or the scale gives NaN exactly where the float64 reference
(eager softmax(scores) @ v) has it, gradients included; a NaN in v reaches every query of its window
or segment however small its key's weight, and no other; a row whose keys all score -inf (a -inf
bias) is NaN. The shifted-window -100 and the padding stay legal masks."""
import pytest
import torch

import vitkernels  # noqa: F401
from vitkernels.reference import window_attention as ref

from attention_checks import check_nonfinite

NAN, INF = float("nan"), float("inf")
SITES = ["q", "k", "v_underflow", "scale"]


def _poisoned(site, q, k, v, index):
    q, k, v = q.clone(), k.clone(), v.clone()
    if site == "q":
        q[index] = NAN
    if site == "k":
        k[index] = NAN
    if site == "v_underflow":
        # Scores ~60x larger than usual: most weights are exactly 0 in fp32 and in float64 alike.
        q = q * 60
        v[index] = NAN
    return q, k, v, (NAN if site == "scale" else None)


@pytest.mark.parametrize("site", SITES + ["bias", "bias_all_minus_inf"])
def test_window_nonfinite(site, run_on):
    """5 x 5 image, 2 x 2 windows shifted by 1: padded and shifted windows alike."""
    q, k, v = (torch.randn(1, 5, 5, 2, 4) for _ in range(3))
    q, k, v, scale = _poisoned(site, q, k, v, (0, 1, 2, 0, 1))
    bias = torch.randn(9, 2)
    if site == "bias":
        bias[4, 1] = NAN
    if site == "bias_all_minus_inf":
        bias[:, 0] = -INF                       # head 0: every score -inf, 0 / 0 in eager
    check_nonfinite(run_on, lambda q, k, v, b: torch.ops.vitk.window_attention(q, k, v, [2, 2], [1, 1], b, scale),
                    lambda q, k, v, b: ref.window_attention(q, k, v, [2, 2], [1, 1], b, scale),
                    [q, k, v, bias], ["q", "k", "v", "rel_pos_bias"])


@pytest.mark.parametrize("site", SITES)
def test_varlen_nonfinite(site, run_on):
    """Segments of 4, 0 and 5 tokens: a NaN stays in its own segment."""
    q, k, v = torch.randn(9, 2, 4), torch.randn(9, 2, 4), torch.randn(9, 2, 3)
    q, k, v, scale = _poisoned(site, q, k, v, (6, 1, 2))
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    check_nonfinite(run_on, lambda q, k, v: torch.ops.vitk.varlen_attention(q, k, v, cu, 5, scale),
                    lambda q, k, v: ref.varlen_attention(q, k, v, cu, 5, scale), [q, k, v], "qkv")
