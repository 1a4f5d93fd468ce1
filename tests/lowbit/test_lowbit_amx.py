"""On a CPU with AMX tiles, the integer GEMMs run on them; VITK_LOWBIT_AMX=0 keeps the vpdpbusd kernel.
The integer sums are exact on both and the epilogue is the same code, so the two give the same bits:
checked here by running both in subprocesses on the same inputs, over shapes that take every edge of
the tile kernels (ragged rows, channels and k, several k slices, several row blocks, bf16 outputs, int4
codes as the unsigned operand, and the few-row int4 kernel)."""
import ctypes
import os
import subprocess
import sys

import pytest
import torch

from vitkernels._build_info import BUILD_INFO


def _tiles_granted() -> bool:
    if "amx_int8" not in BUILD_INFO.get("cpu_isa", ()):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0          # arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)
    except (OSError, AttributeError):
        return False


pytestmark = pytest.mark.skipif(not _tiles_granted(), reason="no AMX tiles in this build or on this CPU")

SCRIPT = r"""
import sys, torch, vitkernels
from vitkernels import lowbit as pack
torch.manual_seed(0)
outs = []
for M, N, K in [(1, 3, 2), (9, 70, 1000), (16, 33, 130), (33, 17, 64), (45, 70, 1000), (70, 33, 2500),
                (450, 20, 2500), (97, 130, 130)]:
    x = torch.randn(M, K)
    x[0, 0] = 50.0
    wq, ws = pack.pack_int8(torch.randn(N, K))
    bias = torch.randn(N)
    for symmetric in (True, False):
        outs.append(torch.ops.vitk.dynamic_int8_linear(x, pack.block_int8(wq), ws, bias, activation="gelu",
                                                       symmetric=symmetric))
    q, s, z = torch.ops.vitk.quantize_per_token(x, symmetric=False)
    outs.append(torch.ops.vitk.int8_linear(q, s, z, wq, ws, None, activation="relu", out_dtype=torch.bfloat16))
    if K % 2 == 0:
        wp, sc, _ = pack.pack_int4(torch.randn(N, K), K, True)
        outs.append(torch.ops.vitk.int4_int8_linear(x, wp, sc.view(-1), bias, activation="gelu_tanh"))
torch.save(outs, sys.argv[1])
"""


def _run(path, amx: bool):
    env = dict(os.environ, VITK_LOWBIT_AMX="1" if amx else "0")
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], check=True, env=env, timeout=300)
    return torch.load(path)


def test_amx_and_vnni_give_the_same_bits(tmp_path):
    tiles = _run(tmp_path / "amx.pt", True)
    vnni = _run(tmp_path / "vnni.pt", False)
    assert len(tiles) == len(vnni) > 0
    for i, (a, b) in enumerate(zip(tiles, vnni)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), f"output {i} differs between the AMX and vpdpbusd kernels"
