import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(script_args, num_ranks=2, timeout=600, env=None):
    """Run a script on ``num_ranks`` CPU ranks through the real ``deepspeed`` launcher; return the process."""
    port = free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(num_ranks), "--master_port", str(port)]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    full_env["PATH"] = f"{BIN}:{full_env.get('PATH', '')}"
    try:
        return subprocess.run(cmd + [str(a) for a in script_args], cwd=REPO, env=full_env, capture_output=True,
                              text=True, timeout=timeout)
    finally:
        from autowu.launcher.processes import remove_cpu_shm_buffers
        remove_cpu_shm_buffers(port)  # DeepSpeed's CPU all-reduce leaves 66 MB a rank in /dev/shm


@pytest.fixture
def deepspeed_runner():
    return run_deepspeed


@pytest.fixture(scope="session")
def betons(tmp_path_factory):
    """scikit-learn's digits as JPEG folders and betons, written by launch/write_betons.py (once a session)."""
    root = tmp_path_factory.mktemp("digits")
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "write_betons.py"), "--digits",
                           "--data_root", str(root / "folders"), "--out_dir", str(root / "betons"),
                           "--config", str(REPO / "ffcv_configs" / "digits_cpu.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: 1438 images in 10 classes" in proc.stdout
    return root / "betons"
