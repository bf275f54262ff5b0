"""The main job end to end: image folder -> betons -> 2-rank ZeRO-1 training -> AutoWU switch -> resume."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_deepspeed

pytestmark = pytest.mark.slow  # 2 DeepSpeed ranks through the launcher

CONFIG = REPO / "ds_configs" / "cpu_digits.json"


def read_log(run_dir):
    with open(run_dir / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_train_switch_accuracy_and_resume(betons, tmp_path):
    run_dir = tmp_path / "run"
    args = [REPO / "launch" / "train.py", "--deepspeed_config", CONFIG, "--data_dir", betons, "--out_dir", run_dir]
    first = run_deepspeed(args + ["--stop_after_epoch", "16"])
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "stopping after epoch 16" in first.stdout
    # The console: rank 0's lines, one an epoch, the switch on its own line, none of the noise a user cannot act on.
    output = first.stdout + first.stderr
    assert len(re.findall(r"^\[train\] epoch \d+/30: loss [0-9.]+, val top-1", first.stdout, re.M)) == 16
    assert len(re.findall(r"^\[train\] AutoWU switched at step \d+", first.stdout, re.M)) == 1
    for noise in ("FutureWarning", "all_gather_into_tensor", "untested optimizer", "built successfully",
                  "No CUDA runtime is found", "[rank1]", "it/s]"):
        assert noise not in output, noise
    records = read_log(run_dir)
    switch = [r for r in records if r["kind"] == "autowu_switch"]
    tests = [r for r in records if r["kind"] == "autowu_test"]
    assert len(switch) == 1, "AutoWU did not switch within 16 of 30 epochs"
    switch = switch[0]
    steps_per_epoch = json.loads((run_dir / "run_config.json").read_text())["steps_per_epoch"]
    # A test every epoch, or more often where the default's fast ramp would grow the LR more than 1.8x.
    every = tests[0]["step"]
    assert every <= steps_per_epoch and [t["step"] for t in tests] == [every * (i + 1) for i in range(len(tests))]
    assert tests[-1]["switched"] and not tests[-1]["at_cap"]  # the GP test ended the warmup, not the cap
    assert [t["passed"] for t in tests[-2:]] == [True, True]  # the default's two passes in a row
    assert 1e-5 < switch["peak_lr"] < tests[-1]["lr"]  # back down to the LR at the predicted minimum
    assert (run_dir / "checkpoints" / "epoch16").is_dir()

    second = run_deepspeed(args + ["--resume"])
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "resumed from" in second.stdout and "at epoch 16" in second.stdout
    records = read_log(run_dir)
    final = [r for r in records if r["kind"] == "final"][-1]
    assert final["switch_step"] == switch["step"] and final["peak_lr"] == switch["peak_lr"]
    assert final["top1"] > 0.8  # chance is 0.1
    # The recipe again without the search: AutoWU's peak with a fixed 5% warmup and a cosine, the run as it was.
    assert final["rerun_config"] == "warmup_cosine.json"  # in the run directory
    assert f"--deepspeed_config {run_dir / 'warmup_cosine.json'}" in second.stdout
    rerun = json.loads((run_dir / "warmup_cosine.json").read_text())
    assert rerun["optimizer"]["params"]["lr"] == switch["peak_lr"]
    assert rerun["scheduler"]["type"] == "WarmupCosineLR" and rerun["scheduler"]["params"]["warmup_type"] == "linear"
    assert rerun["train"]["epochs"] == 30 and rerun["train"]["data_config"] == "ffcv_configs/digits_cpu.json"
    vals = [r for r in records if r["kind"] == "val"]
    assert {v["images"] for v in vals} == {359}  # every validation image once, without the padding duplicates
    assert [v["epoch"] for v in vals] == list(range(1, 31))
    # After the resume the LR continues the same cosine from the switch to 0 at the last step.
    total = switch["total_steps"]
    for r in (r for r in records if r["kind"] == "train" and r["step"] > 16 * steps_per_epoch):
        expected = switch["peak_lr"] * 0.5 * (1 + math.cos(math.pi * (r["step"] - switch["step"]) /
                                                          (total - switch["step"])))
        assert r["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert (run_dir / "monitor" / "cpu_digits" / "AutoWU_probability.csv").is_file()
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run_dir / "monitor" / "cpu_digits"))

    plot = subprocess.run([sys.executable, str(REPO / "launch" / "plot_run.py"), str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert plot.returncode == 0, plot.stderr[-2000:]
    png = run_dir / "autowu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_same_seed_same_run_and_a_killed_run_resumes_as_its_unbroken_self(betons, tmp_path):
    """Every random augmentation is drawn from (seed, epoch, sample index): two runs with one seed are the same
    run (losses, AutoWU's tests, switch step, peak LR), and a run that dies at epoch 7 and resumes from its
    epoch-5 checkpoint goes on exactly as the unbroken one (on 2 CPU ranks)."""
    base = [REPO / "launch" / "train.py", "--deepspeed_config", CONFIG, "--data_dir", betons, "--epochs", "12"]
    unbroken = run_deepspeed(base + ["--out_dir", tmp_path / "unbroken"])
    assert unbroken.returncode == 0, unbroken.stdout[-3000:] + unbroken.stderr[-3000:]
    killed = run_deepspeed(base + ["--out_dir", tmp_path / "killed", "--stop_after_epoch", "7"])
    assert killed.returncode == 0, killed.stdout[-3000:] + killed.stderr[-3000:]
    # As if killed during epoch 8 with only the epoch-5 checkpoint written: epochs 6-7 are trained again.
    checkpoints = tmp_path / "killed" / "checkpoints"
    (checkpoints / "epoch7" / "commit.json").unlink()  # its save never finished
    resumed = run_deepspeed(base + ["--out_dir", tmp_path / "killed", "--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "at epoch 5" in resumed.stdout

    def by_step(records, kind, keys):
        return {r["step"]: tuple(r[k] for k in keys) for r in records if r["kind"] == kind}

    first, second = read_log(tmp_path / "unbroken"), read_log(tmp_path / "killed")
    train_keys, test_keys = ("loss", "lr"), ("probability", "votes", "argmin_lr", "passed", "switched")
    unbroken_train = by_step(first, "train", train_keys)
    assert len(unbroken_train) >= 20
    # Every logged step, including the ones trained twice (before the kill and after the resume), matches.
    for record in (r for r in second if r["kind"] == "train"):
        assert (record["loss"], record["lr"]) == unbroken_train[record["step"]], record
    assert by_step(second, "autowu_test", test_keys) == by_step(first, "autowu_test", test_keys)
    final_first, final_second = first[-1], second[-1]
    assert final_first["kind"] == final_second["kind"] == "final"
    assert final_first["switch_step"] is not None
    assert (final_second["switch_step"], final_second["peak_lr"], final_second["top1"]) == \
        (final_first["switch_step"], final_first["peak_lr"], final_first["top1"])


def test_the_launcher_runs_a_reference_warmup_cosine_schedule(betons, tmp_path):
    """ds_configs/cpu_digits_cosine.json: DeepSpeed's WarmupCosineLR to the optimizer block's peak LR, with step
    counts "auto" (the run's steps, 5% warmup): AutoWU against the schedule a user knows, like with like."""
    run_dir = tmp_path / "cosine"
    proc = run_deepspeed([REPO / "launch" / "train.py", "--deepspeed_config", REPO / "ds_configs" /
                          "cpu_digits_cosine.json", "--data_dir", betons, "--out_dir", run_dir, "--epochs", "4",
                          "--verbose"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "You are using ZeRO with an untested optimizer" in proc.stdout + proc.stderr  # --verbose: DeepSpeed's logs
    records = read_log(run_dir)
    peak = json.loads((REPO / "ds_configs" / "cpu_digits_cosine.json").read_text())["optimizer"]["params"]["lr"]
    total = 4 * 22
    warmup = round(0.05 * total)
    for r in (r for r in records if r["kind"] == "train"):
        # the LR of the next step: DeepSpeed's WarmupCosineLR at iteration step - 1 (it starts at -1)
        progress = (r["step"] - warmup) / (total - warmup)
        expected = peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        assert r["lr"] == pytest.approx(expected, rel=1e-6, abs=1e-12), r
    final = records[-1]
    assert final["kind"] == "final" and final["schedule"] == "WarmupCosineLR" and final["switch_step"] is None
    assert final["top1"] > 0.5
    assert not any(r["kind"].startswith("autowu") for r in records)


def test_a_missing_beton_is_one_clear_error(tmp_path):
    proc = run_deepspeed([REPO / "launch" / "train.py", "--deepspeed_config", CONFIG, "--data_dir", tmp_path,
                          "--out_dir", tmp_path / "run"])
    assert proc.returncode == 2
    assert f"[train] error: beton not found: {tmp_path}/train.beton" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
