# Two commands on a fresh machine with Python and pip: `make test` and `make bench`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU wheel on this kind of machine; on a CUDA machine install your torch first and it is kept.
TORCH_SPEC ?= torch==2.13.0
JOBS ?= 2
BUILD_STAMP := build/.vitk-installed
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py

.PHONY: deps install test pytest ctest nvcc-check bench clean

deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	@$(PYTHON) -c "import ninja, pybind11, setuptools, wheel" 2>/dev/null || $(PIP) install ninja pybind11 setuptools wheel
	@command -v cmake >/dev/null 2>&1 || $(PIP) install cmake

$(BUILD_STAMP): $(SOURCES) | deps
	MAX_JOBS=$(JOBS) $(PIP) install --no-build-isolation -e ".[test,triton]"
	@cat build/vitk-build-summary.txt
	@mkdir -p build && touch $@

install: deps $(BUILD_STAMP)

pytest: install
	TRITON_INTERPRET=1 $(PYTHON) -m pytest tests -q -p no:cacheprovider

ctest: install
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$$(command -v $(PYTHON))
	cmake --build build/cmake -j$(JOBS)
	ctest --test-dir build/cmake --output-on-failure

nvcc-check:
	bash tools/nvcc_check.sh

test: pytest ctest nvcc-check

bench: install
	@$(PYTHON) -c "import faiss, matplotlib, pytest_benchmark" 2>/dev/null || $(PIP) install "faiss-cpu>=1.8" "matplotlib>=3.7" "pytest-benchmark>=4"
	$(PYTHON) bench/run.py

clean:
	rm -rf build vitkernels/_C*.so vitkernels/_build_info.py *.egg-info
