#!/usr/bin/env bash
# Compile-only check of every CUDA kernel translation unit, for machines without a GPU.
# The kernels in csrc/cuda/kernels/*.cu are torch-free by design (DESIGN.md, invariant 7), so
# nvcc alone can build them and catch errors long before a GPU is lent. Then the thin torch
# bindings (csrc/cuda/*.cpp) get a syntax-only host compile against the installed torch's headers,
# when that torch is importable: a CPU wheel ships them all but one generated header, which is
# stubbed, so a binding that would not build on a CUDA machine fails here too.
#
#   tools/nvcc_check.sh [file.cu ...]     default: csrc/cuda/kernels/*.cu
#   NVCC=...             compiler to use (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc)
#   VITK_NVCC_ARCH=...   target (default sm_90, the H100 we are lent)
#   VITK_NVCC_FLAGS=...  extra flags, e.g. "-Werror all-warnings"
set -u

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2

nvcc="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$nvcc" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  nvcc="$CUDA_HOME/bin/nvcc"
fi
if [ -z "$nvcc" ] || ! [ -x "$(command -v "$nvcc" 2>/dev/null || echo "$nvcc")" ]; then
  echo "nvcc not found: skipping"
  exit 0
fi

if [ $# -gt 0 ]; then
  files=("$@")
else
  shopt -s nullglob
  files=(csrc/cuda/kernels/*.cu)
  shopt -u nullglob
fi
if [ ${#files[@]} -eq 0 ]; then
  echo "no CUDA kernel files in csrc/cuda/kernels: nothing to check"
  exit 0
fi

arch="${VITK_NVCC_ARCH:-sm_90}"
# Word splitting of the extra flags is intended.
read -r -a extra <<< "${VITK_NVCC_FLAGS:-}"
# The flags the real build (setup.py through torch.utils.cpp_extension) compiles these files with,
# so code that only builds here does not fail there: torch's COMMON_NVCC_FLAGS turn off __half
# operators and conversions and allow constexpr host helpers in device code; setup.py adds the rest.
# -I csrc/include: kernels may share the torch-free helpers there (vitk/tiling.h).
build_flags=(
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
  -O3 --use_fast_math -lineinfo -DVITK_WITH_CUDA -Icsrc/include
)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "nvcc_check: $("$nvcc" --version | tail -n 1) -arch=$arch, ${#files[@]} file(s)"
failed=0
for f in "${files[@]}"; do
  start=$SECONDS
  if "$nvcc" -std=c++17 -arch="$arch" "${build_flags[@]}" "${extra[@]}" -c -o "$tmp/out.o" "$f" \
      >"$tmp/log" 2>&1; then
    status=ok
  else
    status=FAIL
    failed=$((failed + 1))
  fi
  printf '%-4s %s (%ds)\n' "$status" "$f" $((SECONDS - start))
  # Warnings are shown too, but only failures fail the check.
  if [ -s "$tmp/log" ]; then sed 's/^/     /' "$tmp/log"; fi
done

bindings=0
if [ $# -eq 0 ] && torch_inc="$(${PYTHON:-python3} -c \
    "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))" 2>/dev/null)"; then
  cuda_inc=""
  for d in "${CUDA_HOME:-/nonexistent}/include" "$(dirname "$(dirname "$(readlink -f "$nvcc")")")/include" \
      /usr/local/cuda/include; do
    if [ -f "$d/cuda_runtime_api.h" ]; then cuda_inc="$d"; break; fi
  done
  mkdir -p "$tmp/stub/c10/cuda/impl"
  echo "#pragma once" > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
  read -r -a torch_flags <<< "$torch_inc"
  shopt -s nullglob
  for f in csrc/cuda/*.cpp; do
    bindings=$((bindings + 1))
    if "${CXX:-c++}" -std=c++20 -fsyntax-only -DVITK_WITH_CUDA -Icsrc/include -Icsrc/cuda "${torch_flags[@]}" \
        -I"$tmp/stub" -I"$cuda_inc" "$f" >"$tmp/log" 2>&1; then
      status=ok
    else
      status=FAIL
      failed=$((failed + 1))
    fi
    printf '%-4s %s (host syntax check)\n' "$status" "$f"
    if [ -s "$tmp/log" ]; then sed 's/^/     /' "$tmp/log"; fi
  done
  shopt -u nullglob
fi

if [ $failed -gt 0 ]; then
  echo "nvcc_check: $failed of $(( ${#files[@]} + bindings )) file(s) failed"
  exit 1
fi
echo "nvcc_check: all ${#files[@]} kernel file(s) compiled, $bindings binding(s) checked"
