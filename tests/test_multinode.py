"""`deepspeed --hostfile hosts launch/train.py` on two real nodes: real sshd, real pdsh, on this machine.

Each node is an sshd listening on a loopback address of its own (127.0.0.2, 127.0.0.3), started in a mount and
PID namespace of its own (``unshare``, as root) with its own directories bound over the embedded dataset's folder
and the run directory: node-local storage, as FFCV's betons copied to each node's disk. Every process a node
starts lives in its PID namespace and dies with it, so nothing outlives the test, even when it fails. The ssh
client is the test's own (a generated key, an ssh config of its own through a wrapper first on PATH), never the
user's ~/.ssh; no traffic leaves the loopback interface (gloo on ``lo``, the rendezvous on 127.0.0.2).
"""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, free_port

BIN = os.path.dirname(sys.executable)
NODES = ("127.0.0.2", "127.0.0.3")
CONFIG = REPO / "ds_configs" / "cpu_digits.json"
DIGITS = REPO / "data" / "digits"  # the embedded dataset's folder: bound over by each node's own

def _can_make_nodes() -> bool:
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "pdsh", "ssh-keygen")) or \
            not os.path.exists("/usr/sbin/sshd"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _can_make_nodes(), reason="needs root allowed to unshare mount and PID "
                                "namespaces, pdsh and openssh-server (scripts/setup.sh installs the last two)")]


def _wait_port(address, port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"sshd on {address}:{port} did not start")


