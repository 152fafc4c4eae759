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
	# tests/test_node_decode.py decodes tensors in Node from the .proto alone; it skips, saying why, without npm.
	if command -v npm >/dev/null 2>&1; then npm ci --prefix tests/node --silent --no-audit --no-fund || \
		echo "npm ci --prefix tests/node failed: tests/test_node_decode.py will skip"; fi
	touch $(STAMP)

# The import contracts (.importlinter) first: a front-end module importing torch fails the build at once. Then the
# suite on two workers, a test module per worker at a time (module fixtures start servers once): most tests wait on
# server processes, so two workers finish in about two thirds of the serial time on 2 cores (README).
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n 2 --dist loadfile

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
