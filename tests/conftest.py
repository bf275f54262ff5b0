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
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(num_ranks), "--master_port", str(free_port())]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    full_env["PATH"] = f"{BIN}:{full_env.get('PATH', '')}"
    proc = subprocess.run(cmd + [str(a) for a in script_args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    return proc


@pytest.fixture
def deepspeed_runner():
    return run_deepspeed
