"""Which machine the numbers came from: a short slug for file names and the facts for the JSON."""
import contextlib
import os
import platform
import re

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _slugify(text: str) -> str:
    text = re.sub(r"\((R|TM|tm|r)\)", "", text)
    text = re.sub(r"@.*$", "", text)                       # clock speed
    text = re.sub(r"\b(\d+-Core|CPU|Processor)\b", "", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_isa() -> str:
    """The widest vector ISA the CPU kernels build for here: hosts sold under one model name differ in it
    (this package's EPYC hosts came with AVX2 only and with AVX-512 VNNI; its Xeon with AMX tiles), and it
    changes every ratio."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "amx_int8" in flags:
        return "amx"
    if "avx512f" in flags:
        return "avx512vnni" if "avx512_vnni" in flags else "avx512"
    if "avx2" in flags:
        return "avx2"
    return platform.machine()


def slug(device: str) -> str:
    if device.startswith("cuda"):
        return "cuda-" + _slugify(torch.cuda.get_device_name(torch.device(device)))
    return f"cpu-{_slugify(_cpu_model())}-{cores()}c-{cpu_isa()}"


def info(device: str) -> dict:
    import numpy
    out = {
        "slug": slug(device),
        "device": device,
        "cpu": _cpu_model(),
        "cores": cores(),
        "isa": cpu_isa() if not device.startswith("cuda") else None,
        "torch_threads": torch.get_num_threads(),
        "mem_total_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        out.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda)
    return out


def cpu_snapshot():
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its children, wall)."""
    import time
    t = os.times()
    ours = t.user + t.system + t.children_user + t.children_system
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)          # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")      # without guest time (in user)
    except (OSError, ValueError, IndexError):
        busy = None
    return busy, ours, time.monotonic()


def others_share(start, end):
    """Fraction of all cores' time that other processes used between two cpu_snapshot()s."""
    if start is None or end is None or start[0] is None or end[0] is None:
        return None
    wall = end[2] - start[2]
    if wall <= 0:
        return None
    other = (end[0] - start[0]) - (end[1] - start[1])
    return round(min(1.0, max(0.0, other / (wall * cores()))), 3)


KEPT_BLOCKS = ("timed with glibc keeping freed blocks (mmap threshold 1 GiB, no trim), so no contender's "
               "timed calls pay first-touch page faults")


def _libc():
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def kept_blocks(device: str):
    """Around the timed calls: glibc's malloc serves large blocks from its heap and keeps them when
    freed, so every contender's outputs land on memory already mapped. By default a block above glibc's
    mmap ceiling (32 MiB) is mapped fresh at each allocation and its first touch faults once per 4 KiB
    page: a 38.5 MB output took 12 ms of faults on the 2-core EPYC, as long as the kernel writing it, and
    whether a call paid it depended on what earlier cases had left in the heap (the same contender timed
    12.5 ms in one run, 36 ms in the next). Afterwards the mmap threshold is set to glibc's own ceiling
    (32 MiB, now fixed rather than adaptive) and the kept memory is returned (malloc_trim), so the
    peak-memory call of the next contender sees its large buffers again.
    Yields the setting for the run's record, or None (not a CPU run, or not glibc)."""
    libc = _libc() if not device.startswith("cuda") else None
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if libc is None or libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) != 1:
        yield None
        return
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield KEPT_BLOCKS
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
        libc.malloc_trim(0)
