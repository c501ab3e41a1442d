#!/usr/bin/env bash
# Installs the pinned toolchain and the locked workspace into .venv. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
export UV_PYTHON_DOWNLOADS=never  # use the machine's CPython 3.11; never fetch one
if ! command -v uv >/dev/null 2>&1 || [ "$(uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  python3 -m pip install --quiet "uv==$UV_VERSION"
fi
uv sync --frozen --all-packages
# s3rver (an S3 server that keeps objects on disk) for the fault suite's infrastructure
# faults (tests/chaos/test_infra_faults.py), which fail without it: stop here, saying so.
if [ ! -d tools/s3rver/node_modules/s3rver ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "setup: npm is missing; install Node.js with npm (s3rver, for the fault suite)" >&2
    exit 1
  fi
  (cd tools/s3rver && npm ci --silent --no-audit --no-fund)
fi
