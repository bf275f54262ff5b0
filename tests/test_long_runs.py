"""Long runs that survive, on 2 real CPU ranks through DeepSpeed's launcher: a SIGTERM mid-epoch checkpoints and
resumes as the unbroken run, a torn checkpoint is skipped for the last whole one, Ctrl-C leaves nothing behind,
and a user's mistake is one line and exit code 2."""
import json
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from conftest import BIN, REPO, free_port, run_deepspeed

pytestmark = pytest.mark.slow

CONFIG = REPO / "ds_configs" / "cpu_digits.json"
EPOCHS = "5"


def read_log(run_dir):
    with open(run_dir / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def comparable(records):
    """The log without what depends on the clock."""
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in records]


def train_args(betons, run_dir, *extra, config=CONFIG):
    return [REPO / "launch" / "train.py", "--deepspeed_config", config, "--data_dir", betons, "--out_dir", run_dir,
            "--epochs", EPOCHS, *extra]


def start_deepspeed(args, port):
    """The runner in its own session (as a terminal or a batch system would start it)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}")
    return subprocess.Popen([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)] +
                            [str(a) for a in args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_line(proc, pattern, lines, timeout=300):
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if pattern in line:
            return
        assert time.monotonic() < deadline, "".join(lines[-30:])
    raise AssertionError(f"{pattern!r} never came:\n" + "".join(lines[-30:]))


def wait_for_train_record(run_dir, after_epoch, before_epoch, timeout=120):
    """Until log.jsonl has a loss reading inside (after_epoch, before_epoch): a fixed sleep lands anywhere in an
    epoch that takes half a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(run_dir / "log.jsonl") as f:
            lines = f.read().splitlines()
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line still being written
                continue
            if record["kind"] == "train" and after_epoch < record["epoch"] < before_epoch:
                return
        time.sleep(0.005)
    raise AssertionError(f"no loss reading between epochs {after_epoch} and {before_epoch} in {timeout} s")


def ranks_of(run_dir):
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and "--local_rank" in
            " ".join(p.info["cmdline"]) and str(run_dir) in " ".join(p.info["cmdline"])]


