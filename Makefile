# Two commands do everything on a fresh machine:
#   make demo   environment + build + default model + the default probe
#   make test   environment + build + models + the test suite
# Both are idempotent: a second run only re-installs what changed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LCPROBE := $(VENV)/bin/lcprobe
STAMP  := $(VENV)/.lcprobe-installed

# The paper's data files, when this checkout sits next to them.
SHARED_DATA := $(abspath ../shared/data/llama_analysis)
ifneq ($(wildcard $(SHARED_DATA)/gsm8k_cal_mc.json),)
export LCPROBE_DATA ?= $(SHARED_DATA)
endif

PYTEST_ARGS ?=

.PHONY: demo test install models data bench clean help llama-rpc

help:
	@echo "make demo   - set up, fetch SmolLM2-135M, probe capital cities at every layer, draw the figure"
	@echo "make test   - set up, fetch the test models, run the test suite"
	@echo "make bench  - speed benchmark (see bench/)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# llama-cpp-python with llama.cpp's RPC backend (GGML_RPC: lcprobe rpc-server, --rpc),
# compiled once from source (15-20 minutes on 2 cores) into a wheel kept outside the
# checkout, then installed from that directory only. Not through pip's wheel cache:
# it does not key on CMAKE_ARGS, so a cached CPU-only wheel would be reused silently.
# A second run finds libggml-rpc installed and does nothing. For a GPU build with
# RPC, build the wheel yourself with CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on".
LLAMA_CPP_PYTHON := 0.3.36
RPC_WHEELS ?= $(HOME)/.cache/lcprobe/wheels/rpc
RPC_LIB = $(wildcard $(VENV)/lib/python*/site-packages/llama_cpp/lib/*ggml-rpc*)
HAS_RPC_WHEEL = $(PY) -c "import glob, sys, zipfile; sys.exit(not any(any('ggml-rpc' in n for n in zipfile.ZipFile(w).namelist()) for w in glob.glob('$(RPC_WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl')))"

llama-rpc: $(PY)
ifeq ($(RPC_LIB),)
	@$(HAS_RPC_WHEEL) || { mkdir -p $(RPC_WHEELS) && \
	  CMAKE_ARGS="-DGGML_RPC=on $(CMAKE_ARGS)" $(PY) -m pip wheel --no-deps --no-cache-dir \
	    --no-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_PYTHON) -w $(RPC_WHEELS); }
	@$(HAS_RPC_WHEEL) || { echo "no llama-cpp-python $(LLAMA_CPP_PYTHON) wheel with libggml-rpc in $(RPC_WHEELS)"; exit 1; }
	$(PY) -m pip install -q --force-reinstall --no-deps --no-index --find-links $(RPC_WHEELS) \
	  llama-cpp-python==$(LLAMA_CPP_PYTHON)
	@ls $(VENV)/lib/python*/site-packages/llama_cpp/lib/*ggml-rpc* >/dev/null || \
	  { echo "the installed llama-cpp-python has no libggml-rpc"; exit 1; }
endif

# llama-cpp-python compiles llama.cpp from source (about 10 minutes on 2 cores);
# pip caches the wheel, so later environments install it in seconds. lcprobe's
# own build (scikit-build-core + CMake) never rebuilds it. The editable install
# maps each module to its file, so adding, moving or removing a module (a
# package directory's mtime changes) installs again.
PKG_DIRS := $(shell find lcprobe -type d -not -name __pycache__)
$(STAMP): $(PY) pyproject.toml CMakeLists.txt $(wildcard native/*.c native/*.h) $(PKG_DIRS) | llama-rpc
	$(PY) -m pip install -q -e '.[test,plot]'
	@touch $@

install: $(STAMP)

models: install
	$(LCPROBE) models pull smollm2-135m
	$(LCPROBE) models pull gemma3-270m

# The demo task: 125 capital cities, 4 choices each. Near chance for the first
# 23 layers of SmolLM2-135M, then the answer emerges (0.98 at layer 30).
demo: install
	$(LCPROBE) models pull smollm2-135m
	$(LCPROBE) run -m smollm2-135m -T capitals -o results/demo
	$(LCPROBE) report results/demo

# The paper's data files: beside the checkout (../shared), else pulled into
# lcprobe's cache (sha256-checked), where the tasks and the tests look too.
data: install
	@if [ -z "$$LCPROBE_DATA" ]; then $(LCPROBE) data pull; fi

# LCPROBE_REQUIRE_MODELS=1: a missing model or data file fails its tests instead of skipping them.
test: models data
	LCPROBE_REQUIRE_MODELS=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(LCPROBE) models pull smollm2-135m
	$(PY) bench/speed.py

clean:
	rm -rf build results $(STAMP)
