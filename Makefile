# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SCALE_STAMP := $(VENV)/.installed-scale

.PHONY: demo test gpu-check lint bench clean

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/lock.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The `scale` extra (Ray, for `data prepare --engine ray`): the suite tests that engine on a local
# cluster, so `make test` installs it; the demo and every default path run without it.
$(SCALE_STAMP): $(STAMP) requirements/scale.txt
	$(PY) -m pip install -q -r requirements/scale.txt
	touch $(SCALE_STAMP)

# The whole factory on qwen-tiny, 2 CPU processes, offline (configs/demo/factory.yaml): a base
# pretrained on the standard library's prose, Code-Qwen CPT on its code, two-stage Code-Qwen-Chat
# SFT, Math-Qwen-Chat SFT, evaluation of all four against the base, and a report with charts in
# runs/demo/factory/report. Re-running skips finished steps and resumes an interrupted one.
demo: $(STAMP)
	$(PY) -m specialize pipeline configs/demo/factory.yaml

# HumanEvalPack's tests run the languages whose toolchain is installed and skip the others; the
# first lines say which (and the Debian packages for the rest).
test: $(SCALE_STAMP)
	$(PY) -c 'from code_qwen.humanevalpack import toolchain_report as r; print(*r(), sep="\n")'
	$(PY) -m pytest -q tests

# The first command on a machine with GPUs (README "Running on GPUs"): Transformer Engine and the
# GPU tests, te/local/auto specs, TP+SP/PP/virtual stages and a resume at another layout, eval at
# TP=2, FP8 against BF16, throughput against `specialize plan`; PASS/FAIL/SKIP per line and
# runs/gpu-check/gpu-check.json. Exit 0 all passed, 1 a failure, 3 no CUDA device.
gpu-check: $(STAMP)
	$(PY) -m specialize gpu-check

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/train_throughput.py
	$(PY) bench/data_prepare.py

clean:
	rm -rf $(VENV) runs
