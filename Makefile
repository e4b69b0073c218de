# baton: `make run` sets everything up and runs the default recipe; `make test` sets up and tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/vlp-tiny.yaml

.PHONY: install run test test-slow ui status clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (torch from the local wheel cache where pip finds one)"
	@start=$$(date +%s); \
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]' && \
	echo "install took $$(( $$(date +%s) - start ))s"
	@touch $(STAMP)

install: $(STAMP)

run: install
	@start=$$(date +%s); \
	$(VENV)/bin/baton run $(CONFIG) $(ARGS) && \
	echo "pipeline took $$(( $$(date +%s) - start ))s"

status: install
	$(VENV)/bin/baton status $(CONFIG) $(ARGS)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: install
	$(PY) -m pytest -q -p no:cacheprovider -m slow

ui: install
	$(VENV)/bin/baton ui

clean:
	rm -rf artifacts/stages artifacts/mlflow.db artifacts/mlartifacts artifacts/prefect
