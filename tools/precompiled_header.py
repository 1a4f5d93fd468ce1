"""Precompiles csrc/include/vitk/precompiled.h for the C++ files of one build (setup.py installs it).

torch's BuildExtension writes a ninja file from the final compiler flags; this wraps that step, so
the header is compiled with exactly the flags of the files that use it (-march, the sanitizers, the
defines), into the build's own temp directory, and each C++ file gets `-include` of it. GCC checks
that a precompiled header matches the file's flags and otherwise parses the header itself
(-Winvalid-pch says so), so a mismatch costs time, never correctness. The header is recompiled only
when its flags, its text or torch change, which keeps incremental builds incremental.
"""
import os
import shlex
import subprocess

HEADER = os.path.join("csrc", "include", "vitk", "precompiled.h")


def _gcc(cxx):
    """GCC itself (its precompiled headers are what this writes), read off the compiler's own macros."""
    try:
        macros = subprocess.run([cxx, "-dM", "-E", "-x", "c++", "-"], input="", capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return "#define __GNUC__ " in macros and "#define __clang__ " not in macros


def _write_if_changed(path, text):
    try:
        with open(path) as f:
            if f.read() == text:
                return False
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)
    return True


def _precompile(root, cflags, post_cflags, build_directory, torch_version):
    """The header's path to -include, or None (not GCC, or the compile failed: the build goes on without)."""
    cxx = os.environ.get("CXX", "c++")
    if not _gcc(cxx):
        return None
    pch_dir = os.path.join(build_directory, "precompiled")
    os.makedirs(pch_dir, exist_ok=True)
    header = os.path.join(pch_dir, "vitk_precompiled.h")
    gch = header + ".gch"
    with open(os.path.join(root, HEADER)) as f:
        text = f.read()
    # cflags and post_cflags are already shell-quoted for the ninja file, which runs them through sh.
    command = " ".join([shlex.quote(cxx), *cflags, "-x", "c++-header", shlex.quote(header), "-o", shlex.quote(gch),
                        *post_cflags])
    stamp = f"{torch_version}\n{command}\n"
    changed = _write_if_changed(header, text)
    changed |= _write_if_changed(os.path.join(pch_dir, "stamp"), stamp) or not os.path.exists(gch)
    if changed:
        print(f"[vitkernels] precompiling {HEADER}", flush=True)
        proc = subprocess.run(command, shell=True, capture_output=True, text=True)
        if proc.returncode != 0:
            os.remove(os.path.join(pch_dir, "stamp"))
            print(f"[vitkernels] precompiled header failed, building without it:\n{proc.stderr[-2000:]}", flush=True)
            return None
    return header


def install(cpp_extension, root, torch_version):
    """Wraps cpp_extension's ninja step (a private function: without it, the build simply goes on as is)."""
    write_and_compile = getattr(cpp_extension, "_write_ninja_file_and_compile_objects", None)
    if write_and_compile is None or getattr(write_and_compile, "_vitk_pch", False):
        return

    def with_precompiled_header(*args, **kwargs):
        # torch calls it with keywords only; any other call goes through untouched.
        if not args and {"cflags", "post_cflags", "build_directory"} <= kwargs.keys():
            header = _precompile(root, list(kwargs["cflags"]), list(kwargs["post_cflags"]), kwargs["build_directory"],
                                 torch_version)
            if header is not None:
                kwargs = {**kwargs, "cflags": [*kwargs["cflags"], "-Winvalid-pch", "-include", shlex.quote(header)]}
        return write_and_compile(*args, **kwargs)

    with_precompiled_header._vitk_pch = True
    cpp_extension._write_ninja_file_and_compile_objects = with_precompiled_header
