# Two commands on a fresh machine:  `make run` starts the agent, `make test` runs the test suite.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[train,dev,fast]'
	touch $(STAMP)

.PHONY: install run test lint bench-ingest bench-model reliability
install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/triage-agent serve --config agent.toml

test: $(STAMP)
	$(VENV)/bin/pytest

# mypy cannot follow the editable install's import hook that maps model/ to triage_model, so it
# checks the packages through a folder of links named as they install.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	mkdir -p build/mypy
	ln -sfn ../../triage_agent build/mypy/triage_agent
	ln -sfn ../../model build/mypy/triage_model
	cd build/mypy && $(abspath $(VENV))/bin/mypy --config-file ../../pyproject.toml

bench-ingest: $(STAMP)
	$(VENV)/bin/python bench/ingest.py

bench-model: $(STAMP)
	$(VENV)/bin/python bench/model.py

# The docs/reliability.md scenarios at full size (20 kill rounds, 20 x 200 load) with a summary table.
# CI runs the same scenarios at quick sizes as part of `make test`.
reliability: $(STAMP)
	RELIABILITY_FULL=1 $(VENV)/bin/pytest tests/reliability -m reliability -p no:cacheprovider -rA
