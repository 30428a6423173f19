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

.PHONY: demo test install models bench clean help

help:
	@echo "make demo   - set up, fetch SmolLM2-135M, probe arithmetic at every layer"
	@echo "make test   - set up, fetch the test models, run the test suite"
	@echo "make bench  - speed benchmark (see bench/)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# llama-cpp-python compiles llama.cpp from source (about 10 minutes on 2 cores);
# pip caches the wheel, so later environments install it in seconds. lcprobe's
# own build (scikit-build-core + CMake) never rebuilds it.
$(STAMP): $(PY) pyproject.toml CMakeLists.txt $(wildcard native/*.c native/*.h)
	$(PY) -m pip install -q -e '.[test,plot]'
	@touch $@

install: $(STAMP)

models: install
	$(LCPROBE) models pull smollm2-135m
	$(LCPROBE) models pull gemma3-270m

demo: install
	$(LCPROBE) models pull smollm2-135m
	$(LCPROBE) run -m smollm2-135m -T calc --limit 60 -o results/demo

test: models
	LCPROBE_REQUIRE_MODELS=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(LCPROBE) models pull smollm2-135m
	$(PY) bench/speed.py

clean:
	rm -rf build results $(STAMP)
