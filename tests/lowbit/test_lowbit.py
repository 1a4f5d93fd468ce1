"""The lowbit family: every backend against vitkernels.reference.lowbit (integer paths exactly)."""
import pytest
import torch

import vitkernels
from vitkernels import lowbit as pack
from vitkernels.reference import lowbit as ref

from conftest import backend_params

ACTS = ["none", "relu", "gelu", "gelu_tanh"]
SHAPES = [(1, 3, 2), (3, 17, 18), (17, 129, 130), (5, 40, 1000), (129, 33, 64)]   # (M, N, K), K even for int4
ODD_K = [(1, 1, 1), (3, 17, 17), (17, 129, 129), (2, 1000, 3)]
# The AMX kernel's edges: several 1 KiB slices of k with a ragged last chunk, several row blocks.
LONG_K = [(70, 33, 2500), (450, 20, 2500)]
# Triton on CPU tensors runs under the interpreter at numpy speed: fewer shapes, still odd ones and
# ones spanning several tiles of M, N and K.
INTERPRETED_SHAPES = [(1, 3, 2), (3, 17, 18), (17, 129, 130), (129, 33, 64)]
INTERPRETED_ODD_K = [(1, 1, 1), (2, 100, 3), (17, 70, 129)]


def _backend_shapes(op, shapes, interpreted=INTERPRETED_SHAPES):
    """(backend, device, M, N, K) cases: ``shapes`` for every backend, ``interpreted`` for Triton on the CPU."""
    params = []
    for p in backend_params(op):
        backend, device = p.values
        for M, N, K in (interpreted if (backend, device) == ("triton", "cpu") else shapes):
            params.append(pytest.param(backend, device, M, N, K, id=f"{p.id}-{M}x{N}x{K}", marks=p.marks))
    return params


def _close(got, want, rtol=2e-5):
    got = got.double()
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= rtol * scale * 4, f"max error {err:.3g} (scale {scale:.3g})"


def _x(shape, dtype=torch.float32, strided=False):
    if strided:
        big = torch.randn(*shape[:-1], shape[-1] + 5)
        return big[..., 2:-3].to(dtype) if dtype != torch.float32 else big[..., 2:-3]
    return torch.randn(shape).to(dtype)


# ---------------------------------------------------------------- quantize_per_token
@pytest.mark.parametrize("backend,device", backend_params("quantize_per_token"))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quantize_exact(backend, device, symmetric, dtype, run_on):
    x = torch.randn(4, 7, 131).to(dtype)
    x[0, 0] = 0                                   # a zero row: scale 1
    x[0, 1, 5] = 1e4                              # one huge outlier
    x[0, 2] = x[0, 2].abs()                       # all positive: the range still holds 0
    x[1, 3, 7] = float("nan")                     # a non-finite row: q 0, scale NaN
    x[1, 4, 0] = float("inf")
    xs = x[:, ::2]                                # strided leading dims
    for t in (x, xs):
        q, s, z = run_on(backend, torch.ops.vitk.quantize_per_token, t, symmetric=symmetric)
        rq, rs, rz = ref.quantize_per_token(t, symmetric)
        assert q.dtype == rq.dtype and torch.equal(q, rq)
        assert torch.equal(s.isnan(), rs.isnan()) and torch.equal(s[~s.isnan()], rs[~rs.isnan()])
        assert torch.equal(z, rz)
    assert float(s.view(-1)[0]) == 1.0 or t is xs


# ---------------------------------------------------------------- int8
@pytest.mark.parametrize("backend,device,M,N,K", _backend_shapes("int8_linear", ODD_K + SHAPES + LONG_K,
                                                                  INTERPRETED_ODD_K + INTERPRETED_SHAPES))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("blocked", [False, True], ids=["plain", "blocked"])
