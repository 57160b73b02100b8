#!/usr/bin/env bash
# The gates and the test suite, as CI runs them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

if timeout 15 docker info >/dev/null 2>&1; then
    # Built once and cached by the engine; a no-op when the image is current.
    echo "==> workspace image"
    .venv/bin/forgeline image build
fi

echo "==> ruff"
.venv/bin/ruff check .
echo "==> import contracts"
.venv/bin/lint-imports
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"
