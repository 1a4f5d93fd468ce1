"""One benchmark item: decide whether the contender may run, build it outside the timed region,
check its output, measure its peak memory, then time it with pytest-benchmark."""
import gc
import re
import time

import pytest
import torch

from . import machine, memory, timing
from .contenders import is_peer


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def _skip_reason(session, family, case, contender):
    if is_peer(contender):
        peer = family.peer_of(contender)
        if session.device.split(":")[0] not in peer.devices:
            return f"{peer.name} runs on {'/'.join(peer.devices)} only"
    need = case.est_bytes.get(contender, 0)
    if need:
        have = memory.available_bytes(session.device) * session.MEMORY_HEADROOM
        if need > have:
            why = case.est_why.get(contender)
            return f"needs {_gb(need)}" + (f" ({why})" if why else "") + f", {_gb(have)} usable"
    return None


def _forward_backward(fn, inputs):
    """The timed call of a backward case (see Case.backward)."""
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    grad_out = inputs["grad_out"]

    def step():
        # Inside the timed region, for every contender alike: a fresh .grad is stored, never
        # accumulated into last round's (which would add a read-modify-write pass per leaf).
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(grad_out)
        return out.detach(), tuple(t.grad for t in leaves)
    return step


def _build(session, family, case, contender, inputs, rec):
    """(zero-argument callable, output of a first call or None). Untimed work happens here."""
    if is_peer(contender):
        peer = family.peer_of(contender)
        start = time.perf_counter()
        fn = peer.setup(case, inputs)
        rec.update(label=peer.label(), setup_s=round(time.perf_counter() - start, 3))
        return (_forward_backward(fn, inputs) if case.backward else fn), None
    op, args, kwargs = (family.vitk if contender == "vitk" else family.reference)(case, inputs)
    if contender == "compile":
        # A fresh dynamo state per case: its compile time is its own, and earlier cases' graphs
        # cannot push this one over the recompile limit.
        torch._dynamo.reset()
        op = torch.compile(op)
    fn = lambda: op(*args, **kwargs)          # noqa: E731
    if case.backward:
        fn = _forward_backward(fn, inputs)
    rec["label"] = {"vitk": "vitkernels", "eager": "reference (eager)",
                    "compile": "torch.compile(reference)"}[contender]
    if contender != "compile":
        return fn, None
    # First call = tracing + inductor codegen + C++/Triton compile + one run (for a backward case,
    # the backward graph too); reported, not timed.
    out, seconds = timing.wall(timing.synced(fn, session.device))
    rec["compile_s"] = round(seconds, 3)
    return fn, out


def _stats(benchmark) -> dict:
    s = benchmark.stats.stats
    return {"median_ms": s.median * 1e3, "min_ms": s.min * 1e3, "iqr_ms": s.iqr * 1e3,
            "mean_ms": s.mean * 1e3, "rounds": s.rounds}


def _describe(exc: BaseException) -> str:
    text = str(exc)
    asked = re.search(r"tried to allocate (\d+) bytes", text)
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower():
        return "out of memory" + (f": tried to allocate {_gb(int(asked.group(1)))}" if asked else "")
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(exc).__name__}: {first}"


def run_one(session, benchmark, family, case, contender) -> None:
    rec = {"family": family.name, "case": case.name, "shape": case.shape, "contender": contender,
           "flops": case.flops, "bytes": case.bytes, "int8_roof": case.int8_roof, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    benchmark.group = f"{family.name}/{case.name}"
    try:
        with memory.guard(session.device):
            _run(session, benchmark, family, case, contender, rec)
    except pytest.skip.Exception:
        raise
    except BaseException as exc:
        rec.update(status="error", reason=_describe(exc))
        raise
    finally:
        session.add(rec)


def _run(session, benchmark, family, case, contender, rec) -> None:
    reason = _skip_reason(session, family, case, contender)
    if reason:
        rec.update(status="skipped", reason=reason)
        pytest.skip(reason)
    session.roofline                                      # measured before any case runs
    inputs, cache = session.inputs(family, case)
    try:
        fn, out = _build(session, family, case, contender, inputs, rec)
    except ImportError as exc:
        rec.update(status="skipped", reason=f"not importable: {exc}")
        pytest.skip(rec["reason"])
    except pytest.skip.Exception as exc:                  # a peer that cannot run this case
        rec.update(status="skipped", reason=str(exc.msg))
        raise
    timed = timing.synced(fn, session.device)
    if out is None:                                       # compile's first call already ran
        out = timed()
    # The first call is the checked one and a warm-up: it also pays one-time costs (lazy library
    # pages, thread pools; 100+ MiB of RSS) that must not count as the op's memory.
    rec["check"] = family.check(case, inputs, contender, out, cache)
    del out
    gc.collect()
    # A warm call: its peak memory is the op's own, and its time sizes the timing plan.
    (out, peak), one_call_s = timing.wall(lambda: memory.peak_mib(timed, session.device))
    rec["peak_mib"] = None if peak is None else round(peak, 1)
    del out
    gc.collect()
    plan = timing.plan(one_call_s, session.quick)
    rec.update(plan)
    benchmark.extra_info.update({k: v for k, v in rec.items() if k not in ("family", "case", "contender")})
    with machine.kept_blocks(session.device) as allocator:
        benchmark.pedantic(timed, **plan)
    session.collector.allocator = allocator
    if benchmark.stats is None:                           # --benchmark-disable: ran once, untimed
        rec.update(status="skipped", reason="benchmarks disabled")
    else:
        rec.update(status="ok", **_stats(benchmark))
