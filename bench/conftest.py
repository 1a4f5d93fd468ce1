"""pytest glue for the bench/<family>.py files: options, the session fixture, and the results table.

`pytest bench/codebook.py` works on its own (prints our table next to pytest-benchmark's); bench/run.py
runs the same items, prints only our table and writes bench/results/.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # `import harness`, however invoked

from harness import machine, report  # noqa: E402
from harness.session import BenchSession, Collector  # noqa: E402

_COLLECTOR = pytest.StashKey()


def pytest_addoption(parser):
    group = parser.getgroup("vitk-bench", "vitkernels benchmarks")
    group.addoption("--vitk-device", default="cpu", help="device to benchmark on: cpu (default), cuda, cuda:1")
    group.addoption("--vitk-quick", action="store_true", help="few rounds: a smoke run, not a measurement")


def pytest_configure(config):
    # All cores, for every contender alike (faiss sets its own OpenMP pool from the same count).
    torch.set_num_threads(machine.cores())
    # bench/run.py passes its Collector through pytest.main(plugins=[...]) to read the results back.
    given = [p for p in config.pluginmanager.get_plugins() if isinstance(p, Collector)]
    config.stash[_COLLECTOR] = given[0] if given else Collector()


@pytest.fixture(scope="session")
def bench_session(pytestconfig):
    device = pytestconfig.getoption("vitk_device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--vitk-device cuda: no CUDA device here")
    return BenchSession(pytestconfig.stash[_COLLECTOR], device, pytestconfig.getoption("vitk_quick"))


def pytest_terminal_summary(terminalreporter, config):
    collector = config.stash.get(_COLLECTOR, None)
    # Under bench/run.py the runner prints (and saves) the table itself.
    if collector is None or not collector.records or collector.external:
        return
    terminalreporter.write_sep("=", "vitkernels benchmarks")
    terminalreporter.write_line(report.roofline_line(collector.roofline))
    terminalreporter.write_line(report.table(report.results(collector.records, collector.roofline, collector.started)))
    if collector.busy_warning():
        terminalreporter.write_line(collector.busy_warning())
