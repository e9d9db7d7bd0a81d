# varst-scverse — the two commands a newcomer types: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint docs benchmark clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m varst_scverse demo --output demo_output

test: $(STAMP)
	MPLBACKEND=Agg $(PY) -m pytest -q

test-fast: $(STAMP)
	MPLBACKEND=Agg $(PY) -m pytest -q -m "not realdata and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

benchmark: $(STAMP)
	$(PY) -m varst_scverse benchmark

# the documentation: Sphinx + myst-nb (the notebooks are committed executed, never run here); warnings are errors
DOC_STAMP := $(VENV)/.installed-doc
$(DOC_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[doc]"
	touch $(DOC_STAMP)

docs: $(DOC_STAMP)
	MPLBACKEND=Agg $(PY) -m sphinx -W --keep-going -E -q -b html docs docs/_build/html

clean-venv:
	rm -rf $(VENV)
