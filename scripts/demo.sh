#!/usr/bin/env bash
# The main job: installs what is needed, then runs the embedded stack (Tansu broker, Redis, Faust processors with
# the detection ensemble and reputation, aggregator with the model audit, 100 devices) for 30 rounds of Fashion-MNIST
# while 20% of the enrolled devices are compromised from round 5 on and send a persistent constrain-and-scale backdoor
# (updates at the honest norm and direction; the window stage's behaviour detector rejects most of them by what they
# do to the model on the server's clean data, and the model audit watches for what gets through), and writes
# fedguard-demo.png (main and backdoor accuracy per round). Extra flags go to `fedguard demo` and override these
# (e.g. --attack none, --attack sybil, --rounds 10, --task digits).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec "${PYTHON:-python3}" -m fedguard.cli demo --attack constrain_and_scale --fraction 0.2 "$@"
