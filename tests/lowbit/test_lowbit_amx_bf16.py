"""On a CPU with AMX bf16 tiles, int4_linear and shift_linear (from 4 rows on) run on them, x split into
bf16 parts whose sum is x exactly; VITK_LOWBIT_AMX=0 keeps the fp32 kernels. The two sum in different
orders, so they are compared with the float64 reference: the tile kernel's error must be of the fp32
kernels' size (a part dropped or rounded would make it 2^7 or more times larger), and rows the tiles
cannot take exactly (inf, NaN, |x| >= 2^126, a largest |x| below 2^-90) must come out as the fp32
kernels compute them. Shapes take every edge: ragged rows, channels and k, several row blocks (weights
decoded per task and once per call), several slices of k, 16 rows or fewer, every group size with
fractional zero points, bf16 and fp16 x (one and two parts)."""
import os
import subprocess
import sys

import pytest
import torch

from vitkernels._build_info import BUILD_INFO
from vitkernels import lowbit as pack
from vitkernels.reference import lowbit as ref

from test_lowbit_amx import _tiles_granted

pytestmark = pytest.mark.skipif(not (_tiles_granted() and "amx_bf16" in BUILD_INFO.get("cpu_isa", ())),
                                reason="no AMX bf16 tiles in this build or on this CPU")

# (1024: groups of 32-128 over two slices of k, one task's rows or rows shared over several tasks)
SHAPES = [(4, 3, 2), (5, 17, 18), (16, 33, 130), (17, 40, 64), (33, 70, 1000), (70, 33, 2500), (450, 20, 2500),
          (60, 40, 1024), (200, 40, 1024)]

SCRIPT = r"""
import sys, torch, vitkernels
from vitkernels import lowbit as pack
torch.manual_seed(0)
outs = []
for M, N, K in %(shapes)r:
    x = torch.randn(M, K)
    x = x + torch.randint(-2**10, 2**10, x.shape) * 2.0**-20     # low bits that only the later parts hold
    bias = torch.randn(N)
    for gs in [g for g in (32, 64, 128, K) if K %% g == 0]:
        for symmetric in (True, False):
            wp, sc, zero = pack.pack_int4(torch.randn(N, K), gs, symmetric)
            if zero is not None:
                zero = zero + 0.25
            outs.append(("int4", (x, wp, sc, zero, gs, bias, "gelu"),
                         torch.ops.vitk.int4_linear(x, wp, sc, zero, gs, bias, activation="gelu")))
    wp, sc = pack.pack_shift(torch.randn(N, K))
    outs.append(("shift", (x, wp, sc, bias, "relu"), torch.ops.vitk.shift_linear(x, wp, sc, bias, activation="relu")))
    outs.append(("shift", (x, wp, None, None, "none"), torch.ops.vitk.shift_linear(x, wp)))
    for dtype in (torch.bfloat16, torch.float16):
        xh = x.to(dtype)
        outs.append(("shift", (xh, wp, sc, bias, "none"), torch.ops.vitk.shift_linear(xh, wp, sc, bias)))
# Rows the tiles cannot take: non-finite, huge, tiny; among ordinary ones.
x = torch.randn(40, 96)
x[1, 3] = float("inf"); x[2, 5] = float("-inf"); x[3, 7] = float("nan"); x[4, 0] = 2.0**127
x[5] *= 2.0**-120; x[6] *= 2.0**-89
x[7] = 0
wp, sc = pack.pack_shift(torch.randn(24, 96))
outs.append(("shift", (x, wp, sc, None, "none"), torch.ops.vitk.shift_linear(x, wp, sc)))
wp, sc, zero = pack.pack_int4(torch.randn(24, 96), 32, False)
outs.append(("int4", (x, wp, sc, zero, 32, None, "none"), torch.ops.vitk.int4_linear(x, wp, sc, zero, 32)))
torch.save(outs, sys.argv[1])
"""


def _run(path, amx: bool):
    env = dict(os.environ, VITK_LOWBIT_AMX="1" if amx else "0")
    subprocess.run([sys.executable, "-c", SCRIPT % {"shapes": SHAPES}, str(path)], check=True, env=env, timeout=600)
    return torch.load(path)


def _reference(op, args):
    if op == "int4":
        return ref.int4_linear(*args)
    return ref.shift_linear(*args)


def test_tiles_match_the_fp32_kernels_accuracy(tmp_path):
    tiles = _run(tmp_path / "amx.pt", True)
    fp32 = _run(tmp_path / "fp32.pt", False)
    assert len(tiles) == len(fp32) > 0
    for i, ((op, args, a), (_, _, b)) in enumerate(zip(tiles, fp32)):
        assert a.dtype == b.dtype and a.shape == b.shape
        want = _reference(op, args)
        if not torch.isfinite(want).all():
            # Rows the fp32 kernels compute: NaN and inf where they put them, the rest close row by row
            # (relative to each row's size: one row is scaled by 2^-120, one reaches 2^127).
            assert torch.equal(a.isnan(), b.isnan()), f"output {i}: NaN pattern differs"
            assert torch.equal(a.isposinf(), b.isposinf()), f"output {i}: +inf pattern differs"
            assert torch.equal(a.isneginf(), b.isneginf()), f"output {i}: -inf pattern differs"
            fin = torch.isfinite(a)
            for r in range(a.shape[0]):
                if fin[r].any():
                    size = float(want[r][fin[r]].abs().max())
                    err = float((a[r][fin[r]].double() - want[r][fin[r]]).abs().max())
                    assert err <= 1e-5 * size, f"output {i}, row {r}: error {err:.3g} at size {size:.3g}"
            assert float(want[5].abs().max()) < 2.0**-90, "row 5 is meant to be one the tiles cannot take"
            continue
        err_tiles = float((a.double() - want).abs().max())
        err_fp32 = float((b.double() - want).abs().max())
        floor = 2.0**-24 * float(want.abs().max())
        if a.dtype != torch.float32:        # the output's rounding dominates both
            floor = 2.0**-7 * float(want.abs().max())
        assert err_tiles <= 4 * err_fp32 + 4 * floor, \
            f"output {i} ({op}, {tuple(a.shape)}, {a.dtype}): tiles {err_tiles:.3g} against fp32 kernels {err_fp32:.3g}"