def leftovers(run_dir, port):
    processes = [p.pid for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and str(run_dir) in " ".join(p.info["cmdline"])]
    shm = [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer") and f"_{port}_" in n]
    return processes, shm


def wait_until_gone(run_dir, port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes, _ = leftovers(run_dir, port)
        if not processes:
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"processes left: {leftovers(run_dir, port)}")


def test_sigterm_mid_epoch_checkpoints_and_the_resumed_run_equals_the_unbroken_one(betons, tmp_path):
    unbroken = run_deepspeed(train_args(betons, tmp_path / "unbroken"))
    assert unbroken.returncode == 0, unbroken.stdout[-3000:] + unbroken.stderr[-3000:]

    run_dir, port, lines = tmp_path / "interrupted", free_port(), []
    proc = start_deepspeed(train_args(betons, run_dir), port)
    wait_for_line(proc, f"epoch 2/{EPOCHS}:", lines)
    wait_for_train_record(run_dir, 2.0, 2.6)  # into epoch 3, with most of it still to run
    ranks = ranks_of(run_dir)
    assert len(ranks) == 2
    signalled = time.monotonic()
    for rank in ranks:  # as SLURM's scancel --signal or a batch system's TERM to the tasks
        rank.send_signal(signal.SIGTERM)
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, "".join(lines[-30:])
    gone = wait_until_gone(run_dir, port)
    output = "".join(lines)
    assert "Traceback" not in output
    stopped = [line for line in lines if "stopped by SIGTERM at step" in line]
    assert len(stopped) == 1 and "committed; exit 143; continue with --resume" in stopped[0]
    assert leftovers(run_dir, port) == ([], [])
    print(f"signal to all ranks gone: {gone - signalled:.2f} s")
    tag = stopped[0].split("checkpoints/")[1].split(" ")[0]
    assert tag.startswith("epoch2_step") and (run_dir / "checkpoints" / tag / "commit.json").is_file()

    resumed = run_deepspeed(train_args(betons, run_dir, "--resume"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/{tag} at epoch 2, batch" in resumed.stdout
    # Every logged step (loss, LR), every AutoWU test, every validation and the final top-1: as if never stopped.
    assert comparable(read_log(run_dir)) == comparable(read_log(tmp_path / "unbroken"))


def test_a_torn_checkpoint_is_skipped_for_the_last_whole_one(betons, tmp_path):
    config = json.loads(CONFIG.read_text())
    config["train"]["checkpoint_every"] = 1
    every_epoch = tmp_path / "every_epoch.json"
    every_epoch.write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    first = run_deepspeed(train_args(betons, run_dir, "--stop_after_epoch", "2", config=every_epoch))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    shard = run_dir / "checkpoints" / "epoch2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # rank 1's shard cut short, as a crash mid-write leaves it
        f.truncate(size // 2)
    resumed = run_deepspeed(train_args(betons, run_dir, "--resume", "--stop_after_epoch", "3", config=every_epoch))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (f"resume: skipped epoch2 (zero_pp_rank_1_mp_rank_00_optim_states.pt has {size // 2:,} bytes, its "
            f"commit record says {size:,}") in resumed.stdout and "taking epoch1" in resumed.stdout
    assert f"resumed from {run_dir}/checkpoints/epoch1 at epoch 1" in resumed.stdout
    assert (run_dir / "checkpoints" / "epoch3" / "commit.json").is_file()
    # A save that never finished (no commit record) is skipped the same way, with its reason.
    (run_dir / "checkpoints" / "epoch3" / "commit.json").unlink()
    again = run_deepspeed(train_args(betons, run_dir, "--resume", "--stop_after_epoch", "3", config=every_epoch))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resume: skipped epoch3 (no commit record: its save never finished" in again.stdout
    # A whole checkpoint without its record (an older autowu's, or DeepSpeed's own save): the command the message
    # names commits it once every file loads, and the next resume takes it; a torn one it refuses.
    command = f"python -m autowu.launcher.checkpoints {run_dir}/checkpoints/epoch3"
    assert command in again.stdout
    committed = subprocess.run([str(BIN / "python"), "-m", "autowu.launcher.checkpoints",
                                str(run_dir / "checkpoints" / "epoch3")], cwd=REPO, capture_output=True, text=True)
    assert committed.returncode == 0 and "epoch 3" in committed.stdout and "2 rank(s)" in committed.stdout, \
        committed.stdout + committed.stderr
    torn_copy = run_dir / "checkpoints" / "epoch7"   # a copy of it without its record, one shard cut short
    shutil.copytree(run_dir / "checkpoints" / "epoch3", torn_copy)
    (torn_copy / "commit.json").unlink()
    with open(torn_copy / "zero_pp_rank_1_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    torn = subprocess.run([str(BIN / "python"), "-m", "autowu.launcher.checkpoints", str(torn_copy)], cwd=REPO,
                          capture_output=True, text=True)
    assert torn.returncode == 1 and "zero_pp_rank_1_mp_rank_00_optim_states.pt does not load" in torn.stderr
    assert not (torn_copy / "commit.json").exists()
    last = run_deepspeed(train_args(betons, run_dir, "--resume", "--stop_after_epoch", "4", config=every_epoch))
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/epoch3 at epoch 3" in last.stdout


def test_ctrl_c_leaves_no_process_and_no_shared_memory(betons, tmp_path):
    run_dir, port, lines = tmp_path / "run", free_port(), []
    proc = start_deepspeed(train_args(betons, run_dir), port)
    wait_for_line(proc, f"epoch 1/{EPOCHS}:", lines)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground process group
    proc.wait(timeout=120)
    wait_until_gone(run_dir, port)
    assert leftovers(run_dir, port) == ([], [])


@pytest.mark.parametrize("case", ["misspelt_key", "missing_beton", "no_checkpoint", "world_size", "bad_value",
                                  "cooldown_fraction", "betas", "fp16_true", "params_null", "stage_one"])
def test_a_users_mistake_is_one_line_and_exit_code_2(betons, tmp_path, case):
    config = json.loads(CONFIG.read_text())
    args, expected = ["--data_dir", betons], None
    if case == "misspelt_key":
        config["zero_optimisation"] = config.pop("zero_optimization")
        expected = "unknown key 'zero_optimisation' (did you mean 'zero_optimization'?)"
    elif case == "missing_beton":
        args, expected = ["--data_dir", tmp_path], f"beton not found: {tmp_path}/train.beton"
    elif case == "no_checkpoint":
        args, expected = args + ["--resume"], "--resume: no complete checkpoint in"
    elif case == "world_size":
        config["train_batch_size"] = 96
        expected = "train_batch_size 96 is not a multiple of train_micro_batch_size_per_gpu 32 x 2 ranks = 64"
    elif case == "bad_value":
        config["scheduler"]["params"]["min_lr"] = "1e-5"
        expected = "scheduler AutoWU params.min_lr: expected a number, got '1e-5'"
    elif case == "cooldown_fraction":  # once an IndexError at the first step
        config["scheduler"]["params"].update(immediate_cooldown=False, cooldown_fraction=1)
        expected = "cooldown_fraction 1 without immediate_cooldown starts the cooldown at the first step"
    elif case == "betas":  # once a TypeError
        config["optimizer"]["params"]["betas"] = 0.9
        expected = "optimizer AdamP params.betas: expected a list of 2 numbers, got 0.9"
    elif case == "fp16_true":  # once an AttributeError
        config["fp16"] = True
        expected = "\"fp16\" must be an object, got true"
    elif case == "params_null":  # once an AttributeError
        config["scheduler"]["params"] = None
        config["train"]["epochs"] = 2
        args, expected = args + ["--stop_after_epoch", "1"], None
    elif case == "stage_one":  # once "invalid literal for int() with base 10: 'one'"
        config["zero_optimization"]["stage"] = "one"
        expected = "zero_optimization.stage must be 0, 1, 2 or 3, got 'one'"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    proc = run_deepspeed([REPO / "launch" / "train.py", "--deepspeed_config", path, "--out_dir", tmp_path / "run",
                          *args])
    output = proc.stdout + proc.stderr
    if expected is None:  # accepted: "params": null is AutoWU with its defaults
        assert proc.returncode == 0 and "stopping after epoch 1 as asked" in output, output[-3000:]
        return
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("[train] error")]
    assert errors == [f"[train] error: {errors[0].split(': ', 1)[1]}"] and expected in errors[0], output[-3000:]
    for noise in ("Traceback", "terminate called", "core dumped"):
        assert noise not in output, output[-3000:]


@pytest.mark.parametrize("saved_on,resumed_on", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_ranks(tmp_path, saved_on, resumed_on):
    """The same global batch by gradient accumulation; every parameter, its AdamP moments and step, and AutoWU's
    state carried over through DeepSpeed's universal checkpoint."""
    import torch
    script = REPO / "tests" / "ds_scripts" / "world_size.py"
    env = {"PYTHONPATH": str(REPO)}
    for phase, ranks in (("save", saved_on), ("load", resumed_on)):
        proc = run_deepspeed([script, "--phase", phase, "--out_dir", tmp_path / "run", "--dump",
                              tmp_path / f"{phase}.pt"], num_ranks=ranks, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"epoch2 was saved on {saved_on} rank(s), this run has {resumed_on}" in proc.stdout
    saved, loaded = (torch.load(tmp_path / f"{phase}.pt", weights_only=False) for phase in ("save", "load"))
    assert saved["adamp_steps"] == loaded["adamp_steps"] == [6] and loaded["global_steps"] == 6
    for name, states in saved["params"].items():
        for key, value in states.items():
            assert torch.equal(value, loaded["params"][name][key]), (name, key)
    assert saved["autowu"]["phase"] == "warmup" and torch.equal(saved["autowu"]["losses"], loaded["autowu"]["losses"])
    assert {k: v for k, v in saved["autowu"].items() if k != "losses"} == \
        {k: v for k, v in loaded["autowu"].items() if k != "losses"}
