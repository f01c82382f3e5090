#!/usr/bin/env bash
# Set up (seconds when already done) and run kto-train; with no arguments, the default job:
#     bash scripts/train.sh
#     bash scripts/train.sh model=tiny recipe=none trainer.max_steps=10
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m kto_cli.cli "$@"
