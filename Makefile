# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-sft test lint bench clean

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

# The SFT demos on top of `make demo`'s checkpoints: math SFT of the engine demo's model on
# generated word problems (exact match on held-out problems before and after), and the two-stage
# code-chat SFT of the CPT demo's model on instructions made from the standard library.
DATA := runs/demo/data
demo-sft: $(STAMP)
	test -f runs/demo/code-cpt/checkpoints/latest || $(MAKE) demo
	$(PY) -m math_qwen.word_problems --n 4000 --seed 0 --split train -o $(DATA)/math-train.jsonl
	$(PY) -m specialize data prepare-sft $(DATA)/math-train.jsonl -o $(DATA)/math-sft --seq-len 256 --pack
	for stage in 1 2; do \
		$(PY) -m code_qwen.instructions --stage $$stage --split train -o $(DATA)/code-sft-$$stage.jsonl && \
		$(PY) -m specialize data prepare-sft $(DATA)/code-sft-$$stage.jsonl -o $(DATA)/code-sft-$$stage \
			--seq-len 512 --pack || exit 1; \
	done
	rm -rf runs/demo/math-sft runs/demo/code-chat-sft
	$(VENV)/bin/torchrun --nproc-per-node 2 -m specialize train configs/demo/math-sft.yaml
	$(PY) -m math_qwen.exact_match runs/demo/engine --n 200
	$(PY) -m math_qwen.exact_match runs/demo/math-sft --n 200
	$(VENV)/bin/torchrun --nproc-per-node 2 -m specialize train configs/demo/code-chat-sft.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/train_throughput.py
	$(PY) bench/data_prepare.py

clean:
	rm -rf $(VENV) runs
