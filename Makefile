# make demo | test | bench | build | clean. The first target run on a fresh machine
# creates .venv, installs torch (the local CPU build) and the rest, and builds _C.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUILD_STAMP := $(VENV)/.built
TORCH_PIN ?= torch==2.13.0
# The CUDA module is compiled (not run) wherever nvcc exists, as CI's compile check of the
# CUDA sources: a pip install builds it only where it can run (setup.py's AME_BUILD_CUDA=auto).
# `AME_BUILD_CUDA=0 make build` skips it. Exported: tests/test_cuda.py reads it too.
AME_BUILD_CUDA ?= $(if $(shell command -v nvcc 2>/dev/null),1,auto)
export AME_BUILD_CUDA
DEPS := numpy pybind11 safetensors pyyaml tqdm psutil hypothesis pytest pytest-benchmark \
        scikit-learn matplotlib triton setuptools wheel

.PHONY: demo test bench build clean repro

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) $(DEPS)
	touch $@

# The stamp gets the time the build started (a temporary stamp touched first, moved into
# place on success), so a source edited while a build runs is newer than it: the next
# `make build` rebuilds.
$(BUILD_STAMP): $(STAMP) CMakeLists.txt setup.py pyproject.toml $(shell find csrc python -type f 2>/dev/null)
	touch $@.tmp
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import ame_kernels as ak; print('ame_kernels built:', ak.build_info())"
	mv $@.tmp $@

build: $(BUILD_STAMP)

# The first pass runs the backend-generic tests (paper identities, stew, greedy, soups,
# properties) on the Triton kernels under the interpreter, which the second (whole-suite)
# pass skips on a CPU, and the Triton combine kernel's bitwise tests.
test: $(BUILD_STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider -k triton \
		tests/test_identities.py tests/test_stew.py tests/test_greedy.py tests/test_soups.py tests/test_properties.py \
		tests/test_triton_combine.py tests/test_methods.py tests/test_batch_mean.py
	$(PY) -m pytest -q -ra tests

demo: $(BUILD_STAMP)
	$(PY) -m ame_kernels.demo

bench: $(BUILD_STAMP)
	$(PY) benchmarks/run_all.py

repro: $(BUILD_STAMP)
	$(PY) benchmarks/repro/run_all.py

clean:
	rm -rf build *.egg-info ame_kernels/*.so $(BUILD_STAMP) $(BUILD_STAMP).tmp demo_out .pytest_cache
