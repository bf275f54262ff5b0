"""autowu.launcher.preemption.StopRequests in a real process with real signals: a relayed repeat is the same request, a
later signal or a checkpoint that never comes ends the process at once, with 128 + the signal and the clean-up."""
import subprocess
import sys

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
