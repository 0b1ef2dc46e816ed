# The two commands of the README:
#   make lab    installs everything into .venv and opens the course in JupyterLab
#   make test   installs everything into .venv and runs the whole test suite (unit tests and every notebook)
# VENV may point elsewhere (e.g. a cached environment): make test VENV=~/.cache/dc-venv
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install lab test build clean

install:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]"

lab: install
	$(BIN)/python -m jupyter lab notebooks/

test: install
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env tests notebooks

build: install
	$(BIN)/python -m diffusion_course build

clean:
	rm -rf $(VENV) .pytest_cache
