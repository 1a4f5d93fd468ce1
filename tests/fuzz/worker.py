"""Fuzzes one op in its own process (tests/fuzz/test_fuzz.py runs one per op, with a timeout, so a crash
or a hang fails that op's test only):

    python tests/fuzz/worker.py OP EXAMPLES SEED LOG

Each drawn call runs on every backend that can run here. The rule: every backend returns the same
result (its first output held to the float64 reference, NaN where the reference has NaN, close where
the inputs are tame; every output held to the other backends'), or every backend raises the same kind
of error (ValueError, TypeError, IndexError, RuntimeError) with a message that names the argument.
A differentiable public op's gradients are held to the reference's too. Before each call the worker
appends the call to LOG, so the parent can name the call a crash or a hang happened in.
"""
import os
import re
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

import vitkernels  # noqa: E402
from vitkernels import dispatch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import STRATEGIES, Call  # noqa: E402

if os.environ["TRITON_INTERPRET"] == "1" and "triton" in os.environ.get("VITK_FUZZ_BACKENDS", "triton"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import triton_bounds  # noqa: E402

    triton_bounds.install()  # an out-of-bounds access fails the call instead of corrupting this process

TOL = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2, torch.float64: 1e-9}
KINDS = (IndexError, TypeError, ValueError, RuntimeError)
# The argument's name (or names), or the op's (a backend's refusal), then a colon; or torch's own parser.
NAMED = re.compile(r"^([A-Za-z_][\w]*(, [A-Za-z_][\w]*)*|vitk(_route)?::\w+):")


def kind(e: BaseException):
    return next((k for k in KINDS if isinstance(e, k)), type(e))


def backends_here(op):
    """The backends that can run here, or those named in VITK_FUZZ_BACKENDS (e.g. "cpu" under the
    sanitizers, whose target is the C++ library)."""
    only = [b for b in os.environ.get("VITK_FUZZ_BACKENDS", "").split(",") if b]
    return [impl.backend for impl in dispatch.impls(op)
            if not dispatch.why_not(impl, "cpu") and (not only or impl.backend in only)]


def call_op(op, args):
    """The op on args given in schema order, keyword-only ones passed by name."""
    schema = getattr(torch.ops.vitk, op).default._schema
    pos = [a for i, a in enumerate(args) if not schema.arguments[i].kwarg_only]
    kw = {schema.arguments[i].name: a for i, a in enumerate(args) if schema.arguments[i].kwarg_only}
    return getattr(torch.ops.vitk, op)(*pos, **kw)


def run(op, backend, args):
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True          # poison every fresh output
    try:
        with vitkernels.use_backend(backend):
            return call_op(op, args)
    except Exception as e:  # noqa: BLE001 - every error is compared across backends
        return e
    finally:
        torch.use_deterministic_algorithms(prev_det)


def outputs(res):
    return list(res) if isinstance(res, (tuple, list)) else [res]


def compare(got: torch.Tensor, want: torch.Tensor, dtype, exact: bool, what: str):
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not got.is_floating_point():
        assert torch.equal(got.long(), want.long()), f"{what}: integer outputs differ"
        return
    g, w = got.double(), want.double()
    missing = torch.isnan(w) & ~torch.isnan(g)
    assert not missing.any(), f"{what}: {int(missing.sum())} NaN outputs of the reference are not NaN here"
    if not exact:
        return
    extra = torch.isnan(g) & ~torch.isnan(w)
    assert not extra.any(), f"{what}: {int(extra.sum())} NaN outputs where the reference has numbers"
    assert torch.equal(torch.isinf(g), torch.isinf(w)), f"{what}: infinities differ from the reference"
    fin = torch.isfinite(w)
    if fin.any():
        err = (g[fin] - w[fin]).abs().max().item()
        scale = max(1.0, w[fin].abs().max().item())
        assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype] * scale:.3g}"


def input_dtype(call: Call):
    floats = [a.dtype for a in call.args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return floats[0] if floats else torch.float32


def check_argmin(res, call: Call, exact: bool):
    """Indices may differ between near-ties; the distance of the chosen code may not."""
    compare(res[1], call.reference(*call.args)[1], torch.float32, exact, "distances")


REACHED = [0]


def check_call(op: str, call: Call, backends):
    results = {b: run(op, b, call.args) for b in backends}
    errors = {b: r for b, r in results.items() if isinstance(r, BaseException)}
    if not errors:
        REACHED[0] += 1
    if errors:
        assert len(errors) == len(results), (
            f"only {sorted(errors)} raised: " + "; ".join(f"{b}: {type(e).__name__}: {e}" for b, e in errors.items()))
        kinds = {b: kind(e) for b, e in errors.items()}
        assert len(set(kinds.values())) == 1, f"different kinds of error: {kinds} ({errors})"
        for b, e in errors.items():
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            assert NAMED.match(first), f"{b}: {type(e).__name__} does not name its argument: {first!r}"
        return
    dtype = input_dtype(call)
    exact = call.exact_ok and not call.mutated
    ref = None if call.mutated or call.reference is None else call.reference
    names = list(results)
    for b in names:
        outs = outputs(results[b])
        if ref is not None:
            if op == "codebook_argmin":
                check_argmin(outs, call, exact)
            else:
                compare(outs[0], outputs(ref(*call.args))[0], dtype, exact, f"{b}: output vs reference")
        for other in names[:names.index(b)]:
            for i, (x, y) in enumerate(zip(outs, outputs(results[other]))):
                if op == "codebook_argmin" and i == 0:
                    continue
                compare(x, y, dtype, exact, f"{b} vs {other}: output {i}")
    if call.grads and ref is not None and exact and dtype == torch.float32:
        check_grads(op, call, backends)


def check_grads(op, call: Call, backends):
    """Gradients through the op (its backward op) against autograd through the reference."""
    positions = [i for i in call.grads if isinstance(call.args[i], torch.Tensor)]
    if not positions:
        return
    leaves = {i: call.args[i].detach().double().requires_grad_(True) for i in positions}
    expect_out = outputs(call.reference(*[leaves.get(i, a) for i, a in enumerate(call.args)]))[0]
    if not expect_out.requires_grad:        # an empty problem: nothing flows back
        return
    # A fixed seed, so that hypothesis' replay of a failing call sees the same cotangent.
    go = torch.randn(expect_out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(len(positions)))
    expect = torch.autograd.grad(expect_out, [leaves[i] for i in positions], go, allow_unused=True)
    for b in backends:
        mine = {i: call.args[i].detach().clone().requires_grad_(True) for i in positions}
        with vitkernels.use_backend(b):
            out = outputs(call_op(op, [mine.get(i, a) for i, a in enumerate(call.args)]))[0]
            got = torch.autograd.grad(out, [mine[i] for i in positions], go.to(out.dtype), allow_unused=True)
        for i, g, e in zip(positions, got, expect):
            if e is None:
                continue
            assert g is not None, f"{b}: no gradient for argument {i}"
            # A gradient has its argument's dtype: a float16 bias gets a float16 gradient.
            compare(g, e, call.args[i].dtype, True, f"{b}: gradient of argument {i}")


def main(op: str, examples: int, seed_value: int, log_path: str) -> None:
    backends = backends_here(op)
    strategy = STRATEGIES[op]
    log = open(log_path, "a", buffering=1)

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(strategy)
    def fuzz(call):
        log.write(f"{call!r}\n")
        check_call(op, call, backends)

    fuzz()
    # A strategy whose every call is refused before any kernel runs would pass vacuously.
    assert REACHED[0] > 0, f"{op}: no drawn call ran on every backend"
    log.write("done\n")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