def test_int8_integer_path_exact(backend, device, M, N, K, symmetric, blocked, run_on):
    # Unit scales, no bias: the fp32 output is the integer sum itself, which must be exact.
    xq = torch.randint(-127, 128, (M, K), dtype=torch.int8) if symmetric else \
        torch.randint(0, 256, (M, K), dtype=torch.uint8)
    zp = None if symmetric else torch.randint(0, 256, (M,), dtype=torch.int32)
    wq = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    ones_m, ones_n = torch.ones(M), torch.ones(N)
    w = pack.block_int8(wq) if blocked else wq
    out = run_on(backend, torch.ops.vitk.int8_linear, xq, ones_m, zp, w, ones_n)
    want = ref.int8_linear(xq, ones_m, zp, wq, ones_n)
    assert want.abs().max() < 2**24
    assert torch.equal(out.double(), want)


@pytest.mark.parametrize("backend,device,M,N,K", _backend_shapes("dynamic_int8_linear", ODD_K + SHAPES,
                                                                  [(1, 1, 1), (17, 129, 130)]))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_dynamic_int8(backend, device, M, N, K, act, symmetric, run_on):
    x = _x((M, K), strided=M % 2 == 1)
    wq, ws = pack.pack_int8(torch.randn(N, K))
    bias = torch.randn(N) if K % 2 else None
    for w in (wq, pack.block_int8(wq)):
        out = run_on(backend, torch.ops.vitk.dynamic_int8_linear, x, w, ws, bias, activation=act, symmetric=symmetric)
        _close(out, ref.dynamic_int8_linear(x, wq, ws, bias, act, symmetric))
        q, s, z = torch.ops.vitk.quantize_per_token(x, symmetric=symmetric)
        seq = run_on(backend, torch.ops.vitk.int8_linear, q, s, None if symmetric else z, w, ws, bias, activation=act)
        assert torch.equal(out, seq), "dynamic_int8_linear differs from quantize_per_token + int8_linear"


