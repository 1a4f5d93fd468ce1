"""Backend choice: reporting, forcing, and the messages users see when something is missing."""
import os
import subprocess
import sys

import pytest
import torch

import vitkernels
from vitkernels import _lib, dispatch as vb


def test_backends_reports_every_op_and_reason():
    report = vitkernels.backends("cpu")
    table = repr(report)
    for op in ("codebook_argmin", "codebook_lookup", "codebook_lookup_backward"):
        assert op in report and op in table
        assert report[op]["cpu"] == []                       # the C++ library always runs on CPU
    # The CUDA kernels cannot run on CPU tensors here, and the report says why.
    assert any("cpu tensors" in r for r in report["codebook_lookup"]["cuda"])
    if not torch.cuda.is_available():
        assert any("CUDA" in r for r in vitkernels.backends("cuda")["codebook_lookup"]["cuda"])
    # Limits are part of the report's data and of its table.
    assert report.limits["window_attention_fwd"]["cpu"] == ["tokens per window <= 4096"]
    assert "tokens per window <= 4096" in table
    # The repr is the table, one line per op and backend: what a REPL echoes.
    assert table.count("\n") == 1 + sum(len(per) for per in report.values())


def test_default_kernels_are_registered_in_cpp():
    """The default CPU kernels reach the dispatcher from C++, so a C++-only process (AOTInductor) has
    them; Python registers only fakes, autograd and the routers of non-default backends."""
    for op in sorted({i.op for ops in (vb.impls(o) for o in vb._IMPLS) for i in ops}):
        dump = torch._C._dispatch_dump(f"vitk::{op}")
        cpu = next(line for line in dump.splitlines() if line.startswith("CPU:"))
        assert "/csrc/cpu/" in cpu and "library.py" not in cpu, (op, cpu)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vitk_route::{op}", "CompositeExplicitAutograd")


def test_use_backend_forces_and_explains():
    z, cb = torch.randn(4, 3), torch.randn(5, 3)
    with vitkernels.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=r"backend 'cuda' was forced"):
            torch.ops.vitk.codebook_argmin(z, cb)          # argmin has no CUDA C++ backend at all
        with pytest.raises(RuntimeError, match=r"cannot run here: .*cpu tensors"):
            torch.ops.vitk.codebook_lookup(torch.tensor([1]), cb)
    with pytest.raises(ValueError, match="name"):
        with vitkernels.use_backend("tpu"):
            pass
    # Nested blocks restore the outer choice.
    with vitkernels.use_backend("cpu"):
        with vitkernels.use_backend(None):
            assert vb.forced_backend() in (None, os.environ.get("VITK_BACKEND"))
        assert vb.forced_backend() == "cpu"


def test_forcing_is_per_thread():
    """use_backend forces the calling thread only: a server thread is not redirected by another's block."""
    import threading
    seen = {}
    with vitkernels.use_backend("cuda"):
        t = threading.Thread(target=lambda: seen.update(other=vb.forced_backend()))
        t.start()
        t.join()
        seen["mine"] = vb.forced_backend()
    assert seen == {"other": os.environ.get("VITK_BACKEND") or None, "mine": "cuda"}


def test_limits_are_declared_and_enforced_alike(monkeypatch):
    """The CPU window limit declared in Python is the one the C++ kernel enforces: the largest window
    runs, one token more goes to another backend or raises an error naming the limit and the backend."""
    from vitkernels.ops.window_attention import MAX_CPU_WINDOW_TOKENS
    assert MAX_CPU_WINDOW_TOKENS == 4096
    q = torch.randn(1, 2, 3, 1, 4)
    out = torch.ops.vitk.window_attention(q, q, q, [64, 64])      # 4096 tokens: the C++ kernel runs it
    assert torch.isfinite(out).all()
    monkeypatch.setenv("TRITON_INTERPRET", "0")                   # no other backend on this CPU
    with pytest.raises(ValueError, match=r"cpu: exceeds its limit of 4096 tokens per window \(got 4160\)"):
        torch.ops.vitk.window_attention(q, q, q, [64, 65])
    with vitkernels.use_backend("cpu"):
        with pytest.raises(ValueError, match=r"backend 'cpu' was forced but cannot run here: exceeds its limit"):
            torch.ops.vitk.window_attention(q, q, q, [65, 64])


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    impl = next(i for i in vb.impls("codebook_argmin") if i.backend == "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("TRITON_INTERPRET=1" in r or "not installed" in r for r in vb.why_not(impl, "cpu"))


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("VITK_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="forced"):
        torch.ops.vitk.codebook_lookup(torch.tensor([0]), torch.randn(2, 2))
    monkeypatch.setenv("VITK_BACKEND", "gpu")
    with pytest.raises(ValueError, match="VITK_BACKEND"):
        torch.ops.vitk.codebook_lookup(torch.tensor([0]), torch.randn(2, 2))


def test_dtype_capability_is_declared():
    impl = next(i for i in vb.impls("codebook_argmin") if i.backend == "cpu")
    assert any("float64" in r for r in vb.why_not(impl, "cpu", torch.float64))


def test_mismatched_build_gets_a_rebuild_message():
    info = dict(vitkernels.BUILD_INFO, torch_version="1.0.0")
    with pytest.raises(ImportError, match="no-build-isolation"):
        _lib._check_build_info(info)
    info = dict(vitkernels.BUILD_INFO, cpu_isa=["an_isa_no_cpu_has"])
    with pytest.raises(ImportError, match="VITK_CPU_ARCH=portable"):
        _lib._check_build_info(info)


def test_missing_library_gets_a_build_message(tmp_path):
    # A copy of the Python package without the compiled library, imported in a fresh interpreter.
    import shutil
    src = os.path.dirname(vitkernels.__file__)
    # Under another name, so the installed (editable) package cannot shadow the copy.
    dst = tmp_path / "vitkernels_unbuilt"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_C*.so", "_build_info.py", "__pycache__"))
    proc = subprocess.run([sys.executable, "-c", "import vitkernels_unbuilt"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode != 0
    assert "pip install --no-build-isolation -e ." in proc.stderr
    assert "AttributeError" not in proc.stderr
