"""The scheduler installs on its own: a fresh virtual environment gets ``pip install <this repo>`` (the core:
torch, numpy, numba, scipy) and trains a real model with AutoWU, with no DeepSpeed, FFCV, timm or gpytorch in sight."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow  # builds a virtual environment

FORBIDDEN = ("deepspeed", "ffcv", "timm", "gpytorch", "cv2", "sklearn", "matplotlib")

TRAIN = r"""
import sys
import numpy as np
import torch
from autowu import AutoWU

data = np.load(sys.argv[1])
x, y = torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"])
x_train, y_train, x_test, y_test = x[:1437], y[:1437], x[1437:], y[1437:]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                            torch.nn.Linear(128, 10))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
batch, epochs = 32, 40
steps_per_epoch = len(x_train) // batch
scheduler = AutoWU(optimizer, steps_per_epoch, epochs, immediate_cooldown=True, cooldown_type="cosine")
order = torch.Generator().manual_seed(0)
for epoch in range(epochs):
    perm = torch.randperm(len(x_train), generator=order)
    for i in range(steps_per_epoch):
        idx = perm[i * batch:(i + 1) * batch]
        loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        scheduler.step(loss.detach())
top1 = (model(x_test).argmax(1) == y_test).float().mean().item()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
print(f"RESULT top1={top1:.4f} switch_step={scheduler.switch_step} by_test={not scheduler.history[-1]['at_cap']} "
      f"peak_lr={scheduler.peak_lr:.3g} loaded={loaded}")
""".replace("FORBIDDEN", repr(FORBIDDEN))


def link_torch_only(target: Path) -> None:
    """A folder of links to this environment's torch and the CUDA wheels it loads, and nothing else: the fresh
    environment sees torch as installed (no second multi-GB download) and gets every other requirement,
    numpy and numba included, from pip."""
    site = Path(torch.__file__).resolve().parents[1]
    target.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("torch", "functorch", "nvidia", "triton", "cuda")) and not name.startswith("torchvision"):
            (target / entry.name).symlink_to(entry)


def test_the_core_install_trains_with_autowu_and_nothing_else(tmp_path):
    from sklearn.datasets import load_digits  # only to hand the fresh environment real data as a plain .npz
    digits = load_digits()
    data = tmp_path / "digits.npz"
    np.savez(data, x=digits.data / 16.0, y=digits.target)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    link_torch_only(tmp_path / "torch_only")
    Path(purelib, "torch_only.pth").write_text(str(tmp_path / "torch_only") + "\n")

    # No OpenCV for the optional C++ resize (an FFCV-side speed-up): a pkg-config that finds nothing, so its
    # build fails for want of headers, and the install must go on without it.
    no_opencv = tmp_path / "bin"
    no_opencv.mkdir()
    (no_opencv / "pkg-config").write_text("#!/bin/sh\nexit 1\n")
    (no_opencv / "pkg-config").chmod(0o755)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PATH=f"{no_opencv}:{os.environ['PATH']}")
    # The tracked files only, as a fresh checkout has them (no build/ or in-place extension of this checkout).
    source = tmp_path / "src"
    for name in subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.split():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"),
                              str(source)], capture_output=True, text=True, env=env, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True, check=True).stdout.lower()
    installed = {line.split("==")[0] for line in listed.split()}
    assert {"autowu", "numpy", "numba", "scipy", "torch"} <= installed
    assert not list(Path(purelib, "autowu", "data").glob("_fast_resize*.so"))  # built without OpenCV headers
    assert not installed & {"deepspeed", "ffcv", "timm", "gpytorch", "opencv-python", "scikit-learn",
                            "matplotlib", "tensorboard"}

    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    run = subprocess.run([str(python), str(script), str(data)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = dict(item.split("=", 1) for item in run.stdout.split("RESULT ")[1].split(" ", 4))
    assert result["by_test"] == "True" and result["switch_step"] != "None", run.stdout
    assert float(result["top1"]) > 0.9
    assert result["loaded"].strip() == "[]"  # importing and running autowu loaded none of them
