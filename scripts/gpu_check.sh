#!/usr/bin/env bash
# The GPU check: one command on a GPU machine (Python 3.12, torch 2.11, no network), at most 6 minutes of wall time, with the kit built here by
# scripts/gpu_kit.sh (carried as .gpu_kit). Writes its results under $OUT (or the folder given):
#   summary.json        every step's exit status and seconds, the environment, the figures below
#   gpu_check.log       every step's output
#   pytest.xml          `pytest -m gpu`: GPU loaders against the CPU path, the fp16 ZeRO-1 engine's host syncs,
#                       ZeroAdamP's bits on two runs (its Triton kernels and its torch path),
#                       the digits default on one GPU (tests/test_gpu.py)
#   engine_syncs.json, digits_gpu.json   what those tests measured
#   throughput.json     benchmarks/gpu_throughput.py: FFCV loader, FFCV + DeepSpeed training, model only,
#                       torchvision's loader, channels_last under ZeRO, ZeroAdamP's share of a step; and ratios
#   adamp_flat.json     benchmarks/bench_adamp.py flat: ZeroAdamP (Triton kernels; its torch path; smaller tiles)
#                       against torch's fused AdamW on one flat buffer, synchronised and back to back
# There, with .gpu_kit copied beside the repository:  bash scripts/gpu_check.sh [OUT_DIR]
# Here first, on the CPU:  bash scripts/gpu_check.sh --dry-run [OUT_DIR]
#   the same steps up to the CUDA calls: the kit installs for Python 3.12 and loads without this machine's
#   OpenCV and libjpeg-turbo, the GPU tests are collected, the throughput script runs on the CPU with a tiny model.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR=${1:-${OUT:-$REPO/gpu_check_out}}
KIT=${AUTOWU_GPU_KIT:-$REPO/.gpu_kit}
if [ $DRY = 1 ]; then PY=${PYTHON:-$REPO/.venv/bin/python}; else PY=${PYTHON:-python3}; fi
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
die() { echo "gpu_check: $*" | tee -a "$LOG" >&2; exit 1; }
[ -f "$KIT/kit.json" ] || die "no $KIT/kit.json: build the kit on the CPU machine (bash scripts/gpu_kit.sh) and carry .gpu_kit"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.jsonl"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, record its status
  local name=$1 limit=$2 started=$SECONDS rc
  shift 2
  echo "[gpu_check] $name (at most ${limit} s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - started))}" >>"$STEPS"
  echo "[gpu_check] $name: exit $rc after $((SECONDS - started)) s" | tee -a "$LOG"
  return $rc
}

