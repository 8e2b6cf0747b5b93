#!/usr/bin/env bash
# Installs what fedguard needs on a fresh Debian machine: Redis, Fashion-MNIST and Prometheus from Debian's
# packages, then the project and its dev extra with pip (torch 2.13.0 CPU). Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
command -v prometheus >/dev/null || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: apt-get install ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian starts a system redis-server and prometheus on their standard ports; fedguard uses its own ports and
# does not need them, so they are left as they are.

PY="${PYTHON:-python3}"
extras="${1:-dev}"
if ! "$PY" -c "import fedguard, torch, faust, kafka, pytest" >/dev/null 2>&1 || [ -n "${FEDGUARD_REINSTALL:-}" ]; then
    echo "setup: pip install -e .[$extras]"
    "$PY" -m pip install -q -e ".[$extras]"
fi
