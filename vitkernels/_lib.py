"""Loads the compiled library vitkernels._C, after checking that it was built for this torch and CPU.

A missing or mismatched build is the most common first-run failure; both get a message that says how
to rebuild instead of an undefined-symbol error, an illegal instruction or an obscure
``torch.ops.vitk`` AttributeError later on.
"""
import importlib

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


def _check_build_info(info):
    built, running = info["torch_version"], torch.__version__
    if built.split("+")[0] != running.split("+")[0]:
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


def load():
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        raise ImportError(f"vitkernels' compiled library has not been built. {_REBUILD}") from None
    _check_build_info(BUILD_INFO)
    try:
        C = importlib.import_module("._C", __package__)
    except ImportError as e:
        raise ImportError(f"vitkernels' compiled library vitkernels._C could not be loaded ({e}). {_REBUILD}") from e
    if not hasattr(torch.ops.vitk, "codebook_argmin"):
        raise ImportError(f"vitkernels._C loaded but registered no torch.ops.vitk schemas. {_REBUILD}")
    return C, BUILD_INFO
