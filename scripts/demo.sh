#!/usr/bin/env bash
# The main job: installs what is needed, then runs the embedded stack (Tansu broker, Redis, Faust processors,
# aggregator, 100 devices) for 30 rounds of Fashion-MNIST and writes fedguard-demo.png. Extra flags go to
# `fedguard demo` (e.g. --rounds 10, --task digits).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec "${PYTHON:-python3}" -m fedguard.cli demo "$@"
