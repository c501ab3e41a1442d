# Thin entry points; the logic lives in scripts/ and the packages. See README.md.
.PHONY: setup demo test test-fast lint fmt up

PY := .venv/bin/python

setup:            ## install the locked workspace into .venv (uv)
	@scripts/setup.sh

demo: setup       ## bring up the local stack, score a real take through REST+SSE, tear down
	$(PY) -m voicejury_devstack.demo

test: setup       ## the whole suite: unit, integration (real NATS/PostgreSQL/S3), end-to-end
	$(PY) -m pytest -q

test-fast: setup  ## unit tests only
	$(PY) -m pytest -q tests/unit

lint: setup       ## ruff (lint + format check) and mypy --strict
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

fmt: setup
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

up: setup         ## run the local stack in the foreground (Ctrl-C tears it down)
	$(PY) -m voicejury_devstack up
