#!/usr/bin/env bash
# GPU check for a lent H100/H200 (at most about 4 minutes): CUDA path + training throughput.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repo root
#   bash bench/gpu_check.sh --dry-run  # anywhere: tiny CPU run that checks the script works
#
# Run `bash bench/gpu_wheels.sh` here first; DEVELOPERS.md has the device calls.
# Results: the table on stdout and $OUT/gpu_check.json (or bench/out/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
if [[ "${1:-}" == "--install-only" ]]; then exit 0; fi
"$PY" - <<'PY'
import sys
missing = []
for name in ("torch", "segmentation_models_pytorch", "SimpleITK", "nibabel", "zarr", "pydantic", "isal", "cc3d"):
    try:
        __import__(name)
    except ImportError as err:
        missing.append(f"{name} ({err})")
if missing:
    sys.exit("gpu_check: missing " + ", ".join(missing) + ". Fix: run `bash bench/gpu_wheels.sh` here and carry .whl")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    print("device", torch.cuda.get_device_name(0), "bf16 matmul ok:", bool(torch.isfinite(x @ x).all()))
PY
RESULT=${OUT:-bench/out}/gpu_check.json
mkdir -p "$(dirname "$RESULT")"
if [[ "${1:-}" == "--dry-run" ]]; then
    exec "$PY" bench/gpu_train.py --dry-run --out /tmp/liverpipe-gpu-dry --json "$RESULT"
fi
exec "$PY" bench/gpu_train.py --cases 6 --size 384 --steps 200 --batch 16 --out /tmp/liverpipe-gpu --json "$RESULT"
