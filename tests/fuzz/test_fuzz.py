"""Property-based fuzzing of every registered op (see worker.py for the rule it holds them to).

Each op is fuzzed in its own process with a timeout, so a crash (a signal) or a hang fails that op's
test and names the call it died in, instead of taking the whole run down. The default budget is small
for CI; ``pytest tests/fuzz --fuzz-long`` runs many more examples per op.
"""
import os
import subprocess
import sys

import pytest

import vitkernels
from vitkernels import dispatch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cases import STRATEGIES  # noqa: E402

OPS = sorted(dispatch._IMPLS)


@pytest.mark.parametrize("op", OPS)
def test_fuzz(op, request, tmp_path):
    assert op in STRATEGIES, f"{op}: no fuzz strategy; add one to tests/fuzz/cases.py"
    long = request.config.getoption("--fuzz-long")
    examples, timeout = (400, 3600) if long else (12, 300)
    log = tmp_path / "calls.log"
    seed = int(os.environ.get("VITK_FUZZ_SEED", "1234"))
    # The worker imports the same vitkernels as this process (an in-place build, the sanitizer copy).
    package_root = os.path.dirname(os.path.dirname(vitkernels.__file__))
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    try:
        proc = subprocess.run([sys.executable, os.path.join(HERE, "worker.py"), op, str(examples), str(seed), str(log)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{op}: hung (no result after {timeout} s) in the call\n{_last_call(log)}")
    if proc.returncode < 0:
        pytest.fail(f"{op}: crashed with signal {-proc.returncode} in the call\n{_last_call(log)}\n{proc.stderr[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{op}: a call broke the rule (hypothesis' minimal example below)\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-6000:]}")


def _last_call(log) -> str:
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return "(no call was logged)"
    return lines[-1] if lines else "(no call was logged)"
