"""Two Python threads serving two requests (an inference server's layout) run their kernels at the
same time: torch.ops.vitk.* release the GIL around the C++ kernels."""
import threading
import time

import pytest
import torch

import vitkernels  # noqa: F401


def _timed(fn, threads: int) -> float:
    barrier = threading.Barrier(threads + 1)

    def worker():
        barrier.wait()
        fn()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    return time.perf_counter() - start


@pytest.mark.parametrize("grad_mode", ["inference", "grad"])
def test_two_threads_overlap(grad_mode):
    if torch.get_num_threads() < 2 and len(__import__("os").sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    q = torch.randn(16, 56, 56, 4, 32, requires_grad=grad_mode == "grad")

    def call():
        ctx = torch.inference_mode() if grad_mode == "inference" else torch.enable_grad()
        with ctx:
            torch.ops.vitk.window_attention(q, q, q, [7, 7], [3, 3])

    prev = torch.get_num_threads()
    torch.set_num_threads(1)                       # one core per request
    try:
        call()
        one = min(_timed(call, 1) for _ in range(3))
        assert one > 0.02, f"the op takes {one * 1e3:.0f} ms: too short to measure overlap"
        two = min(_timed(call, 2) for _ in range(3))
    finally:
        torch.set_num_threads(prev)
    # Serialized by a held GIL, two calls take twice as long as one; overlapped, about as long.
    assert two < 1.5 * one, f"two concurrent calls took {two * 1e3:.0f} ms against {one * 1e3:.0f} ms for one"
