# Thin entry points; the logic lives in scripts/ and the packages. See README.md.
.PHONY: setup demo test test-fast chaos chaos-report bench bench-scoring bench-stages bench-pipeline bench-recorder bench-jury lint fmt up

PY := .venv/bin/python

setup:            ## install the locked workspace into .venv (uv)
	@scripts/setup.sh

demo: setup       ## bring up the local stack, score a real take through REST+SSE, tear down
	$(PY) -m voicejury_devstack.demo

test: setup       ## the whole suite: unit, integration (real NATS/PostgreSQL/S3), end-to-end, faults (tests/chaos)
	$(PY) -m pytest -q

test-fast: setup  ## unit tests only
	$(PY) -m pytest -q tests/unit

chaos: setup      ## the fault suite of docs/reliability.md (faults listed in ../shared/RELIABILITY.md)
	$(PY) -m pytest -q -m chaos tests/chaos

chaos-report: setup  ## the fault suite, then its per-fault table into docs/reliability.md
	@rm -f .chaos-report.jsonl
	VJ_CHAOS_REPORT=$(CURDIR)/.chaos-report.jsonl $(PY) -m pytest -q -m chaos tests/chaos; \
	  status=$$?; $(PY) tests/chaos/report.py .chaos-report.jsonl docs/reliability.md || status=1; exit $$status

bench: bench-scoring bench-stages bench-pipeline bench-recorder bench-jury  ## every benchmark; results land in docs/

bench-scoring: setup  ## expert agreement on mastmelody-dev, speed vs fastdtw, degradations -> docs/scoring-results.md
	$(PY) bench/scoring.py

bench-stages: setup   ## pitch / separator / asr versus the naive library calls -> docs/performance.md
	$(PY) bench/stages.py

bench-pipeline: setup ## distributed overhead vs in-process, prepared references, gateway latency, SSE streams -> docs/pipeline-performance.md
	$(PY) bench/pipeline.py

bench-recorder: setup ## events/s the one recording gateway replica writes, vs the database's own pace -> docs/pipeline-performance.md
	$(PY) bench/recorder.py

bench-jury: setup     ## jury wall time p50/p95 vs the 5 s target, parallel calls, timeouts, fallback -> docs/jury.md
	$(PY) bench/jury.py

lint: setup       ## ruff (lint + format check) and mypy --strict
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

fmt: setup
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

up: setup         ## run the local stack in the foreground (Ctrl-C tears it down)
	$(PY) -m voicejury_devstack up
