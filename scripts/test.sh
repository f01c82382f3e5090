#!/usr/bin/env bash
# Set up (seconds when already done) and run the tests; arguments go to pytest:
#     bash scripts/test.sh
#     bash scripts/test.sh -m "not slow and not distributed and not subprocess"   # the fast tier
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Slurm for tests/test_slurm.py, which starts a one-node cluster (skipped, with the reason, where
# it cannot be installed: not root, no apt)
if ! command -v slurmd >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  slurm="slurmctld slurmd slurm-client munge"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $slurm >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $slurm >/dev/null 2>&1; } ||
    echo "could not install Slurm ($slurm): tests/test_slurm.py will be skipped"
fi
exec "${PYTHON:-python3}" -m pytest -q "$@"
