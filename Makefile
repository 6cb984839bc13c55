# ClearSky: `make demo` sets up and serves the demo; `make test` sets up and runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
DATA ?= data/demo

.PHONY: setup demo demo-data serve test lint bench browser clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The masks extra brings torch (pinned to 2.13.0; a local CPU build here); pip, not uv, so
	# the pin is honoured.
	$(PY) -m pip install --quiet -e '.[dev,masks]'
	touch $@

static/node_modules/.installed: static/package.json static/package-lock.json
	cd static && npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(VENV)/.installed static/node_modules/.installed

demo-data: setup
	$(VENV)/bin/clearsky demo --data $(DATA)

demo: demo-data
	$(VENV)/bin/clearsky serve --host $(HOST) --port $(PORT) --data $(DATA)

serve: setup
	$(VENV)/bin/clearsky serve --host $(HOST) --port $(PORT) --data $(DATA)

# Browser tests drive Debian's Chromium (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing and not root: browser tests will skip"; fi; }

lint: setup
	$(VENV)/bin/ruff check compositor tileserver tests bench

test: setup browser lint
	$(VENV)/bin/pytest -q -ra

bench: setup
	$(PY) bench/percentile.py
	$(PY) bench/quality.py --data $(DATA)
	$(PY) bench/tiles.py
	$(PY) bench/masks.py
	$(PY) bench/prefetch.py
	$(PY) bench/export.py --data $(DATA)

clean:
	rm -rf $(VENV) static/node_modules data/demo
