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

DEMO_DATA := runs/demo/data/code

# qwen-tiny on 2 CPU processes (TP=2): the engine demo pretrains it briefly on the CPython standard
# library of this machine, then the Code-Qwen CPT recipe continues it on the same corpus with the
# paper's schedule and reports validation loss on held-out files against its starting checkpoint.
# `data prepare` is resumable and a no-op once finished, so the corpus is tokenized once.
demo: $(STAMP)
	$(PY) -m specialize data prepare \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
		-o $(DEMO_DATA) --extensions .py
	rm -rf runs/demo/engine runs/demo/code-cpt
	$(VENV)/bin/torchrun --nproc-per-node 2 -m specialize train configs/demo/engine.yaml
	$(VENV)/bin/torchrun --nproc-per-node 2 -m specialize train configs/demo/code-cpt.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/train_throughput.py
	$(PY) bench/data_prepare.py

clean:
	rm -rf $(VENV) runs
