#!/usr/bin/env bash
# Download (here, where pip reaches the registry) the cp312 wheels that the GPU image lacks
# for `bench/gpu_check.sh` there. Versions follow constraints.txt. A call carries at most
# 64 MiB and SimpleITK alone is 50 MiB, so the wheels come in two folders that travel in
# two calls: .whl/a (SimpleITK) first, then .whl/b with the check (see DEVELOPERS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pin() { grep -i "^$1==" constraints.txt | head -1; }
PKGS=(segmentation_models_pytorch SimpleITK nibabel zarr numcodecs donfig crc32c google-crc32c pydantic pydantic_core
      annotated-types typing-inspection isal connected-components-3d)
specs=()
for p in "${PKGS[@]}"; do
    spec=$(pin "$p" || true); spec=${spec:-$(pin "${p//_/-}" || true)}
    specs+=("${spec:-$p}")
done
rm -rf .whl && mkdir -p .whl/a .whl/b
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl/b "${specs[@]}"
mv .whl/b/simpleitk-*.whl .whl/a/
du -sh .whl/a .whl/b
