"""State shared by all benchmark items of one pytest session: the settings, the measured roofline,
the inputs of the case being run, and the records that the report is rendered from."""
import gc
import os
import sys
import time

import torch

from . import machine, roofline


def _vitkernels_info():
    """Which build was benchmarked (an editable install can point at another checkout)."""
    vk = sys.modules.get("vitkernels")
    if vk is None:
        return None
    return {"version": getattr(vk, "__version__", None), "path": os.path.dirname(vk.__file__),
            "library": getattr(getattr(vk, "_C", None), "__file__", None),
            "build": getattr(vk, "BUILD_INFO", None)}


class Collector:
    """The records of one session. bench/run.py passes its own instance to pytest.main(plugins=...)
    so that it can read the results after pytest.main() returns."""

    def __init__(self):
        self.records = []
        self.roofline = None
        self.machine = None
        self.quick = False
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.external = False       # True: the owner renders the table, conftest stays quiet
        self.cpu_start = self.cpu_end = None     # machine.cpu_snapshot() around the run
        self.allocator = None                    # machine.kept_blocks()'s setting, once a call is timed

    def run_info(self) -> dict:
        """What the JSON keeps about the run a case was measured in."""
        m = self.machine or {}
        return {"torch": m.get("torch"), "torch_threads": m.get("torch_threads"), "quick": self.quick,
                "vitkernels": _vitkernels_info(), "roofline": self.roofline,
                "others_cpu_share": self.others_share(), "allocator": self.allocator}

    def others_share(self):
        if self.cpu_end is None:
            self.cpu_end = machine.cpu_snapshot()
        return machine.others_share(self.cpu_start, self.cpu_end)

    def busy_warning(self):
        """A line when other processes competed for the cores during the run, else None."""
        share = self.others_share()
        if share is not None and share > 0.05:
            return (f"warning: other processes used {share:.0%} of this machine's CPU time during the run: "
                    "they slowed the contenders and the roofline measurement unevenly, so speedups and "
                    "roofline fractions are unreliable; rerun on an idle machine for numbers to keep")
        return None


class BenchSession:
    MEMORY_HEADROOM = 0.85      # of what is available: leave room for the interpreter and the OS

    def __init__(self, collector: Collector, device: str, quick: bool):
        self.collector = collector
        self.device = device
        self.quick = quick
        collector.quick = quick
        collector.machine = machine.info(device)
        collector.cpu_start = machine.cpu_snapshot()
        self._inputs_key = None
        self._inputs = None

    @property
    def roofline(self) -> dict:
        if self.collector.roofline is None:
            self.collector.roofline = roofline.measure(self.device, self.quick)
        return self.collector.roofline

    def inputs(self, family, case):
        """(inputs, cache) of `case`, created once with the case's seed; the previous case's are freed
        first so that only one case's tensors are ever alive."""
        key = (family.name, case.name)
        if key != self._inputs_key:
            self._inputs_key = self._inputs = None
            gc.collect()
            gen = torch.Generator().manual_seed(case.seed)
            tensors = family.make_inputs(case, gen)
            tensors = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
            self._inputs_key, self._inputs = key, (tensors, {})
        return self._inputs

    def add(self, record: dict) -> None:
        self.collector.records.append(record)
