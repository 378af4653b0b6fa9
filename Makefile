# The README's two commands are `make demo` and `make test`; each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-run demo pipeline student bench-ezsd bench-compress bench-load bench-speed bench-onnx docker-test test lint clean

# Everything: the runtime, the dev tools, and (through apt) redis-server, chromium, chromedriver.
install:
	bash scripts/install.sh

# What the demo and the pipeline run: no dev tools, no system packages (so no sudo).
install-run:
	bash scripts/install.sh --no-dev --no-redis

demo: install-run
	$(VENV)/bin/ovd demo

# The world-v2 chain with the stage settings of configs/synthetic.yaml (cached stages reused).
pipeline: install-run
	$(VENV)/bin/ovd pipeline

# The shipped student (artifacts/student): the student config distilled from artifacts/default
# on all training images, exported in float16 and judged against it on test
# (benchmarks/results/compress_student.json).
student: install
	$(PY) benchmarks/compress_students.py --phase ship --ship-out artifacts/student

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