class TwoNodes:
    def __init__(self, root):
        self.root = root
        self.port = free_port()
        self.runs = root / "runs"  # the same path on both nodes, each node's own directory behind it
        self.runs.mkdir()
        DIGITS.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "id")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key")], check=True)
        shutil.copy(root / "id.pub", root / "authorized_keys")
        (root / "ssh_config").write_text(
            f"Host *\n  Port {self.port}\n  IdentityFile {root / 'id'}\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n")
        (root / "bin").mkdir()
        ssh = root / "bin" / "ssh"
        ssh.write_text(f"#!/bin/sh\nexec /usr/bin/ssh -F {root / 'ssh_config'} \"$@\"\n")
        ssh.chmod(0o755)
        # What every rank needs and DeepSpeed's runner would not forward on its own (it forwards PYTHON*):
        (root / "deepspeed_env").write_text("GLOO_SOCKET_IFNAME=lo\nOMP_NUM_THREADS=1\n")
        (root / "hosts").write_text("".join(f"{address} slots=1\n" for address in NODES))
        os.makedirs("/run/sshd", exist_ok=True)
        self.sshd = []
        for n, address in enumerate(NODES):
            node = root / f"node{n}"
            (node / "digits").mkdir(parents=True)
            (node / "runs").mkdir()
            config = root / f"sshd_{n}.conf"
            config.write_text(
                f"Port {self.port}\nListenAddress {address}\nHostKey {root / 'host_key'}\n"
                f"PidFile {root}/sshd_{n}.pid\nAuthorizedKeysFile {root / 'authorized_keys'}\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UsePAM no\nStrictModes no\nLogLevel ERROR\n")
            script = (f"mount --bind {node / 'digits'} {DIGITS} && mount --bind {node / 'runs'} {self.runs} && "
                      f"exec /usr/sbin/sshd -D -e -f {config}")
            self.sshd.append(subprocess.Popen(
                ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation",
                 "private", "sh", "-c", script], start_new_session=True, stdout=subprocess.DEVNULL,
                stderr=open(root / f"sshd_{n}.log", "w")))
        for address in NODES:
            _wait_port(address, self.port)

    def node_dir(self, n):
        return self.root / f"node{n}" / "runs"

    def command(self, *args):
        return [os.path.join(BIN, "deepspeed"), "--hostfile", str(self.root / "hosts"), "--master_addr", NODES[0],
                "--master_port", str(free_port()), str(REPO / "launch" / "train.py"), "--deepspeed_config",
                str(CONFIG)] + [str(a) for a in args]

    def env(self):
        return dict(os.environ, PATH=f"{self.root / 'bin'}:{BIN}:{os.environ['PATH']}",
                    DS_ENV_FILE=str(self.root / "deepspeed_env"), PYTHONUNBUFFERED="1")

    def run(self, *args, timeout=600):
        return subprocess.run(self.command(*args), cwd=REPO, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def close(self):
        for process in self.sshd:  # unshare --kill-child: the namespace's init dies, and everything in it
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    cluster = TwoNodes(tmp_path_factory.mktemp("nodes"))
    yield cluster
    cluster.close()
    assert not _rank_processes(str(cluster.runs)), "processes of the two-node runs outlived the test"


def _rank_processes(marker):
    """pid -> environment of every launch/train.py process whose command line mentions ``marker``."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            if "launch/train.py" in cmdline and marker in cmdline and "deepspeed.launcher" not in cmdline \
                    and "/bin/deepspeed" not in cmdline:
                environ = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace").split("\0")
                found[int(pid)] = dict(e.split("=", 1) for e in environ if "=" in e)
        except OSError:
            continue
    return found


def _records(path):
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the last line, still being written by the run
            break
    return records


def test_two_nodes_train_checkpoint_locally_and_resume_through_pdsh(nodes):
    started = time.perf_counter()
    first = nodes.run("--out_dir", nodes.runs / "run", "--stop_after_epoch", "16")
    seconds = time.perf_counter() - started
    output = first.stdout + first.stderr
    assert first.returncode == 0, output[-5000:]
    # Both nodes trained, each printing through pdsh under its own address.
    assert f"{NODES[0]}: [train] node 0 (host" in output and f"{NODES[1]}: [train] node 1 (host" in output
    assert "is node-local: every node keeps its own checkpoints" in output
    # Each node built the embedded dataset on its own disk (its local rank 0).
    for n in range(2):
        assert (nodes.root / f"node{n}" / "digits" / "betons" / "train.beton").is_file()
    log0 = nodes.node_dir(0) / "run"
    records = _records(log0 / "log.jsonl")
    switch = [r for r in records if r["kind"] == "autowu_switch"][0]
    assert [r for r in records if r["kind"] == "autowu_test"][-1]["at_cap"] is False  # switched by test
    # Node-local checkpoints: every node holds the model, its optimizer shard and 'latest'; the scheduler state
    # on node 1's disk switched at the same step as node 0's log says.
    for n in range(2):
        checkpoint = nodes.node_dir(n) / "run" / "checkpoints"
        assert (checkpoint / "latest").read_text().strip() == "epoch16"
        assert (checkpoint / "epoch16" / "mp_rank_00_model_states.pt").is_file()
        assert any(f.name.startswith(f"zero_pp_rank_{n}_") for f in (checkpoint / "epoch16").iterdir())
    state = torch.load(nodes.node_dir(1) / "run" / "checkpoints" / "epoch16" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    assert state["lr_scheduler"]["switch_step"] == switch["step"]
    assert not (nodes.node_dir(1) / "run" / "log.jsonl").exists()  # the log is rank 0's

    second = nodes.run("--out_dir", nodes.runs / "run", "--resume")
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-5000:]
    assert "resumed from" in output and "at epoch 16" in output
    records = _records(log0 / "log.jsonl")
    final = records[-1]
    assert final["kind"] == "final" and final["top1"] > 0.8
    assert (final["switch_step"], final["peak_lr"]) == (switch["step"], switch["peak_lr"])
    steps_per_epoch = json.loads((log0 / "run_config.json").read_text())["steps_per_epoch"]
    total = switch["total_steps"]
    for r in (r for r in records if r["kind"] == "train" and r["step"] > 16 * steps_per_epoch):
        expected = switch["peak_lr"] * 0.5 * (1 + math.cos(math.pi * (r["step"] - switch["step"]) /
                                                          (total - switch["step"])))
        assert r["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert not _rank_processes(str(nodes.runs / "run"))
    (nodes.root / "timing.json").write_text(json.dumps({"two_nodes_16_epochs_seconds": seconds}))


def test_a_lost_node_ends_the_run_in_bounded_time_naming_it_and_the_last_checkpoint_resumes(nodes):
    out_dir = nodes.runs / "lost"
    command = nodes.command("--out_dir", out_dir, "--epochs", "12")
    runner = subprocess.Popen(command, cwd=REPO, env=nodes.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log = nodes.node_dir(0) / "lost" / "log.jsonl"
        deadline = time.time() + 400
        while time.time() < deadline and runner.poll() is None:
            if log.exists() and any(r["kind"] == "val" and r["epoch"] >= 6 for r in _records(log)):
                break
            time.sleep(0.05)  # epochs take about half a second: the kill must land well before epoch 10's checkpoint
        ranks = _rank_processes(str(out_dir))
        node1 = [pid for pid, env in ranks.items() if env.get("CROSS_RANK") == "1"]
        assert runner.poll() is None and len(node1) == 1, (ranks, runner.poll())
        os.kill(node1[0], signal.SIGKILL)
        killed = time.time()
        output, _ = runner.communicate(timeout=180)
        ended = time.time() - killed
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    assert runner.returncode != 0
    assert ended < 90, ended
    assert "[train] rank 0 (node 0): lost node 1 (host" in output and "no heartbeat from rank 1" in output, \
        output[-4000:]
    assert "with --resume" in output
    deadline = time.time() + 30
    while _rank_processes(str(out_dir)) and time.time() < deadline:
        time.sleep(0.5)
    assert not _rank_processes(str(out_dir)), "a rank outlived the failed run"
    (nodes.root / "failure.json").write_text(json.dumps({"seconds_from_kill_to_exit": ended,
                                                         "output_tail": output[-3000:]}))

    resumed = nodes.run("--out_dir", out_dir, "--epochs", "12", "--resume")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-5000:]
    assert "at epoch 5" in resumed.stdout
    final = _records(log)[-1]
    assert final["kind"] == "final" and final["top1"] > 0.8