@pytest.mark.parametrize("backend,device", backend_params("dynamic_int8_linear"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dynamic_int8_half_dtypes_and_leading_dims(backend, device, dtype, run_on):
    x = torch.randn(2, 3, 5, 48).to(dtype)[:, 1:]
    x[0, 0, 0] = 0
    x[0, 0, 1, 3] = 3e3
    wq, ws = pack.pack_int8(torch.randn(20, 48))
    bias = torch.randn(20)
    out = run_on(backend, torch.ops.vitk.dynamic_int8_linear, x, wq, ws, bias, activation="gelu")
    assert out.dtype == dtype and out.shape == (2, 2, 5, 20)
    _close(out, ref.dynamic_int8_linear(x, wq, ws, bias, "gelu"), rtol=1e-2)
    q, s, _ = torch.ops.vitk.quantize_per_token(x)
    seq = run_on(backend, torch.ops.vitk.int8_linear, q, s, None, wq, ws, bias, activation="gelu", out_dtype=dtype)
    assert torch.equal(out, seq)


# ---------------------------------------------------------------- int4 / shift
@pytest.mark.parametrize("backend,device,M,N,K", _backend_shapes("int4_linear", SHAPES + [(4, 3, 256)],
                                                                  [(3, 17, 18), (17, 129, 130), (4, 3, 256)]))
@pytest.mark.parametrize("symmetric", [True, False], ids=["signed", "zero"])
def test_int4_linear(backend, device, M, N, K, symmetric, run_on):
    x = _x((M, K), strided=True)
    bias = torch.randn(N)
    for gs in [g for g in (32, 64, 128, K) if K % g == 0]:
        wp, sc, zero = pack.pack_int4(torch.randn(N, K), gs, symmetric)
        if zero is not None:
            zero = zero + 0.25                                  # fractional zero points, as GPTQ stores them
        for act in ACTS:
            out = run_on(backend, torch.ops.vitk.int4_linear, x, wp, sc, zero, gs, bias, activation=act)
            _close(out, ref.int4_linear(x, wp, sc, zero, gs, bias, act))


@pytest.mark.parametrize("backend,device", backend_params("int4_linear"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_int4_linear_half(backend, device, dtype, run_on):
    x = torch.randn(3, 4, 64).to(dtype)
    wp, sc, zero = pack.pack_int4(torch.randn(40, 64), 32, False)
    out = run_on(backend, torch.ops.vitk.int4_linear, x, wp, sc.to(torch.bfloat16), zero.to(torch.bfloat16), 32)
    assert out.dtype == dtype
    _close(out, ref.int4_linear(x, wp, sc.to(torch.bfloat16), zero.to(torch.bfloat16), 32), rtol=1e-2)


@pytest.mark.parametrize("backend,device,M,N,K", _backend_shapes("int4_int8_linear", SHAPES + [(40, 70, 1000)],
                                                                  [(1, 3, 2), (17, 129, 130), (129, 33, 64)]))
@pytest.mark.parametrize("act", ACTS)
def test_int4_int8_linear(backend, device, M, N, K, act, run_on):
    x = _x((M, K), strided=True)
    x[0] = 0
    if M > 1:
        x[1, 0] = 1e3
    wp, sc, _ = pack.pack_int4(torch.randn(N, K), K, True)
    bias = torch.randn(N) if N % 2 else None
    out = run_on(backend, torch.ops.vitk.int4_int8_linear, x, wp, sc.view(-1), bias, activation=act)
    _close(out, ref.int4_int8_linear(x, wp, sc.view(-1), bias, act))
    # Integer path exact: unit scale, no bias, integer x within int8 (its own scale is then 1).
    xi = torch.randint(-127, 128, (M, K)).float()
    xi[:, 0] = 127
    out = run_on(backend, torch.ops.vitk.int4_int8_linear, xi, wp, torch.ones(N))
    assert torch.equal(out.double(), ref.int4_int8_linear(xi, wp, torch.ones(N)))


@pytest.mark.parametrize("backend,device,M,N,K", _backend_shapes("shift_linear", SHAPES,
                                                                  [(1, 3, 2), (17, 129, 130), (129, 33, 64)]))
@pytest.mark.parametrize("scaled", [False, True], ids=["unit", "scaled"])
def test_shift_linear(backend, device, M, N, K, scaled, run_on):
    x = _x((2, M, K), strided=True)
    wp, sc = pack.pack_shift(torch.randn(N, K))
    s = sc if scaled else None
    for act in ACTS:
        bias = torch.randn(N) if act != "none" else None
        out = run_on(backend, torch.ops.vitk.shift_linear, x, wp, s, bias, activation=act)
        _close(out, ref.shift_linear(x, wp, s, bias, act))


def test_shift_codes_are_powers_of_two():
    v = pack.shift_values(torch.float64)
    assert v[0] == 0 and v[8] == 0
    assert torch.equal(v[1:8], 2.0 ** -torch.arange(7, dtype=torch.float64))
    assert torch.equal(v[9:16], -v[1:8])
    w = torch.tensor([[1.0, -0.5, 0.26, -0.1, 0.0, 1e-4]])
    wp, s = pack.pack_shift(w)
    assert torch.equal(pack.unpack_shift(wp, s), torch.tensor([[1.0, -0.5, 0.25, -0.125, 0.0, 2.0 ** -6]]))


def test_pack_roundtrips():
    w = torch.randn(33, 64)
    wq, ws = pack.pack_int8(w)
    assert torch.equal(pack.unblock_int8(pack.block_int8(wq), 33, 64), wq)
    assert (pack.unpack_int8(wq, ws) - w).abs().max() <= ws.max() / 2 + 1e-6
    for sym in (True, False):
        wp, sc, z = pack.pack_int4(w, 32, sym)
        err = (pack.unpack_int4(wp, sc, z, 32) - w).abs()
        assert float((err / sc.repeat_interleave(32, 1)).max()) <= 0.5 + 1e-5 + (0 if sym else 0.5)


# ---------------------------------------------------------------- outputs of 16 MiB and more
def test_large_outputs():
    """fp32 outputs of 16 MiB and more are written with streaming stores on the CPU: every row and
    channel must still arrive."""
    M, N, K = 4200, 1024, 64                                   # 17.2 MB of fp32 output
    x = torch.randn(M, K)
    bias = torch.randn(N)
    wq, ws = pack.pack_int8(torch.randn(N, K))
    _close(torch.ops.vitk.dynamic_int8_linear(x, pack.block_int8(wq), ws, bias, activation="gelu"),
           ref.dynamic_int8_linear(x, wq, ws, bias, "gelu"))
    xi = torch.randint(-127, 128, (M, K)).float()
    xi[:, 0] = 127
    assert torch.equal(torch.ops.vitk.dynamic_int8_linear(xi, wq, torch.ones(N)).double(),
                       ref.dynamic_int8_linear(xi, wq, torch.ones(N)))
    wp, sc, zero = pack.pack_int4(torch.randn(N, K), 32, False)
    _close(torch.ops.vitk.int4_linear(x, wp, sc, zero, 32, bias), ref.int4_linear(x, wp, sc, zero, 32, bias))
    wp, sc = pack.pack_shift(torch.randn(N, K))
    _close(torch.ops.vitk.shift_linear(x, wp, sc, bias, activation="relu"),
           ref.shift_linear(x, wp, sc, bias, "relu"))


# ---------------------------------------------------------------- gradients wrt x
GRAD_OPS = ["dynamic_int8_linear", "int4_linear", "shift_linear"]


def _grad_call(op, x, N, K, act):
    w = torch.randn(N, K)
    bias = torch.randn(N)
    if op == "dynamic_int8_linear":
        wq, ws = pack.pack_int8(w)
        return (x, wq, ws, bias), {"activation": act}
    if op == "int4_linear":
        wp, sc, z = pack.pack_int4(w, 32, False)
        return (x, wp, sc, z, 32, bias), {"activation": act}
    wp, sc = pack.pack_shift(w)
    return (x, wp, sc, bias), {"activation": act}


@pytest.mark.parametrize("op,backend,device", [pytest.param(op, *p.values, id=f"{op}-{p.id}", marks=p.marks)
                                               for op in GRAD_OPS for p in backend_params(op)])
@pytest.mark.parametrize("act", ACTS)
def test_grad_x(op, backend, device, act):
    x = torch.randn(3, 5, 64, requires_grad=True)
    args, kw = _grad_call(op, x, 24, 64, act)
    with vitkernels.use_backend(backend):          # the forward, and the backward's own call of the op
        out = getattr(torch.ops.vitk, op)(*args, **kw)
        g = torch.randn_like(out)
        (gx,) = torch.autograd.grad(out, x, g)
        # (act'(pre) * g) @ W with pre the op's own output before its activation, W the dequantized weights
        # (dynamic_int8_linear: straight-through), in float64.
        kw_none = dict(kw, activation="none")
        pre = getattr(torch.ops.vitk, op)(*args, **kw_none).detach().double().requires_grad_(True)
    (gpre,) = torch.autograd.grad(ref.activate(pre, act), pre, g.double())
    want = gpre @ vitkernels.ops.lowbit.dequantized_weight(op, args, torch.float64)
    _close(gx, want, rtol=1e-4)


# ---------------------------------------------------------------- bad inputs
def _bad_cases():
    x = torch.randn(4, 64)
    wq, ws = pack.pack_int8(torch.randn(8, 64))
    wp, sc, z = pack.pack_int4(torch.randn(8, 64), 32, False)
    q, s, _ = torch.ops.vitk.quantize_per_token(x)
    d = torch.ops.vitk
    return [
        ("w_q", lambda: d.dynamic_int8_linear(x, wq.float(), ws)),                      # float weights as w_q
        ("w_q", lambda: d.dynamic_int8_linear(x, wq[:, :32], ws)),                      # K mismatch
        ("w_q", lambda: d.int8_linear(q, s, None, wq[:, :63], ws)),
        ("x", lambda: d.int4_linear(torch.randn(4, 63), wp, sc, z, 32)),                # odd K
        ("group_size", lambda: d.int4_linear(torch.randn(4, 96), pack.pack_int4(torch.randn(8, 96), 32)[0],
                                             torch.ones(8, 3), None, 64)),              # 64 does not divide 96
        ("group_size", lambda: d.int4_linear(x, wp, sc, z, 16)),
        ("activation", lambda: d.dynamic_int8_linear(x, wq, ws, activation="swish")),
        ("activation", lambda: d.shift_linear(x, wp, activation="Gelu")),
        ("w_scale", lambda: d.dynamic_int8_linear(x, wq, ws[None])),
        ("w_scale", lambda: d.int4_linear(x, wp, sc[:, :1], z, 32)),
        ("w_scale", lambda: d.int4_int8_linear(x, wp, torch.ones(7))),
        ("w_zero", lambda: d.int4_linear(x, wp, sc, z[:, :1], 32)),
        ("w_packed", lambda: d.int4_linear(x, wp[:, :31], sc, z, 32)),                  # wrong packed width
        ("w_packed", lambda: d.shift_linear(x, wp.to(torch.int8))),
        ("x_scale", lambda: d.int8_linear(q, s[:2], None, wq, ws)),
        ("x_q", lambda: d.int8_linear(q.float(), s, None, wq, ws)),
        ("bias", lambda: d.shift_linear(x, wp, None, torch.ones(3))),
        ("out_dtype", lambda: d.int8_linear(q, s, None, wq, ws, out_dtype=torch.int32)),
        ("x", lambda: d.quantize_per_token(torch.randn(3, 0))),
    ]


@pytest.mark.parametrize("backend", ["cpu", "python"] + [pytest.param("triton", marks=p.marks)
                                                          for p in backend_params("dynamic_int8_linear")
                                                          if tuple(p.values) == ("triton", "cpu")])
def test_bad_inputs_name_the_argument(backend):
    for name, fn in _bad_cases():
        if backend == "triton":
            with vitkernels.use_backend("triton"), pytest.raises(ValueError, match=f"^{name}:"):
                fn()
        elif backend == "python":
            # The declarations' checks (what torch.compile's fake kernels and forced backends run).
            with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
                with pytest.raises(ValueError, match=f"^{name}:"):
                    fn()
        else:
            with pytest.raises(ValueError, match=f"^{name}:"):
                fn()


# ---------------------------------------------------------------- opcheck, compile
def _opcheck_calls():
    x = torch.randn(3, 5, 64)
    wq, ws = pack.pack_int8(torch.randn(20, 64))
    wp, sc, z = pack.pack_int4(torch.randn(20, 64), 32, False)
    wps, ss = pack.pack_shift(torch.randn(20, 64))
    q, s, zp = torch.ops.vitk.quantize_per_token(x, symmetric=False)
    b = torch.randn(20)
    d = torch.ops.vitk
    xg = x.clone().requires_grad_(True)
    return [
        (d.quantize_per_token.default, (x,), {"symmetric": False}),
        (d.int8_linear.default, (q, s, zp, pack.block_int8(wq), ws, b), {"activation": "relu"}),
        (d.dynamic_int8_linear.default, (xg, wq, ws, b), {"activation": "gelu"}),
        (d.int4_linear.default, (xg, wp, sc, z, 32, b), {"activation": "gelu_tanh"}),
        (d.int4_int8_linear.default, (x, wp, sc[:, 0].contiguous(), b), {}),
        (d.shift_linear.default, (xg, wps, ss, b), {"activation": "relu"}),
    ]


@pytest.mark.parametrize("i", range(6))
def test_opcheck(i):
    op, args, kw = _opcheck_calls()[i]
    torch.library.opcheck(op, args, kw, test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                                     "test_aot_dispatch_dynamic"))


def test_compile_fullgraph_model():
    from vitkernels.models.lowbit import Int4Int8Linear, Int4Linear, Int8Linear, ShiftLinear

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = Int8Linear.from_float(torch.nn.Linear(64, 96), activation="gelu")
            self.fc2 = Int4Linear.from_float(torch.nn.Linear(96, 64), group_size=32)
            self.fc3 = ShiftLinear.from_float(torch.nn.Linear(64, 32))
            self.fc4 = Int4Int8Linear.from_float(torch.nn.Linear(32, 16))

        def forward(self, x):
            return self.fc4(self.fc3(self.fc2(self.fc1(x))))

    m = MLP()
    x = torch.randn(2, 7, 64)
    eager = m(x)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = torch.compile(m, fullgraph=True)
        assert torch.equal(compiled(x), eager)
        compiled(torch.randn(2, 7, 64))


# ---------------------------------------------------------------- modules: state_dict round trip
def _modules():
    from vitkernels.models.lowbit import Int4Int8Linear, Int4Linear, Int8Linear, ShiftLinear

    def shift_frozen(lin):
        return ShiftLinear.from_float(lin, activation="relu", trainable=True).freeze()

    return {
        "Int8Linear": lambda lin: Int8Linear.from_float(lin, activation="gelu"),
        "Int8Linear-asym": lambda lin: Int8Linear.from_float(lin, symmetric=False),
        "Int4Linear": lambda lin: Int4Linear.from_float(lin, group_size=32, activation="gelu_tanh"),
        "Int4Linear-zero": lambda lin: Int4Linear.from_float(lin, group_size=64, symmetric=False),
        "Int4Int8Linear": lambda lin: Int4Int8Linear.from_float(lin, activation="relu"),
        "ShiftLinear": lambda lin: ShiftLinear.from_float(lin, activation="gelu"),
        "ShiftLinear-frozen": shift_frozen,
        "ShiftLinear-trainable": lambda lin: ShiftLinear.from_float(lin, trainable=True),
    }


@pytest.mark.parametrize("name", list(_modules()))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_module_state_dict_roundtrip(name, bias, tmp_path):
    # Saved, then loaded into a fresh module built from a different float layer: the same outputs.
    build = _modules()[name]
    src = build(torch.nn.Linear(64, 40, bias=bias))
    dst = build(torch.nn.Linear(64, 40, bias=bias))
    x = torch.randn(3, 5, 64)
    assert not torch.equal(src(x), dst(x))
    torch.save(src.state_dict(), tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt")
    assert set(state) == set(src.state_dict())
    dst.load_state_dict(state)
    assert torch.equal(dst(x), src(x))
    assert dst.weight_bytes() == src.weight_bytes() and repr(dst) == repr(src)


def test_fresh_trainable_shift_linear_starts_from_a_float_init():
    """A trainable ShiftLinear built directly starts from nn.Linear's initialization rounded to powers of
    two, as DeepShift-PS converts one, not from all-zero weights that would make every output the bias."""
    from vitkernels.models.lowbit import ShiftLinear
    torch.manual_seed(3)
    m = ShiftLinear(96, 40, trainable=True)
    w = m.weight().detach()
    assert (w != 0).float().mean() > 0.5
    bound = 96 ** -0.5                                   # nn.Linear's kaiming-uniform bound
    assert w.abs().max() <= bound * 1.0001 and w.abs().max() > bound / 4
    # Packed from a copy of that float layer it is the same function as from_float of the layer.
    lin = torch.nn.Linear(96, 40)
    a, b = ShiftLinear.from_float(lin, trainable=True), ShiftLinear.from_float(lin)
    x = torch.randn(5, 96)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)
