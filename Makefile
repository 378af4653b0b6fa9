# The README's two commands are `make demo` and `make test`; each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo pipeline bench-ezsd bench-compress bench-load bench-speed bench-onnx docker-test test lint clean

install:
	bash scripts/install.sh

demo: install
	$(VENV)/bin/ovd demo

# The whole chain that made artifacts/default (about 40 min on 2 cores; cached stages reused).
pipeline: install
	$(VENV)/bin/ovd pipeline

# Benchmarks: results under benchmarks/results/ (not tests; see each script's docstring).
bench-ezsd: install
	$(PY) benchmarks/ezsd_variants.py

bench-compress: install
	$(PY) benchmarks/compress_students.py

bench-load: install
	$(PY) benchmarks/load_service.py

# OWL-ViT / OWLv2 / Grounding DINO come from transformers (the `bench` extra).
bench-speed: install
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e ".[dev,bench]"
	$(PY) benchmarks/speed_anchors.py --profile

bench-onnx: install
	$(PY) benchmarks/onnx_runtime.py

# The images built and run for real (podman here, or Docker): docker/docker_test.py, docker/README.md.
docker-test: install
	$(PY) docker/docker_test.py

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache .ruff_cache
