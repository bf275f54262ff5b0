#!/usr/bin/env bash
# Set up autowu from nothing, idempotently: system packages for FFCV's build, a virtual environment in .venv,
# and the package with its test tools at the versions pinned in constraints.txt.
#   bash scripts/setup.sh          # CPU or GPU machine; AUTOWU_EXTRAS=train,dev,gpu adds cupy
set -euo pipefail
cd "$(dirname "$0")/.."

# FFCV 1.0.2 compiles a C extension against OpenCV and libjpeg-turbo, found through pkg-config. DeepSpeed's
# multi-node launcher goes through pdsh and ssh (the two-node test starts real sshd's on loopback addresses).
need=()
for pkg in pkg-config libturbojpeg0-dev libopencv-dev pdsh openssh-client openssh-server; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${need[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip wheel setuptools
fi

extras=${AUTOWU_EXTRAS:-train,dev,bench}
echo "[setup] installing autowu[$extras] with constraints.txt (first run: a few minutes)"
# torch and torchvision first, as a pair: a torch that another package drags in alone may not match torchvision.
.venv/bin/python -m pip install -q -c constraints.txt torch torchvision
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
.venv/bin/python - <<'PY'
import torch, torchvision, deepspeed, ffcv, timm, gpytorch, numba  # noqa: F401  (fails loudly if one is broken)
print(f"[setup] ok: torch {torch.__version__}, deepspeed {deepspeed.__version__}, timm {timm.__version__}, "
      f"gpytorch {gpytorch.__version__}, numba {numba.__version__}")
PY
