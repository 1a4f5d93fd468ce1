"""Backend choice: reporting, forcing, and the messages users see when something is missing."""
import os
import subprocess
import sys

import pytest
import torch

import vitkernels
from vitkernels import _lib, dispatch as vb


def test_backends_reports_every_op_and_reason(capsys):
    report = vitkernels.backends("cpu")
    out = capsys.readouterr().out
    for op in ("codebook_argmin", "codebook_lookup", "codebook_lookup_backward"):
        assert op in report and op in out
        assert report[op]["cpu"] == []                       # the C++ library always runs on CPU
    # The CUDA kernels cannot run on CPU tensors here, and the report says why.
    assert any("cpu tensors" in r for r in report["codebook_lookup"]["cuda"])
    if not torch.cuda.is_available():
        assert any("CUDA" in r for r in vitkernels.backends("cuda", print_table=False)["codebook_lookup"]["cuda"])


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


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    impl = next(i for i in vb._IMPLS["codebook_argmin"] if i.backend == "triton")
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
    impl = next(i for i in vb._IMPLS["codebook_argmin"] if i.backend == "cpu")
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
