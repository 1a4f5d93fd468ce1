"""Reads past the end of a kernel's heap buffers, which AddressSanitizer's -O1 build does not see when
only the optimizer introduces them (GCC 12's SLP vectorizer once made the attention core's transposed
micro-kernel load three rows past its scratch tile). With glibc told to return the top of the heap at
every free, such a read faults as soon as its buffer is the last one on the heap, so each case runs in
a subprocess, under the optimized build that ships, many times over.
"""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch, vitkernels
    torch.manual_seed(0)
    def run(fn, *shapes):
        for _ in range(12):
            xs = [torch.randn(*s, requires_grad=True) for s in shapes]
            out = fn(*xs)
            torch.autograd.grad(out, xs, torch.randn_like(out))
    ra = lambda q, k, v: torch.ops.vitk.reduced_attention(q, k, v, None)
    for nq, nk, d in [(600, 530, 4), (300, 130, 4), (257, 82, 8), (129, 33, 16)]:
        run(ra, (1, nq, 1, d), (1, nk, 1, d), (1, nk, 1, d))
    wa = lambda q, k, v: torch.ops.vitk.window_attention(q, k, v, [7, 7], [0, 0], None)
    run(wa, (1, 14, 14, 2, 4), (1, 14, 14, 2, 4), (1, 14, 14, 2, 4))
    pa = lambda q, k, v: torch.ops.vitk.polyline_attention(q, k, v, -torch.ones(1, 9, 11, 1), -torch.ones(1, 9, 11, 1))
    run(pa, (1, 9, 11, 1, 4), (1, 9, 11, 1, 4), (1, 9, 11, 1, 4))
    print("ok")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc tunables")
def test_no_kernel_reads_past_its_heap_buffers():
    env = {**os.environ, "VITK_BACKEND": "cpu", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"exit {proc.returncode} (a negative exit is the signal)\n{proc.stderr[-3000:]}")
