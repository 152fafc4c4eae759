# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTO_DIR := protos
PROTOS := $(wildcard $(PROTO_DIR)/yolostream/v1/*.proto)

.PHONY: venv test demo bench bench-tracking protos clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[server,onnx,dev]'
	touch $(STAMP)

# The import contracts (.importlinter) first: a front-end module importing torch fails the build at once.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m yolostream.server.demo

# BENCH_ARGS: --quick | --gpu (default: --gpu when torch sees CUDA, else --quick), --only, --out; see BENCHMARKS.md.
bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

# The tracker against supervision's ByteTrack on synthetic sequences (installs the bench extra; BENCHMARKS.md).
bench-tracking: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[server,onnx,dev,bench]'
	$(PY) bench/tracking_bench.py $(TRACKING_ARGS)

# Regenerate the committed stubs from the proto (tests fail when they are stale).
protos: $(STAMP)
	$(PY) -m yolostream.v1.regenerate

clean:
	rm -rf $(VENV) build dist .pytest_cache
