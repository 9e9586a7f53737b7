# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/lock.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

DEMO_DATA := runs/demo/data/stdlib

# qwen-tiny, 2 processes, TP=2, on the CPython standard library of this machine (tokenized once).
demo: $(STAMP)
	test -f $(DEMO_DATA).idx || $(PY) -m specialize data prepare \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" -o $(DEMO_DATA)
	rm -rf runs/demo/engine
	$(VENV)/bin/torchrun --nproc-per-node 2 -m specialize train configs/demo/engine.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) runs
