"""Peak memory of one call, and how much memory a call may use before it is skipped.

CPU: peak RSS growth, measured outside machine.kept_blocks (which times with freed blocks kept).
Writing "5" to /proc/self/clear_refs resets VmHWM (the RSS high-water mark) to the current RSS, so
VmHWM after the call minus VmRSS before it is what the call added. Memory the allocator already holds
from earlier calls is reused without growing RSS, so small temporaries can be under-counted; large
buffers (glibc mmaps anything over 32 MiB and unmaps it on free) are not.
CUDA: the caching allocator's own peak counter, which is exact for torch allocations.
"""
import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib(fn, device: str):
    """Run fn() once; return (its output, MiB it allocated at peak above the baseline or None)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        if not _reset_hwm():
            return fn(), None
        base = _status_kib("VmRSS")
        out = fn()
        return out, max(0, _status_kib("VmHWM") - base) / 1024
    except (OSError, KeyError):          # no procfs (not Linux): run it, report nothing
        return fn(), None


def available_bytes(device: str) -> float:
    """Memory a call may still take: free device memory on CUDA, MemAvailable on CPU."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float("inf")


class guard:
    """Context manager: on Linux CPU runs, cap this process's address space at its current size plus
    what the machine has available, so that a contender allocating far more than its declared
    estimate gets an allocation error (recorded as its failure) instead of summoning the OOM killer
    on the whole run. The previous limit is restored on exit."""

    HEADROOM = 0.9

    def __init__(self, device: str):
        self.device = device
        self.saved = None

    def __enter__(self):
        if self.device.startswith("cuda"):
            return self
        try:
            import resource
            size = _status_kib("VmSize") * 1024
            cap = int(size + available_bytes(self.device) * self.HEADROOM)
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard == resource.RLIM_INFINITY or cap < hard:
                resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
                self.saved = (soft, hard)
        except (ImportError, OSError, KeyError, ValueError):
            pass
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_AS, self.saved)
        return False
