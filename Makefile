# Two commands: `make demo` runs the main job on the embedded default data (the fast preset: 8 noise levels), `make test` runs the tests.
# Each creates (or refreshes, when pyproject.toml changed) the virtual environment .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/adapt.py --site unseen_center preset=fast 'methods=[biasrecon,unadapted,l1wavelet]'

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) out
