"""autowu.launcher.preemption.StopRequests in a real process with real signals: a relayed repeat is the same request, a
later signal or a checkpoint that never comes ends the process at once, with 128 + the signal and the clean-up."""
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = r"""
import os, signal, sys, time
from autowu.launcher.preemption import StopRequests
from autowu.launcher.processes import at_exit
at_exit(lambda: print("cleaned up", flush=True))
stop = StopRequests(check_every=1, timeout_s=float(sys.argv[1]), relay_window_s=0.5)
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)      # DeepSpeed's launcher relaying the same request
time.sleep(0.1)
print("noted", signal.Signals(stop.signum).name, flush=True)
time.sleep(float(sys.argv[2]))
if sys.argv[3] == "again":
    os.kill(os.getpid(), signal.SIGINT)   # a second request, after the relay window
time.sleep(5)
print("never here", flush=True)
"""


def run(timeout_s, wait_s, again):
    return subprocess.run([sys.executable, "-c", SCRIPT, str(timeout_s), str(wait_s), again], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_a_relayed_signal_is_one_request_and_a_later_one_ends_the_process_at_once():
    proc = run(30, 1.0, "again")
    assert proc.returncode == 143 and "noted SIGTERM" in proc.stdout and "never here" not in proc.stdout
    assert "stopping at once: a second signal (SIGINT)" in proc.stderr and "cleaned up" in proc.stdout


def test_no_checkpoint_within_the_limit_ends_the_process_at_once():
    proc = run(1.0, 0, "no")
    assert proc.returncode == 143 and "never here" not in proc.stdout and "cleaned up" in proc.stdout
    assert "stopping at once: no checkpoint within 1 s of the signal" in proc.stderr



SCAN = r"""
import sys, time
from autowu.data.folders import scan_image_folder
from autowu.launcher.preemption import StopRequests
stop = StopRequests(check_every=5, timeout_s=20)   # a stop handler installed before the image check's pool forks
started = time.monotonic()
for split in ("train", "val"):
    scan_image_folder(f"{sys.argv[1]}/{split}", num_workers=2, progress=False)
print(f"checked after {time.monotonic() - started:.1f} s", flush=True)
"""


@pytest.mark.slow
def test_the_image_checks_pool_ends_at_once_under_a_stop_handler(tmp_path):
    """The image check's workers take the default signal actions and end by closing, not by SIGTERM: the
    README's first run once lost 25 s at its end (workers that inherited the stop handler waited out its watchdog)
    and printed "stopping at once"."""
    from autowu.data.digits import build_digits_folder
    folders = build_digits_folder(str(tmp_path / "digits"))
    for _ in range(5):
        proc = subprocess.run([sys.executable, "-c", SCAN, folders], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seconds = float(proc.stdout.split("after ")[1].split(" s")[0])
        assert seconds < 15 and "stopping at once" not in proc.stderr, proc.stdout + proc.stderr
