#!/usr/bin/env bash
# GPU check for a lent H100/H200 (at most about 4 minutes): CUDA path + training throughput.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repo root
#   bash bench/gpu_check.sh --dry-run  # anywhere: tiny CPU run that checks the script works
#
# The GPU image has torch but not liverpipe's other dependencies and cannot download them:
# run `bash bench/gpu_wheels.sh` here first (it fills .whl/a and .whl/b with cp312 wheels),
# then `bash bench/gpu_check.sh --install-only` carrying .whl/a, and at once this script
# carrying .whl/b (DEVELOPERS.md has the two calls).
# Results: the table on stdout and $OUT/gpu_check.json (or bench/out/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; fi
# Each call carries one wheel folder (the other is gone there), so each call adds its wheels
# to /tmp/liverpipe-site/<folder>, which outlives the call while the machine stays warm.
# Nothing is installed where the dependencies import already (a .venv, CI).
add_sites() {
    for site in /tmp/liverpipe-site/*/; do
        if [[ -d "$site" ]]; then export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"; fi
    done
}
add_sites
if [[ -d .whl ]] && ! "$PY" -c "import segmentation_models_pytorch, SimpleITK, zarr" 2>/dev/null; then
    for dir in .whl/*/; do
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "/tmp/liverpipe-site/$(basename "$dir")" "$dir"*.whl
    done
    PYTHONPATH=""
    add_sites
fi
if [[ "${1:-}" == "--install-only" ]]; then exit 0; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
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
