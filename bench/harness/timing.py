"""How long to time each contender, and device synchronization around the timed call."""
import math
import time

import torch

# Normal runs: ~3 s of timed rounds per contender but never fewer than 3 rounds (slow contenders
# take 3 rounds and stop). --quick is a smoke run: the numbers are only indicative.
TARGET_S = {False: 3.0, True: 0.3}
MIN_ROUNDS = {False: 3, True: 1}
MAX_ROUNDS = 200
MIN_ROUND_S = 1e-3     # below this, loop several calls per round to stay far above timer precision


def synced(fn, device: str):
    """The callable pytest-benchmark times: the op, plus a sync so GPU work is inside the timing."""
    if device.startswith("cuda"):
        def call():
            out = fn()
            torch.cuda.synchronize()
            return out
        return call
    return fn


def wall(fn) -> tuple:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def plan(one_call_s: float, quick: bool) -> dict:
    """rounds / iterations / warmup_rounds for benchmark.pedantic, from one already-warm call."""
    one_call_s = max(one_call_s, 1e-7)
    iterations = max(1, math.ceil(MIN_ROUND_S / one_call_s))
    round_s = one_call_s * iterations
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS[quick], math.ceil(TARGET_S[quick] / round_s)))
    # Calls over ~0.5 s have been warmed by the checked call and the memory call already; an extra
    # warm-up round would only add run time.
    warmup = 0 if round_s > 0.5 else (1 if quick else max(1, math.ceil(0.2 / round_s)))
    return {"rounds": rounds, "iterations": iterations, "warmup_rounds": min(warmup, 50)}
