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

# The whole factory on qwen-tiny, 2 CPU processes, offline (configs/demo/factory.yaml): a base
# pretrained on the standard library's prose, Code-Qwen CPT on its code, two-stage Code-Qwen-Chat
# SFT, Math-Qwen-Chat SFT, evaluation of all four against the base, and a report with charts in
# runs/demo/factory/report. Re-running skips finished steps and resumes an interrupted one.
demo: $(STAMP)
	$(PY) -m specialize pipeline configs/demo/factory.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/train_throughput.py
	$(PY) bench/data_prepare.py

clean:
	rm -rf $(VENV) runs
