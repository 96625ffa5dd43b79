# Two commands matter: `make run` (the main job) and `make test` (the whole suite; .ci/run calls it).
# `make docs` builds the documentation site (docs/, mkdocs.yml) into site/, failing on any warning.
# `make unit` runs tests/unit only: no root, no namespaces, seconds.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test docs lint unit bootstrap bench bench-quick lab-up lab-down clean proto image

run:
	@scripts/bootstrap.sh run
	@scripts/run.sh

test:
	@scripts/bootstrap.sh test
	@scripts/test.sh

unit:
	@scripts/bootstrap.sh test
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

docs:
	@scripts/bootstrap.sh test
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint:
	@scripts/lint.sh

bootstrap:
	scripts/bootstrap.sh test

bench:
	@scripts/bootstrap.sh bench
	$(PY) -m bench

bench-quick:
	@scripts/bootstrap.sh bench
	$(PY) -m bench --quick

lab-up:
	$(PY) -m lab up

lab-down:
	$(PY) -m lab down

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache *.egg-info

# The protobuf exposition messages, compiled from agent/export/metrics.proto (commit both).
proto:
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. agent/export/metrics.proto

# The image, labelled with the one version (agent.VERSION) and the commit it was built from.
image:
	docker build -t edgeprobe:$$(python3 -c 'import agent; print(agent.VERSION)') \
	  --build-arg VERSION="$$(python3 -c 'import agent; print(agent.VERSION)')" \
	  --build-arg REVISION="$$(git rev-parse HEAD)" .
