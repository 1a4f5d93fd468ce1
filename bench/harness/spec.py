"""What a family file declares: its cases, how to call vitk / the reference / peers, and a check.

The harness derives the eager and torch.compile contenders from the single `reference` call, so a
family cannot accidentally benchmark a different function under the two names.
"""
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import pytest

from .contenders import CONTENDERS, peer_contender, peer_index
from .runner import run_one

# (function, args, kwargs): the timed region is exactly function(*args, **kwargs).
Call = Tuple[Callable, tuple, dict]


@dataclass(frozen=True)
class Case:
    name: str
    shape: str                      # shown in the table, e.g. "N=2048 K=100000 D=8"
    params: Dict[str, Any]
    flops: float                    # useful arithmetic, for the compute roof
    bytes: float                    # the least any implementation must read and write
    # Extra bytes one call allocates, per contender (missing: negligible). A contender whose estimate
    # exceeds what the device has free is skipped, never attempted, so it cannot OOM-kill the run.
    est_bytes: Dict[str, float] = field(default_factory=dict)
    est_why: Dict[str, str] = field(default_factory=dict)   # e.g. {"eager": "2 N x K fp32 matrices"}
    # Forward+backward: every contender's timed call becomes: .grad = None on each tensor of the
    # inputs dict that requires grad (looked up after the contender is built, so a family may create
    # its leaves there), out = call(), out.backward(inputs["grad_out"]); the checked output is
    # (out, (their grads, in the inputs dict's order)). FLOPs and bytes must then count both passes.
    backward: bool = False
    # Integer-math cases (int8 / int4 GEMMs): also report vitk's fraction of the measured int8 ceiling
    # (torch._int_mm on a large square problem; see roofline.measure), FLOPs counting one MAC as 2 ops.
    int8_roof: bool = False

    @property
    def seed(self) -> int:
        # Stable across runs and processes (hash() is salted per process).
        return zlib.crc32(self.name.encode())


@dataclass(frozen=True)
class Peer:
    """A third-party library solving the same problem; `setup` does untimed work (index building)
    and returns the zero-argument callable to time, or calls pytest.skip(reason) for a case the
    library cannot run (the reason is recorded as the contender's skip)."""
    name: str
    label: Callable[[], str]                                   # name + version, resolved lazily
    setup: Callable[[Case, dict], Callable[[], Any]]
    devices: Sequence[str] = ("cpu",)


@dataclass(frozen=True)
class Family:
    name: str
    cases: Sequence[Case]
    make_inputs: Callable[[Case, "torch.Generator"], dict]     # noqa: F821 (CPU generator, fixed seed)
    vitk: Callable[[Case, dict], Call]
    reference: Callable[[Case, dict], Call]
    # check(case, inputs, contender, output, cache) -> dict of facts for the JSON; raises
    # AssertionError when the output is wrong. `cache` lives as long as the case's inputs.
    check: Callable[[Case, dict, str, Any, dict], dict]
    peer: Union[Peer, Sequence[Peer], None] = None      # several: contenders "peer", "peer2", ...

    @property
    def peers(self) -> Tuple[Peer, ...]:
        if self.peer is None:
            return ()
        return (self.peer,) if isinstance(self.peer, Peer) else tuple(self.peer)

    def peer_of(self, contender: str) -> Peer:
        return self.peers[peer_index(contender)]

    def contenders(self, case: Case):
        return [c for c in CONTENDERS if c != "peer"] + [peer_contender(i) for i in range(len(self.peers))]

    def pytest_function(self):
        """A parametrized pytest test, one item per (case, contender); assign it to a test_* name."""
        params = [pytest.param(case, contender, id=f"{case.name}-{contender}")
                  for case in self.cases for contender in self.contenders(case)]
        family = self

        @pytest.mark.parametrize("case,contender", params)
        def test_family(benchmark, bench_session, case, contender):
            run_one(bench_session, benchmark, family, case, contender)

        test_family.__name__ = f"test_{self.name}"
        return test_family
