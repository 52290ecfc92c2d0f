# Sourced by the GPU scripts (bench/gpu_check.sh, bench/gpu_cascade.sh): picks the Python,
# installs the carried wheels where our dependencies are missing, sets PYTHONPATH.
#
# The GPU image has torch but not liverpipe's other dependencies and cannot download them:
# run `bash bench/gpu_wheels.sh` here first (it fills .whl/a and .whl/b with cp312 wheels),
# then `bash bench/gpu_check.sh --install-only` carrying .whl/a, and at once the script
# carrying .whl/b (DEVELOPERS.md has the calls). Each call carries one wheel folder (the
# other is gone there), so each call adds its wheels to /tmp/liverpipe-site/<folder>,
# which outlives the call while the machine stays warm. Nothing is installed where the
# dependencies import already (a .venv, CI).
export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; fi
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
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
