"""Every "linear memory" promise, measured: the peak memory one call adds (forward, and forward plus
backward) grows with the problem size, not with its square. Each case runs at two sizes four times
apart in tokens (or codes); a quadratic intermediate would grow ~16x, a linear footprint ~4x, and the
test fails above 4.5x. Measured in a fresh subprocess per case (peak RSS growth via VmHWM, every
buffer of 4 KiB or more mapped on allocation and unmapped on free), with
head dims kept small so that any N x N term is not hidden behind the O(N d) inputs and outputs.
"""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import gc, sys, torch, vitkernels
    backward = sys.argv[1] == "1"
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    def growth(size):
        torch.manual_seed(0)
        {setup}
        def call():
            {call}
        call()                               # warm-up: lazy initialization is not the op's footprint
        leaves = [t for t in inputs if t.requires_grad]
        for t in leaves:
            t.grad = None
        gc.collect()
        open("/proc/self/clear_refs", "w").write("5")
        base = rss("VmRSS")
        call()
        return rss("VmHWM") - base
    # One process for both sizes (the import is most of a small case's time): each size's buffers are
    # unmapped when it returns, and the peak is reset before each measured call.
    for size in sys.argv[2:]:
        print(growth(int(size)))
""")

# name: (setup with `size`, defining `inputs`; the call; (small, large) sizes, 4x apart in tokens or codes,
# or such pairs keyed by "fwd" and "fwd+bwd").
# Sizes keep the linear footprint at the smaller size around a MiB or more, so that the ratio compares
# real buffers, not allocator noise.
IMG = "(torch.randn(1, size, size, 1, 32, requires_grad=backward) for _ in range(3))"
# The decay-masked forms' backward has per-key-tile partials (N^2 / 256 floats when quadratic): small head
# dims keep the O(N d) buffers from hiding them.
IMG4 = IMG.replace("32", "4")
DECAYS = "(-torch.rand(1, size, size, 1)).requires_grad_(backward)"
CASES = {
    "codebook_argmin": (
        "z = torch.randn(4096, 4); cb = torch.randn(size, 4); inputs = []",
        "torch.ops.vitk.codebook_argmin(z, cb)", (200_000, 800_000)),
    "window_attention": (
        f"q, k, v = {IMG}; bias = torch.randn(13 * 13, 1, requires_grad=backward); inputs = [q, k, v, bias]",
        "o = torch.ops.vitk.window_attention(q, k, v, [7, 7], [3, 3], bias); o.sum().backward() if backward else None",
        (224, 448)),
    "polyline_attention": (
        f"q, k, v = {IMG4}; la, lb = {DECAYS}, {DECAYS}; inputs = [q, k, v, la, lb]",
        "o = torch.ops.vitk.polyline_attention(q, k, v, la, lb); o.sum().backward() if backward else None",
        # The forward alone keeps ~1.7 MiB at 64 x 64, within reach of the ~0.1 MiB run-to-run noise.
        {"fwd": (80, 160), "fwd+bwd": (64, 128)}),
    "axial_decay_attention": (
        f"q, k, v = {IMG}; la, lb = {DECAYS}, {DECAYS}; inputs = [q, k, v, la, lb]",
        "o = torch.ops.vitk.axial_decay_attention(q, k, v, la, lb); o.sum().backward() if backward else None",
        (192, 384)),
    "gaussian_mask_attention": (
        f"q, k, v = {IMG}; w, s = (torch.rand(1, 3).requires_grad_(backward) for _ in range(2)); inputs = [q, k, v, w, s]",
        "o = torch.ops.vitk.gaussian_mask_attention(q, k, v, w, s); o.sum().backward() if backward else None",
        {"fwd": (96, 192), "fwd+bwd": (64, 128)}),
    "reduced_attention": (
        "q = torch.randn(1, size * size, 1, 32, requires_grad=backward); k, v = (torch.randn(1, 49, 1, 32, "
        "requires_grad=backward) for _ in range(2)); inputs = [q, k, v]",
        "o = torch.ops.vitk.reduced_attention(q, k, v); o.sum().backward() if backward else None",
        (224, 448)),
    "varlen_attention": (
        "q, k, v = (torch.randn(size * size, 1, 32, requires_grad=backward) for _ in range(3)); inputs = [q, k, v]"
        "; cu = torch.tensor([0, size * size // 2, size * size], dtype=torch.int32)",
        "o = torch.ops.vitk.varlen_attention(q, k, v, cu, size * size); o.sum().backward() if backward else None",
        {"fwd": (96, 192), "fwd+bwd": (64, 128)}),
}


def _peak_bytes(name: str, sizes, backward: bool):
    setup, call, _ = CASES[name]
    code = SCRIPT.format(setup=setup, call=call)
    # A fixed mmap threshold (no dynamic raise, no trim delay): every buffer of 4 KiB or more is
    # mapped when allocated and unmapped when freed, so peak RSS growth sees each live buffer.
    env = {**os.environ, "VITK_BACKEND": "", "MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "4096"}
    proc = subprocess.run([sys.executable, "-c", code, "1" if backward else "0", *map(str, sizes)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [int(line) for line in proc.stdout.strip().splitlines()[-len(sizes):]]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_memory_grows_linearly(name, backward):
    if name == "codebook_argmin" and backward:
        pytest.skip("codebook_argmin has no gradient")
    sizes = CASES[name][2]
    small, large = sizes["fwd+bwd" if backward else "fwd"] if isinstance(sizes, dict) else sizes
    # Token (or code) counts four times apart: the side of an image doubles.
    growth_small, growth_large = _peak_bytes(name, (small, large), backward)
    ratio = growth_large / max(growth_small, 1)
    print(f"{name} {'fwd+bwd' if backward else 'fwd'}: {growth_small / 2**20:.2f} -> {growth_large / 2**20:.2f} MiB ({ratio:.2f}x)")
    assert ratio <= 4.5, (f"{name} ({'fwd+bwd' if backward else 'fwd'}): peak memory grew {ratio:.1f}x for 4x the "
                          f"tokens ({growth_small / 2**20:.1f} MiB -> {growth_large / 2**20:.1f} MiB)")
