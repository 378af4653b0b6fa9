# The README's two commands are `make demo` and `make test`; each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint clean

install:
	bash scripts/install.sh

demo: install
	$(VENV)/bin/ovd demo

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache .ruff_cache
