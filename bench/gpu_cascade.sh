#!/usr/bin/env bash
# The cascade with GPU-sized training on a lent H100/H200 (about 5 minutes; see
# bench/gpu_cascade.py). Install the wheels as for bench/gpu_check.sh (DEVELOPERS.md).
#
#   bash bench/gpu_cascade.sh            # on the GPU machine, from the repo root
#   bash bench/gpu_cascade.sh --dry-run  # anywhere: tiny CPU run that checks the script works
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
exec "$PY" bench/gpu_cascade.py --json "${OUT:-bench/out}/gpu_cascade.json" "$@"
