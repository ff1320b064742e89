#!/usr/bin/env bash
# The test command (README, CI): creates/uses .venv, installs igs2gs with its test extras, runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m gpu` on a CUDA machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m pytest "$@"
