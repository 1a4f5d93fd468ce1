# Two commands on a fresh machine with Python and pip: `make test` and `make bench`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU wheel on this kind of machine; on a CUDA machine install your torch first and it is kept.
TORCH_SPEC ?= torch==2.13.0
JOBS ?= 2
BUILD_STAMP := build/.vitk-installed
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py

SAN_DIR := build/sanitize
SANITIZERS ?= address,undefined
# The sanitizer runtimes go first: the interpreter itself is not instrumented, and libasan alone aborts
# in its __cxa_throw interceptor unless libstdc++ is preloaded beside it.
SAN_PRELOAD = $$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so) $$($(CXX) -print-file-name=libstdc++.so)
SAN_ENV = LD_PRELOAD="$(SAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 PYTHONPATH=$(CURDIR)/$(SAN_DIR)/lib TRITON_INTERPRET=1 \
	VITK_FUZZ_BACKENDS=cpu

.PHONY: deps install test pytest ctest nvcc-check sanitize portable avx2 bench clean

deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	@$(PYTHON) -c "import ninja, pybind11, setuptools, wheel" 2>/dev/null || $(PIP) install ninja pybind11 setuptools wheel
	@# What `make sanitize` needs when it runs without `make test` (which installs the test extra).
	@$(PYTHON) -c "import pytest, xdist, hypothesis" 2>/dev/null || $(PIP) install "pytest>=8" "pytest-xdist>=3" "hypothesis>=6"
	@command -v cmake >/dev/null 2>&1 || $(PIP) install cmake

$(BUILD_STAMP): $(SOURCES) | deps
	MAX_JOBS=$(JOBS) $(PIP) install --no-build-isolation -e ".[test,triton]"
	@cat build/vitk-build-summary.txt
	@mkdir -p build && touch $@

install: deps $(BUILD_STAMP)

# Most of the suite is single-threaded Python (the Triton interpreter), so it runs on JOBS workers; the
# thread-overlap test needs idle cores and runs alone afterwards.
pytest: install
	TRITON_INTERPRET=1 $(PYTHON) -m pytest tests -q -p no:cacheprovider -n $(JOBS) --durations=15 \
		--ignore=tests/test_threads.py
	TRITON_INTERPRET=1 $(PYTHON) -m pytest tests/test_threads.py -q -p no:cacheprovider

# The C++ tests link the installed library (the file Python loads), so only the tests compile here;
# plain `cmake -S . -B <dir>` builds the library from source instead.
ctest: install
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$$(command -v $(PYTHON)) \
		-DVITK_LIBRARY=$$($(PYTHON) -c "import vitkernels._lib as lib; print(lib.library_path())")
	cmake --build build/cmake -j$(JOBS)
	ctest --test-dir build/cmake --output-on-failure

nvcc-check:
	bash tools/nvcc_check.sh

test: pytest ctest nvcc-check

# An AddressSanitizer + UndefinedBehaviorSanitizer copy of the CPU library in build/sanitize (the
# installed one is untouched), then the tests that exercise the C++ kernels, and the fuzz test, on it.
sanitize: deps
	VITK_SANITIZE=$(SANITIZERS) VITK_NO_CUDA=1 VITK_BUILD_INFO_DIR=$(SAN_DIR)/lib/vitkernels MAX_JOBS=$(JOBS) \
		$(PYTHON) setup.py -q build_ext --build-lib $(SAN_DIR)/lib --build-temp $(SAN_DIR)/tmp
	$(PYTHON) -c "import shutil; shutil.copytree('vitkernels', '$(SAN_DIR)/lib/vitkernels', dirs_exist_ok=True, \
		ignore=shutil.ignore_patterns('_C*.so', '_build_info.py', '__pycache__'))"
	# From inside build/sanitize, so that the source tree's vitkernels (cwd) cannot shadow the copy.
	cd $(SAN_DIR) && $(SAN_ENV) $(PYTHON) -c "import vitkernels; assert '/$(SAN_DIR)/' in vitkernels.__file__, vitkernels.__file__"
	cd $(SAN_DIR) && $(SAN_ENV) $(PYTHON) -m pytest $(CURDIR)/tests -q -p no:cacheprovider -n $(JOBS) -k "not triton" --durations=20 \
		--ignore=$(CURDIR)/tests/export --ignore=$(CURDIR)/tests/test_memory.py --ignore=$(CURDIR)/tests/test_threads.py

# The CPU library built for an older ISA than this machine's, in build/<name> (the installed one is
# untouched), and the tests of the kernels with ISA-specific paths (VNNI, AVX-512 exp and row operations,
# AVX2 float rows, the vector-type FFTs) on it: $(call isa_tests,<dir>,<VITK_CPU_ARCH>,<gcc's -march name>).
define isa_tests
	VITK_CPU_ARCH=$(2) VITK_NO_CUDA=1 VITK_BUILD_INFO_DIR=$(1)/lib/vitkernels MAX_JOBS=$(JOBS) \
		$(PYTHON) setup.py -q build_ext --build-lib $(1)/lib --build-temp $(1)/tmp
	$(PYTHON) -c "import shutil; shutil.copytree('vitkernels', '$(1)/lib/vitkernels', dirs_exist_ok=True, \
		ignore=shutil.ignore_patterns('_C*.so', '_build_info.py', '__pycache__'))"
	# From inside the build folder, so that the source tree's vitkernels (cwd) cannot shadow the copy.
	cd $(1) && PYTHONPATH=$(CURDIR)/$(1)/lib TRITON_INTERPRET=1 $(PYTHON) -c \
		"import vitkernels; assert '/$(1)/' in vitkernels.__file__, vitkernels.__file__; \
		assert vitkernels.BUILD_INFO['cpu_arch'] == '$(3)', vitkernels.BUILD_INFO"
	cd $(1) && PYTHONPATH=$(CURDIR)/$(1)/lib TRITON_INTERPRET=1 $(PYTHON) -m pytest $(CURDIR)/tests/lowbit \
		$(CURDIR)/tests/quant_attention $(CURDIR)/tests/shiftadd $(CURDIR)/tests/window_attention/test_window_attention_nonfinite.py \
		$(CURDIR)/tests/masked_attention/test_masked_attention_nonfinite.py $(CURDIR)/tests/spectral/test_global_filter.py \
		-q -p no:cacheprovider -n $(JOBS) -k "not triton"
endef

# Portable (x86-64-v2: the plain-loop paths, for CPUs without AVX2) always; on an AVX-512 machine also
# AVX2 (haswell), whose paths the native build there does not compile.
portable: deps
	$(call isa_tests,build/portable,portable,x86-64-v2)
	@if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then $(MAKE) --no-print-directory avx2; fi

avx2: deps
	$(call isa_tests,build/avx2,haswell,haswell)

bench: install
	@$(PYTHON) -c "import faiss, matplotlib, pytest_benchmark, pywt, importlib.util as u; assert u.find_spec('pytorch_wavelets')" 2>/dev/null || \
		$(PIP) install "faiss-cpu>=1.8" "matplotlib>=3.7" "pytest-benchmark>=4" "pytorch-wavelets==1.3.0" "PyWavelets>=1.4"
	$(PYTHON) bench/run.py

clean:
	rm -rf build vitkernels/_C*.so vitkernels/_build_info.py *.egg-info
