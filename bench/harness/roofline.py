"""This machine's roofline, measured once per run rather than taken from a spec sheet.

Bandwidth: a large tensor copy_ (far bigger than any cache), counted as 2 x bytes (read + write).
Peak FLOP/s: a large fp32 matmul through torch and, on CPU, through numpy's BLAS (often a different
library, e.g. OpenBLAS vs torch's MKL/oneDNN); the faster one is the ceiling, since a kernel could
in principle match it. Each is the best of a few repeats: a roof is a best case.
"""
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import torch


def _best_s(fn, reps: int, sync=lambda: None) -> float:
    fn()                                   # first touch of the pages, thread pool start-up
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _numpy_blas() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:                      # older numpy: no dict mode
        return "unknown"


def int8_peak() -> tuple:
    """(GOP/s, instructions) of int8_peak.c: the CPU's int8 dot-product peak with no memory traffic, AMX
    tiles where Linux grants them. torch._int_mm need not use every unit the CPU has (on AMX Xeons it
    runs at VNNI speed), so the integer GEMMs are also reported against this. (None, None) where no
    compiler is found."""
    src = os.path.join(os.path.dirname(__file__), "int8_peak.c")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "int8_peak")
        try:
            subprocess.run([cc, "-O2", "-march=native", "-fopenmp", src, "-o", exe], check=True,
                           capture_output=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
            gops, unit = subprocess.run([exe], check=True, capture_output=True, text=True, env=env).stdout.split()
        except (OSError, subprocess.CalledProcessError, ValueError):
            return None, None
    return (float(gops) or None), unit


def measure(device: str, quick: bool = False) -> dict:
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    reps = 2 if quick else 5
    out = {"device": device}

    copy_bytes = (1024 if cuda else 512) * 2**20
    src = torch.ones(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = _best_s(lambda: dst.copy_(src), reps, sync)
    out.update(copy_mib=copy_bytes // 2**20, bandwidth_gbs=2 * copy_bytes / t / 1e9)
    del src, dst

    n = 8192 if cuda else 4096
    flops = 2.0 * n ** 3
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    # The fp32 ceiling: TF32 would be a different (lower precision) roof.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ad, bd = a.to(device), b.to(device)
        t = _best_s(lambda: torch.mm(ad, bd), max(2, reps - 2), sync)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    out.update(sgemm_n=n, torch_sgemm_gflops=flops / t / 1e9)
    del ad, bd

    if cuda:
        out.update(numpy_sgemm_gflops=None, numpy_blas=None)   # host BLAS is no roof for a GPU
    else:
        an, bn = a.numpy(), b.numpy()
        t = _best_s(lambda: an @ bn, max(2, reps - 2))
        out.update(numpy_sgemm_gflops=flops / t / 1e9, numpy_blas=_numpy_blas())
    if not cuda:
        # The int8 ceiling: torch._int_mm (int8 x int8 -> int32, oneDNN's VNNI / AMX kernels) on a
        # large square problem, for the integer GEMMs' cases (Case.int8_roof).
        # Without VNNI (AVX2 only) torch falls back to plain loops that would take minutes at n, so a
        # probe at 1024 decides: the large size only when it would finish in seconds.
        n8 = 1024
        ai = torch.randint(-127, 128, (n8, n8), generator=gen, dtype=torch.int8)
        bi = torch.randint(-127, 128, (n8, n8), generator=gen, dtype=torch.int8)
        t = _best_s(lambda: torch._int_mm(ai, bi), 1)
        if t * (n / n8) ** 3 < 5.0:
            n8 = n
            ai = torch.randint(-127, 128, (n, n), generator=gen, dtype=torch.int8)
            bi = torch.randint(-127, 128, (n, n), generator=gen, dtype=torch.int8)
            t = _best_s(lambda: torch._int_mm(ai, bi), max(2, reps - 2))
        out.update(int8_gops=2.0 * n8 ** 3 / t / 1e9, int8_n=n8)
        del ai, bi
        out.update(zip(("int8_peak_gops", "int8_peak_unit"), int8_peak()))
    candidates = {"torch": out["torch_sgemm_gflops"], "numpy": out["numpy_sgemm_gflops"]}
    source = max((k for k, v in candidates.items() if v), key=lambda k: candidates[k])
    out.update(peak_gflops=candidates[source], peak_source=source)
    return out


def roof_seconds(flops: float, nbytes: float, roof: dict) -> tuple:
    """(the least time the roofline allows, "compute" or "memory": which roof binds)."""
    t_compute = flops / (roof["peak_gflops"] * 1e9)
    t_memory = nbytes / (roof["bandwidth_gbs"] * 1e9)
    return (t_compute, "compute") if t_compute >= t_memory else (t_memory, "memory")
