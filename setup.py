"""Build vitkernels: the C++ CPU library always, the CUDA sources when torch has CUDA and nvcc exists.

Environment:
  VITK_CPU_ARCH   native (default: vectorize for this machine's CPU), portable (x86-64-v2,
                  runs on any x86-64 from the last decade), or any value gcc's -march accepts.
  VITK_CUDA_ARCH  e.g. "9.0" or "8.0;9.0"; default: the visible GPU's compute capability.
  VITK_NO_CUDA=1  skip the CUDA sources even when they could be built.
  VITK_SANITIZE   e.g. "address,undefined": build the CPU library with those sanitizers (-O1 -g, asserts on, frame
                  pointers); `make sanitize` builds such a copy into build/sanitize, beside the real one.
  VITK_BUILD_INFO_DIR  where to write _build_info.py (default: the vitkernels package).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _torch():
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "vitkernels builds against the installed torch and must see it: install torch first "
            "(`pip install torch==2.13.0` on a CPU machine), then `pip install --no-build-isolation -e .`"
        )
    return torch, cpp_extension


def _march_flag():
    arch = os.environ.get("VITK_CPU_ARCH", "native").strip() or "native"
    if arch == "portable":
        arch = "x86-64-v2"
    return arch, [f"-march={arch}"]


def _isa_of(march_flags):
    """The instruction-set extensions a -march choice lets the compiler emit, read off gcc itself."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run(
            [cxx, *march_flags, "-dM", "-E", "-x", "c++", "-"],
            input="", capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    wanted = {"__AVX2__": "avx2", "__FMA__": "fma", "__AVX512F__": "avx512f",
              "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl", "__F16C__": "f16c",
              "__AVX512VNNI__": "avx512_vnni", "__AMX_TILE__": "amx_tile", "__AMX_INT8__": "amx_int8",
              "__AMX_BF16__": "amx_bf16", "__AVX512BF16__": "avx512_bf16", "__AVX512VBMI__": "avx512vbmi"}
    return sorted(v for k, v in wanted.items() if f"#define {k} " in out)


def _cuda_archs(torch):
    env = os.environ.get("VITK_CUDA_ARCH", "").strip()
    if env:
        return [a.strip() for a in env.replace(",", ";").split(";") if a.strip()]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return [f"{major}.{minor}"]
    return []


def main():
    torch, cpp_extension = _torch()
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import precompiled_header

    precompiled_header.install(cpp_extension, ROOT, torch.__version__)
    arch, march = _march_flag()
    isa = _isa_of(march)

    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    sanitize = os.environ.get("VITK_SANITIZE", "").strip()
    # Python's own CFLAGS carry -g: full debug info makes the kernels ~20% slower to compile and the
    # library ~5x larger. A sanitizer build keeps line tables (-g1) for its reports.
    opt = ["-O1", "-g1", "-UNDEBUG", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}",
           "-fno-sanitize-recover=all"] if sanitize else ["-O3", "-g0"]
    cxx_flags = [*opt, "-fopenmp", *march]
    sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp"))
        + glob.glob(os.path.join("csrc", "cpu", "**", "*.cpp"), recursive=True)
    )

    why_no_cuda = None
    nvcc = shutil.which("nvcc") or (
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None)
    if os.environ.get("VITK_NO_CUDA") == "1":
        why_no_cuda = "VITK_NO_CUDA=1"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is a CPU build"
    elif not nvcc or not os.path.exists(nvcc):
        why_no_cuda = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    archs = _cuda_archs(torch) if why_no_cuda is None else []
    if why_no_cuda is None and not archs:
        why_no_cuda = "no GPU visible and VITK_CUDA_ARCH not set"

    ext_kwargs = dict(
        name="vitkernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_link_args=["-fopenmp"] + ([f"-fsanitize={sanitize}"] if sanitize else []),
    )
    if why_no_cuda is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
        ext_kwargs["sources"] = sources + sorted(
            glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "kernels", "*.cu")))
        ext_kwargs["extra_compile_args"] = {
            "cxx": cxx_flags + ["-DVITK_WITH_CUDA"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DVITK_WITH_CUDA"],
        }
        ext = cpp_extension.CUDAExtension(**ext_kwargs)
    else:
        ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        ext = cpp_extension.CppExtension(**ext_kwargs)
    # The library has no Python module in it (Python loads it with torch.ops.load_library and reaches
    # its few C functions through ctypes), so it must not depend on libtorch_python, which needs a
    # Python interpreter: then a C++-only program links this very file (`make ctest` does).
    ext.libraries = [lib for lib in ext.libraries if lib != "torch_python"]

    info = {
        "torch_version": torch.__version__,
        "cpu_arch": arch,
        "cpu_isa": isa,
        "cuda": why_no_cuda is None,
        "cuda_archs": archs,
        "why_no_cuda": why_no_cuda,
    }
    info_dir = os.environ.get("VITK_BUILD_INFO_DIR") or os.path.join(ROOT, "vitkernels")
    os.makedirs(info_dir, exist_ok=True)
    with open(os.path.join(info_dir, "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time; checked at import.\n")
        f.write(f"BUILD_INFO = {info!r}\n")

    summary = [f"[vitkernels] CPU library: -march={arch} (ISA: {', '.join(isa) or 'baseline'}), OpenMP, "
               + (f"-O1 -fsanitize={sanitize}" if sanitize else "-O3")]
    if why_no_cuda is None:
        summary.append(f"[vitkernels] CUDA library: sm {', '.join(archs)} with {nvcc}")
    else:
        summary.append(f"[vitkernels] CUDA library: not built ({why_no_cuda})")
    print("\n".join(summary), flush=True)
    # pip hides a build's output unless run with -v; the Makefile prints this file after installing.
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    with open(os.path.join(ROOT, "build", "vitk-build-summary.txt"), "w") as f:
        f.write("\n".join(summary) + "\n")

    setup(
        name="vitkernels",
        version="0.1.0",
        description="Fused kernels for efficient vision transformers, as torch.ops.vitk custom ops",
        packages=find_packages(include=["vitkernels", "vitkernels.*"]),
        python_requires=">=3.10",
        install_requires=["torch>=2.11", "numpy"],
        extras_require={
            "triton": ["triton>=3.1"],
            # pytorch_wavelets is the spectral family's peer (tests compare against it, bench times it).
            "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "pytest-benchmark>=4", "pytorch-wavelets==1.3.0", "PyWavelets>=1.4"],
            "bench": ["pytest-benchmark>=4", "faiss-cpu>=1.8", "matplotlib>=3.7", "pytorch-wavelets==1.3.0",
                      "PyWavelets>=1.4"],
        },
        ext_modules=[ext],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
