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

.PHONY: install lab test build clean site site-publish test-browser

install:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]"

lab: install
	$(BIN)/python -m jupyter lab $(strip $(ALLOW_ROOT) $(LAB_ARGS) notebooks/)

# The suite runs in TEST_WORKERS processes (pytest-xdist; each test file, and so each notebook, stays whole in
# one of them, and each keeps to one CPU thread), then the site's tests, whose build reuses the lessons the
# first run executed. TEST_WORKERS=0 runs everything in this one process, the site's tests last.
TEST_WORKERS ?= 2

test: install
ifeq ($(TEST_WORKERS),0)
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env tests notebooks
else
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env -n $(TEST_WORKERS) --dist loadfile \
		--ignore tests/test_site.py tests notebooks
	$(BIN)/python -m pytest tests/test_site.py
endif

build: install
	$(BIN)/python -m diffusion_course build

clean:
	rm -rf $(VENV) .pytest_cache

# The course's website (docs/building.md says more). `make site` builds it offline into build/site from the
# lessons executed in the quick mode, fails on any warning and then checks every link; `make site-publish`
# builds what GitHub Pages shows, from the lessons executed in PUBLISH_MODE (default, or gpu on a GPU
# machine). Executed lessons are kept in build/jupyter-cache, so a rebuild executes only what changed.
SITE_DIR ?= build/site
PUBLISH_MODE ?= default
SITE_BUILD = $(BIN)/python -m sphinx -W --keep-going -b html -d build/site-doctrees/$(1) docs $(SITE_DIR)

site: install
	DIFFUSION_COURSE_MODE=quick $(call SITE_BUILD,quick)
	$(BIN)/python docs/check_site.py $(SITE_DIR)

site-publish: install
	DIFFUSION_COURSE_MODE=$(PUBLISH_MODE) $(call SITE_BUILD,$(PUBLISH_MODE))
	$(BIN)/python docs/check_site.py $(SITE_DIR)

# The lessons with widgets, run in headless Chromium through JupyterLab (tests/browser/). Chromium comes from
# the system's packages (Playwright is told where it is and downloads no browser); screenshots go to
# build/browser/.
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser || command -v google-chrome)

test-browser: install
	@test -n "$(CHROMIUM)" || { echo "make test-browser needs Chromium, which is not installed."; \
	  echo "  Debian and Ubuntu: sudo apt-get install -y chromium   (chromium-browser on older Ubuntu)"; \
	  echo "  elsewhere: install Chromium or Chrome and run  make test-browser CHROMIUM=/path/to/the/binary"; \
	  exit 1; }
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev,browser]"
	COURSE_BROWSER_TEST=1 CHROMIUM="$(CHROMIUM)" $(BIN)/python -m pytest -v --durations=0 tests/browser
