"""Non-finite and degenerate inputs of the masked attention ops, on every backend (README, "Non-finite
and degenerate inputs"): NaN in gives NaN out as eager softmax does; a decay is summed along its
path only, so -inf is a legal "no path" mask, the diagonal always survives, and cells off every
path never matter."""
import contextlib

import pytest
import torch

import vitkernels
from vitkernels.reference import masked_attention as ref
from conftest import backend_params

B, H, W, HEADS, D = 1, 3, 5, 2, 8
NAN, INF = float("nan"), float("inf")


def _qkv():
    return [torch.randn(B, H, W, HEADS, D) for _ in range(3)]


def _decays(fill=None):
    la, lb = (-torch.rand(B, H, W, HEADS) for _ in range(2))
    if fill is not None:
        la.fill_(fill)
        lb.fill_(fill)
    return la, lb


def _same_nan_and_values(out, expect, tol=2e-5):
    expect = expect.to(out.dtype)
    assert torch.equal(out.isnan(), expect.isnan()), (
        f"NaN pattern differs: {int(out.isnan().sum())} NaN here, {int(expect.isnan().sum())} in the reference")
    fin = expect.isfinite()
    assert torch.allclose(out[fin], expect[fin], atol=tol, rtol=0), "finite outputs differ from the reference"


def _ref_polyline(q, k, v, la, lb, symmetric):
    return ref.polyline_attention(q.double(), k.double(), v.double(), la.double(), lb.double(), None, symmetric)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("backend,device", backend_params("polyline_attention_fwd"))
def test_polyline_all_minus_inf_decays_is_identity(backend, device, symmetric, run_on):
    """Every path is cut, only the empty one (a token to itself) is left: out == v exactly."""
    q, k, v = _qkv()
    out = run_on(backend, vitkernels.polyline_attention, q, k, v, *_decays(-INF), None, symmetric)
    torch.testing.assert_close(out, v, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_params("polyline_attention_fwd"))
def test_manhattan_minus_inf_gamma_is_identity(backend, device, run_on):
    q, k, v = _qkv()
    out = run_on(backend, vitkernels.manhattan_attention, q, k, v, torch.full((HEADS,), -INF))
    torch.testing.assert_close(out, v, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_params("axial_decay_attention_fwd"))
def test_axial_all_minus_inf_decays_is_identity(backend, device, run_on):
    q, k, v = _qkv()
    out = run_on(backend, vitkernels.axial_decay_attention, q, k, v, *_decays(-INF))
    torch.testing.assert_close(out, v, rtol=0, atol=0)


# log_alpha[:, :, 0] lies on no row path and log_beta[:, 0] on no column path.
OFF_PATH = [-1e6, -INF, NAN, INF]


@pytest.mark.parametrize("value", OFF_PATH)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("backend,device", backend_params("polyline_attention_fwd"))
def test_polyline_cells_off_every_path_change_nothing(backend, device, symmetric, value, run_on):
    q, k, v = _qkv()
    la, lb = _decays()
    base = run_on(backend, vitkernels.polyline_attention, q, k, v, la, lb, None, symmetric)
    la2, lb2 = la.clone(), lb.clone()
    la2[:, :, 0] = value
    lb2[:, 0] = value
    out = run_on(backend, vitkernels.polyline_attention, q, k, v, la2, lb2, None, symmetric)
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("value", OFF_PATH)
@pytest.mark.parametrize("backend,device", backend_params("axial_decay_attention_fwd"))
def test_axial_cells_off_every_path_change_nothing(backend, device, value, run_on):
    q, k, v = _qkv()
    la, lb = _decays()
    base = run_on(backend, vitkernels.axial_decay_attention, q, k, v, la, lb)
    la2, lb2 = la.clone(), lb.clone()
    la2[:, :, 0] = value
    lb2[:, 0] = value
    out = run_on(backend, vitkernels.axial_decay_attention, q, k, v, la2, lb2)
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)


# One non-finite decay cell, on some paths: the pairs whose path crosses it get -inf, +inf or NaN.
@pytest.mark.parametrize("value", [-INF, NAN, INF])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("backend,device", backend_params("polyline_attention_fwd"))
def test_polyline_one_nonfinite_cell_on_paths(backend, device, symmetric, value, run_on):
    q, k, v = _qkv()
    la, lb = _decays()
    la[0, 1, 2, 0] = value
    lb[0, 2, 3, 1] = value
    out = run_on(backend, vitkernels.polyline_attention, q, k, v, la, lb, None, symmetric)
    _same_nan_and_values(out, _ref_polyline(q, k, v, la, lb, symmetric))


@pytest.mark.parametrize("value", [-INF, NAN, INF])
@pytest.mark.parametrize("backend,device", backend_params("axial_decay_attention_fwd"))
def test_axial_one_nonfinite_cell_on_paths(backend, device, value, run_on):
    q, k, v = _qkv()
    la, lb = _decays()
    la[0, 1, 2, 0] = value
    lb[0, 2, 3, 1] = value
    out = run_on(backend, vitkernels.axial_decay_attention, q, k, v, la, lb)
    expect = ref.axial_decay_attention(*(t.double() for t in (q, k, v, la, lb)))
    _same_nan_and_values(out, expect)


