#!/usr/bin/env bash
# The test command: installs what is needed, then runs unit, integration (real Tansu broker, real Redis) and
# end-to-end tests. The tests start and stop their own broker and Redis on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec "${PYTHON:-python3}" -m pytest -p no:cacheprovider "$@"
