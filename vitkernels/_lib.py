"""Loads the compiled library vitkernels/_C*.so, after checking that it was built for this torch and CPU.

The library holds no Python module: loading it (torch.ops.load_library) registers the torch.ops.vitk
ops, and its three C functions (csrc/c_api.cpp) are reached through ctypes. A C++ program links the
same file.

A missing or mismatched build is the most common first-run failure; both get a message that says how
to rebuild instead of an undefined-symbol error, an illegal instruction or an obscure
``torch.ops.vitk`` AttributeError later on.
"""
import ctypes
import importlib.machinery
import os

import torch

_REBUILD = "Build it from the source tree with `pip install --no-build-isolation -e .` (see README.md)."


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _other_torch(built: str) -> bool:
    """Built against another torch release than the one installed (local tags such as +cpu aside)."""
    return built.split("+")[0] != torch.__version__.split("+")[0]


def _check_build_info(info):
    built, running = info["torch_version"], torch.__version__
    if _other_torch(built):
        raise ImportError(
            f"vitkernels was built against torch {built} but torch {running} is installed; "
            f"the compiled library would not load cleanly. {_REBUILD}")
    if built != running and info.get("cuda") and torch.version.cuda is None:
        raise ImportError(
            f"vitkernels was built with CUDA kernels against torch {built}, but torch {running} has no CUDA. {_REBUILD}")
    flags = _cpu_flags()
    missing = sorted(set(info.get("cpu_isa", ())) - flags) if flags is not None else []
    if missing:
        raise ImportError(
            f"vitkernels was built for a CPU with {', '.join(missing)} (-march={info['cpu_arch']}), which this CPU lacks. "
            f"Rebuild on this machine, or build a portable library with VITK_CPU_ARCH=portable. {_REBUILD}")


class Library:
    """The loaded library: its path, and the forced-backend state the C++ kernels read on every call."""

    _INVALID = -2  # what the C functions return instead of throwing across the C boundary

    def __init__(self, path):
        self.__file__ = path
        self._dll = ctypes.CDLL(path)  # already loaded: this only takes a handle
        for name in ("vitk_set_thread_backend", "vitk_forced_backend"):
            getattr(self._dll, name).restype = ctypes.c_int
        self._dll.vitk_set_thread_backend.argtypes = [ctypes.c_int]
        self._dll.vitk_forced_backend.argtypes = []
        self._dll.vitk_torch_version.restype = ctypes.c_char_p

    def torch_version(self) -> str:
        return self._dll.vitk_torch_version().decode()

    def set_thread_backend(self, code: int) -> int:
        """Sets this thread's forced backend code (-1: none); returns the previous one."""
        prev = self._dll.vitk_set_thread_backend(code)
        if prev == self._INVALID:
            raise ValueError(f"code: expected -1..3, got {code}")
        return prev

    def forced_backend(self) -> int:
        """This thread's forced backend code (0: none), from use_backend or VITK_BACKEND."""
        code = self._dll.vitk_forced_backend()
        if code == self._INVALID:
            raise ValueError(f"VITK_BACKEND: expected one of cpu, cuda, triton, got {os.environ.get('VITK_BACKEND')!r}")
        return code


def library_path():
    """Where the compiled library is (None: not built)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_C" + suffix)
        if os.path.exists(path):
            return path
    return None


def load():
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        raise ImportError(f"vitkernels' compiled library has not been built. {_REBUILD}") from None
    _check_build_info(BUILD_INFO)
    path = library_path()
    if path is None:
        raise ImportError(f"vitkernels' compiled library (vitkernels/_C*.so) is missing. {_REBUILD}")
    try:
        torch.ops.load_library(path)
        C = Library(path)
    except (OSError, AttributeError) as e:
        raise ImportError(f"vitkernels' compiled library {path} could not be loaded ({e}). {_REBUILD}") from e
    if _other_torch(C.torch_version()):
        raise ImportError(f"vitkernels' compiled library {path} was built against torch {C.torch_version()} but torch "
                          f"{torch.__version__} is installed. {_REBUILD}")
    if not hasattr(torch.ops.vitk, "codebook_argmin"):
        raise ImportError(f"vitkernels' compiled library {path} loaded but registered no torch.ops.vitk schemas. "
                          f"{_REBUILD}")
    return C, BUILD_INFO