@pytest.mark.parametrize("value", [-INF, NAN, INF])
@pytest.mark.parametrize("op", ["polyline", "axial"])
@pytest.mark.parametrize("backend,device", backend_params("polyline_attention_fwd"))
def test_decay_gradient_of_a_nonfinite_cell_is_that_of_the_reference(op, backend, device, value):
    """A non-finite decay is counted into the masks, not summed: no gradient reaches its cell (0, as
    autograd through the reference gives), whatever NaN the other cells' gradients carry."""
    torch.manual_seed(5)
    q, k, v = _qkv()
    la, lb = _decays()
    la[0, 1, 2, 0] = value
    lb[0, 2, 3, 1] = value
    go = torch.randn(B, H, W, HEADS, D)
    q, k, v, la, lb, go = (t.to(device) for t in (q, k, v, la, lb, go))

    def grads(fn, *a):
        leaves = [t.clone().requires_grad_(True) for t in a[3:5]]
        out = fn(*a[:3], *leaves)
        return torch.autograd.grad(out, leaves, go.to(out.dtype))

    fn = vitkernels.polyline_attention if op == "polyline" else vitkernels.axial_decay_attention
    rfn = (lambda q, k, v, la, lb: ref.polyline_attention(q, k, v, la, lb, None, True)) if op == "polyline" else \
        ref.axial_decay_attention
    with vitkernels.use_backend(backend):
        got = grads(fn, q, k, v, la, lb)
    want = grads(rfn, *(t.double() for t in (q, k, v, la, lb)))
    for g, w, cell in zip(got, want, [(0, 1, 2, 0), (0, 2, 3, 1)]):
        g = g.cpu()
        assert g[cell].item() == 0.0 and w[cell].item() == 0.0, (g[cell], w[cell])
        # NaN exactly where the reference has it (the cells of paths through a pair with a NaN dS), the
        # same numbers elsewhere.
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("value", [0.5, NAN])
@pytest.mark.parametrize("op", ["polyline", "axial"])
@pytest.mark.parametrize("backend,device", backend_params("polyline_attention_fwd"))
def test_decay_cells_on_no_path_get_exactly_zero_gradient(op, backend, device, value):
    """log_alpha[:, :, 0] and log_beta[:, 0] are on no path (a path covers (min, max]): their gradient is
    exactly 0 on every backend and in the reference, also when other pairs' dS are NaN."""
    torch.manual_seed(6)
    q, k, v = _qkv()
    la, lb = _decays()
    if value != 0.5:
        la[0, 1, 2, 0] = value
    q, k, v, la, lb = (t.to(device) for t in (q, k, v, la, lb))
    fn = vitkernels.polyline_attention if op == "polyline" else vitkernels.axial_decay_attention
    rfn = (lambda *a: ref.polyline_attention(*a, None, True)) if op == "polyline" else ref.axial_decay_attention
    for run, args in ((backend, (q, k, v, la, lb)), (None, tuple(t.double() for t in (q, k, v, la, lb)))):
        leaves = [t.clone().requires_grad_(True) for t in args[3:]]
        with vitkernels.use_backend(run) if run else contextlib.nullcontext():
            (fn if run else rfn)(*args[:3], *leaves).square().sum().backward()
        dla, dlb = (t.grad.cpu() for t in leaves)
        assert (dla[:, :, 0] == 0).all() and (dlb[:, 0] == 0).all(), (run, dla[:, :, 0], dlb[:, 0])


# NaN in q, k or v, as eager softmax(q k^T) v spreads it.
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("op", ["polyline", "axial", "gaussian", "reduced"])
def test_nan_input_spreads_as_in_eager(op, where, run_on):
    q, k, v = _qkv()
    la, lb = _decays()
    {"q": q, "k": k, "v": v}[where][0, 1, 2, 1, 3] = NAN
    mix_w, mix_s = torch.rand(HEADS, 3), 0.5 + torch.rand(HEADS, 3)
    cases = {
        "polyline": (vitkernels.polyline_attention, (q, k, v, la, lb), ref.polyline_attention, "polyline_attention_fwd"),
        "axial": (vitkernels.axial_decay_attention, (q, k, v, la, lb), ref.axial_decay_attention,
                  "axial_decay_attention_fwd"),
        "gaussian": (vitkernels.gaussian_mask_attention, (q, k, v, mix_w, mix_s), ref.gaussian_mask_attention,
                     "gaussian_mask_attention_fwd"),
        "reduced": (vitkernels.reduced_attention, (q.flatten(1, 2), k.flatten(1, 2)[:, 1::2], v.flatten(1, 2)[:, 1::2]),
                    ref.reduced_attention, "reduced_attention_fwd"),
    }
    fn, args, reference, op_name = cases[op]
    expect = reference(*(a.double() for a in args))
    assert expect.isnan().any()
    for p in backend_params(op_name):
        if p.marks:
            continue
        backend = p.values[0]
        _same_nan_and_values(run_on(backend, fn, *args), expect)


@pytest.mark.parametrize("backend,device", backend_params("reduced_attention_fwd"))
def test_reduced_row_of_minus_inf_scores_is_nan(backend, device, run_on):
    """A row whose every key scores -inf is 0/0, NaN as in eager."""
    q = torch.rand(B, 4, HEADS, D) + 0.5              # positive
    k = torch.randn(B, 3, HEADS, D)
    k[..., 0] = -INF                                   # every score -inf
    v = torch.randn(B, 3, HEADS, D)
    out = run_on(backend, vitkernels.reduced_attention, q, k, v)
    assert out.isnan().all()


@pytest.mark.parametrize("backend,device", backend_params("gaussian_mask_attention_fwd"))
def test_gaussian_nan_sigma_is_nan(backend, device, run_on):
    q, k, v = _qkv()
    mix_w, mix_s = torch.rand(HEADS, 3), 0.5 + torch.rand(HEADS, 3)
    mix_s[1, 0] = NAN
    out = run_on(backend, vitkernels.gaussian_mask_attention, q, k, v, mix_w, mix_s)
    _same_nan_and_values(out, ref.gaussian_mask_attention(*(t.double() for t in (q, k, v, mix_w, mix_s))))