# 1. The kit: its glibc against this machine's, then installed into a scratch target.
needs=$("$PY" -c "import json; print(json.load(open('$KIT/kit.json'))['ffcv']['needs_glibc'])")
"$PY" - "$needs" <<'PY' || die "this machine's glibc is older than the kit needs; build the kit on an older system"
import platform, sys
have = platform.libc_ver()[1]
need = sys.argv[1]
print(f"[gpu_check] glibc {have}, the kit needs {need}")
sys.exit(tuple(map(int, have.split("."))) < tuple(map(int, need.split("."))))
PY
SITE="$WORK/site"
pip_install=("$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE")
if [ $DRY = 1 ]; then
  # The whole kit as the GPU image's Python 3.12 would take it (tags checked), then, for this Python, the
  # two packages the image lacks that matter here (the rest comes from .venv).
  step kit_for_python_3.12 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --target "$WORK/site312" "$KIT"/wheels/*.whl || die "the kit does not install for 3.12"
  step kit_install 120 "${pip_install[@]}" "$KIT"/wheels/ffcv-*.whl "$KIT"/wheels/deepspeed-*.whl || die "kit install failed"
else
  step kit_install 120 "${pip_install[@]}" "$KIT"/wheels/*.whl || die "kit install failed"
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
export AUTOWU_FAST_RESIZE=$(ls "$SITE"/ffcv.libs/_fast_resize*.so)
export AUTOWU_GPU_CHECK_OUT="$OUT_DIR"
export PYTHONUNBUFFERED=1

# Dry run as root: the environment step runs with every library the kit bundles hidden from it (bound over by
# /dev/null in a mount namespace of its own), as on the GPU image, which has none of them.
HIDE=()
if [ $DRY = 1 ] && [ "$(id -u)" = 0 ] && unshare --mount true 2>/dev/null; then
  libs=$("$PY" -c "import json; print(' '.join(n for n in json.load(open('$KIT/kit.json'))['ffcv']['bundled'] if n.startswith('lib') and n != 'libz.so.1'))")
  echo "[gpu_check] hiding this machine's $libs" >>"$LOG"
  HIDE=(unshare --mount bash -c 'for lib in $0; do for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu; do
          [ -e "$dir/$lib" ] && mount --bind /dev/null "$(readlink -f "$dir/$lib")"; done; done; exec "$@"' "$libs")
fi

# 2. What runs: versions, the device, and FFCV loading from the kit (its bundled OpenCV and libjpeg-turbo; in the
#    dry run with this machine's copies hidden, as on the GPU image, which has none).
step environment 120 "${HIDE[@]}" "$PY" - "$OUT_DIR/env.json" <<'PY'
import json, platform, subprocess, sys
import numpy, numba, torch, timm, gpytorch, deepspeed, ffcv, ffcv.libffcv
import autowu.data.decoders as decoders
assert "/site/ffcv/" in ffcv.__file__, f"FFCV from {ffcv.__file__}, not from the kit"
env = {"python": platform.python_version(), "glibc": platform.libc_ver()[1], "torch": torch.__version__,
       "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "numpy": numpy.__version__,
       "numba": numba.__version__, "timm": timm.__version__, "gpytorch": gpytorch.__version__,
       "deepspeed": deepspeed.__version__, "ffcv_from": ffcv.__file__, "fast_resize": decoders.HAVE_FAST_RESIZE}
import numpy as np
source, crop = np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8), np.zeros((20, 20, 3), np.uint8)
ffcv.libffcv.resize_crop(source, 0, 50, 0, 60, crop)
decoders.fast_resize_crop(source, 0, 50, 0, 60, crop)  # both resizes call the bundled OpenCV
env["bundled_opencv_resized"] = bool(crop.any())
if torch.cuda.is_available():
    import cupy
    env.update(device=torch.cuda.get_device_name(), cupy=cupy.__version__,
               nvidia_smi=subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip())
print(json.dumps(env, indent=1))
json.dump(env, open(sys.argv[1], "w"), indent=1)
PY
[ $? = 0 ] || die "the kit does not load here (see $LOG)"

# 3. The GPU tests.
if [ $DRY = 1 ]; then
  step pytest_gpu 120 "$PY" -m pytest -m gpu tests/test_gpu.py --collect-only -q -p no:cacheprovider
else
  step pytest_gpu 200 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rA -p no:cacheprovider \
    --junitxml="$OUT_DIR/pytest.xml"
fi

# 4. Throughput.
if [ $DRY = 1 ]; then
  step throughput 300 "$PY" benchmarks/gpu_throughput.py --device cpu --epochs 1 --out "$OUT_DIR/throughput.json" \
    --work_dir "$WORK/throughput"
else
  step throughput 140 "$PY" benchmarks/gpu_throughput.py --out "$OUT_DIR/throughput.json" --work_dir "$WORK/throughput"
fi

# 5. ZeroAdamP's step on ResNet-50's flat layout against torch's fused AdamW on the same buffer (issue 21).
if [ $DRY = 1 ]; then
  step adamp_flat 120 "$PY" benchmarks/bench_adamp.py flat --device cpu --repeats 2 --json "$OUT_DIR/adamp_flat.json"
else
  step adamp_flat 150 "$PY" benchmarks/bench_adamp.py flat --device cuda --json "$OUT_DIR/adamp_flat.json"
fi

"$PY" - "$OUT_DIR" "$STEPS" <<'PY'
import json, os, sys
out = sys.argv[1]
steps = [json.loads(line) for line in open(sys.argv[2])]
summary = {"steps": steps, "ok": all(s["rc"] == 0 for s in steps)}
for name in ("env", "engine_syncs", "digits_gpu", "throughput", "adamp_flat"):
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        summary[name] = json.load(open(path))
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps({"ok": summary["ok"], "steps": steps}))
sys.exit(0 if summary["ok"] else 1)
PY
