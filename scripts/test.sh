#!/usr/bin/env bash
# Install the test dependencies (DCMTK, Orthanc, the codec extra) if missing, then run pytest.
# Arguments go to pytest: bash scripts/test.sh tests/test_docs.py -k name
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/install-test-deps.sh
exec python3 -m pytest -q "$@"
