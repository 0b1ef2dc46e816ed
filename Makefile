# The two commands of the README:
#   make lab    installs everything into .venv and opens the course in JupyterLab
#   make test   installs everything into .venv and runs the whole test suite (unit tests and every notebook)
# VENV may point elsewhere (e.g. a cached environment): make test VENV=~/.cache/dc-venv
# LAB_ARGS passes options to JupyterLab, e.g. in a container: make lab LAB_ARGS="--ip=0.0.0.0 --no-browser"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LAB_ARGS ?=
# JupyterLab refuses to start as root (the usual user in a container) unless given --allow-root;
# it gets the flag only when the effective user id is 0, so a normal user's command stays as it was
ALLOW_ROOT := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root)

.PHONY: install lab test build clean

install:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]"

lab: install
	$(BIN)/python -m jupyter lab $(strip $(ALLOW_ROOT) $(LAB_ARGS) notebooks/)

test: install
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env tests notebooks

build: install
	$(BIN)/python -m diffusion_course build

clean:
	rm -rf $(VENV) .pytest_cache
