"""What a long run's accidents do, through the launcher as a user runs it (2 CPU ranks, the digits default).

Each case prints what the launcher printed and what followed, and ``--json`` keeps it:

- always, ``unbroken``: the reference run (6 epochs, a checkpoint every epoch);
- ``sigterm``: SIGTERM to both ranks inside epoch 3 (as SLURM's ``scancel --signal`` or a batch system's TERM to
  the tasks): the exit code, the seconds from the signal to the last rank gone, the line printed, any
  ``/dev/shm`` file left; then ``--resume`` and whether its ``log.jsonl`` equals the unbroken run's record for
  record (every logged loss and LR, every AutoWU test, every validation, the final top-1);
- ``torn``: a run stopped after epoch 3, then rank 1's ZeRO shard of ``epoch3`` cut in half (a crash mid-write);
  ``--resume`` must skip it for ``epoch2`` and go on as the unbroken run;
- ``ctrlc``: SIGINT to the launcher's process group (a terminal's Ctrl-C) inside epoch 2; then ``--resume``;
- ``world``: a checkpoint made on 2 ranks resumed on 1, and one made on 1 resumed on 2 (universal checkpoint,
  the same global batch by gradient accumulation): the lines printed and the final top-1;
- ``bad``: a list of user mistakes, each with its exit code and the one line printed (no traceback, no abort).

    .venv/bin/python benchmarks/long_runs_check.py --json benchmarks/results/long_runs.json
    .venv/bin/python benchmarks/long_runs_check.py sigterm bad
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, ".venv", "bin")
CONFIG = os.path.join(REPO, "ds_configs", "cpu_digits.json")
BETONS = os.path.join(REPO, "data", "digits", "betons")
EPOCHS = "6"
CASES = ("sigterm", "torn", "ctrlc", "world", "bad")


class Launcher:
    def __init__(self):
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=f"{BIN}:{os.environ['PATH']}")
        self.port = 29640

    def command(self, ranks, args):
        self.port += 1
        return [os.path.join(BIN, "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(self.port),
                os.path.join(REPO, "launch", "train.py")] + [str(a) for a in args]

    def run(self, ranks, args):
        started = time.monotonic()
        proc = subprocess.run(self.command(ranks, args), cwd=REPO, env=self.env, capture_output=True, text=True)
        return proc, time.monotonic() - started

    def start(self, ranks, args):
        """In its own session, as a terminal or a batch system starts it."""
        return subprocess.Popen(self.command(ranks, args), cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)


def read_until(proc, pattern, lines):
    for line in proc.stdout:
        lines.append(line)
        if pattern in line:
            return
    raise RuntimeError(f"{pattern!r} never came:\n" + "".join(lines[-20:]))


def wait_inside_epoch(run_dir, epoch):
    """Until ``log.jsonl`` has a loss reading inside ``epoch`` (counted from 1): epochs take half a second here,
    so a fixed sleep could land at an epoch's end."""
    while True:
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line still being written
                    continue
                if record["kind"] == "train" and epoch - 1 < record["epoch"] < epoch:
                    return
        time.sleep(0.005)


def processes_of(run_dir):
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and run_dir in " ".join(p.info["cmdline"])]


def wait_all_gone(run_dir):
    while processes_of(run_dir):
        time.sleep(0.02)
    return time.monotonic()


def shm_files():
    return [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer")]


def log_of(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def comparable(records):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in records]


def last_final(run_dir):
    finals = [r for r in log_of(run_dir) if r["kind"] == "final"]
    return {"top1": round(finals[-1]["top1"] * 100, 2), "switch_step": finals[-1]["switch_step"],
            "peak_lr": finals[-1]["peak_lr"]} if finals else None


def resumed_tail(run_dir, reference):
    """Whether the records the resumed process wrote equal the reference run's last records."""
    records = comparable(log_of(run_dir))
    finals = [i for i, r in enumerate(records) if r["kind"] == "final"]
    tail = records[finals[-2] + 1:] if len(finals) > 1 else records  # after the stopped process's last record
    return tail == comparable(log_of(reference))[-len(tail):]


def train_lines(text, *words):
    return [line for line in text.splitlines() if line.startswith("[train]") and any(w in line for w in words)]


def tracebacks(lines):
    """For each traceback printed, the program whose file it starts in (DeepSpeed's own runner, on Ctrl-C, prints
    its KeyboardInterrupt)."""
    found = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback") and i + 1 < len(lines):
            found.append(lines[i + 1].strip().split(",")[0].replace('File "', "").rstrip('"'))
    return found


def signal_mid_epoch(launcher, run_dir, base, epoch, how):
    """Start a run, ``how(proc)`` once it is inside ``epoch`` (from 1)."""
    lines = []
    proc = launcher.start(2, base + ["--out_dir", run_dir])
    read_until(proc, f"epoch {epoch - 1}/", lines)
    wait_inside_epoch(run_dir, epoch)
    signalled = time.monotonic()
    how(proc)
    lines += proc.stdout.readlines()
    code = proc.wait()
    gone = wait_all_gone(run_dir)
    return {"exit": code, "signal_to_all_ranks_gone_s": round(gone - signalled, 2),
            "lines": [line.strip() for line in lines if "stop" in line and line.startswith("[train]")],
            "tracebacks_from": tracebacks(lines), "shm_files_left": shm_files()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help=f"some of {', '.join(CASES)} (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cases = args.cases or list(CASES)
    if set(cases) - set(CASES):
        parser.error(f"unknown case(s) {sorted(set(cases) - set(CASES))}; choose from {', '.join(CASES)}")
    out = tempfile.mkdtemp(prefix="autowu_long_runs_")
    launcher = Launcher()
    config = json.load(open(CONFIG))
    config["train"]["checkpoint_every"] = 1
    every_epoch = os.path.join(out, "every_epoch.json")
    with open(every_epoch, "w") as f:
        json.dump(config, f)
    base = ["--deepspeed_config", every_epoch, "--epochs", EPOCHS]  # the embedded digits, built on first use
    unbroken = os.path.join(out, "unbroken")
    proc, seconds = launcher.run(2, base + ["--out_dir", unbroken])  # the reference, and the betons built
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = {"unbroken": {"seconds": round(seconds, 1), "final": last_final(unbroken)}}

    if "sigterm" in cases:
        run_dir = os.path.join(out, "sigterm")

        def terminate_ranks(proc):
            for rank in [p for p in processes_of(run_dir) if "--local_rank" in " ".join(p.info["cmdline"])]:
                rank.send_signal(signal.SIGTERM)
        case = signal_mid_epoch(launcher, run_dir, base, 3, terminate_ranks)
        proc, _ = launcher.run(2, base + ["--out_dir", run_dir, "--resume"])
        case.update(resume_exit=proc.returncode, resumed=train_lines(proc.stdout, "resum"),
                    log_equals_unbroken=comparable(log_of(run_dir)) == comparable(log_of(unbroken)),
                    final=last_final(run_dir))
        report["sigterm"] = case

    if "torn" in cases:
        run_dir = os.path.join(out, "torn")
        proc, _ = launcher.run(2, base + ["--out_dir", run_dir, "--stop_after_epoch", "3"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        shard = os.path.join(run_dir, "checkpoints", "epoch3", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
        os.truncate(shard, os.path.getsize(shard) // 2)
        proc, _ = launcher.run(2, base + ["--out_dir", run_dir, "--resume"])
        report["torn"] = {"exit": proc.returncode, "lines": train_lines(proc.stdout, "resum"),
                          "resumed_records_equal_unbroken": resumed_tail(run_dir, unbroken),
                          "final": last_final(run_dir)}

    if "ctrlc" in cases:
        run_dir = os.path.join(out, "ctrlc")
        case = signal_mid_epoch(launcher, run_dir, base, 2, lambda proc: os.killpg(proc.pid, signal.SIGINT))
        proc, _ = launcher.run(2, base + ["--out_dir", run_dir, "--resume"])
        case.update(resume_exit=proc.returncode, resumed=train_lines(proc.stdout, "resum"),
                    log_equals_unbroken=comparable(log_of(run_dir)) == comparable(log_of(unbroken)))
        report["ctrlc"] = case

    if "world" in cases:
        for saved_on, resumed_on in ((2, 1), (1, 2)):
            run_dir = os.path.join(out, f"world_{saved_on}_to_{resumed_on}")
            proc, _ = launcher.run(saved_on, base + ["--out_dir", run_dir, "--stop_after_epoch", "2"])
            assert proc.returncode == 0, proc.stderr[-2000:]
            proc, seconds = launcher.run(resumed_on, base + ["--out_dir", run_dir, "--resume"])
            report[f"world_{saved_on}_to_{resumed_on}"] = {
                "exit": proc.returncode, "seconds": round(seconds, 1),
                "lines": train_lines(proc.stdout, "resum", "global batch"),
                "final": last_final(run_dir) if proc.returncode == 0 else proc.stderr[-800:]}

    if "bad" in cases:
        report["bad"] = bad_inputs(launcher, out)

    report["shm_files_left_at_end"] = shm_files()
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)


def bad_inputs(launcher, out):
    """Each mistake once: its exit code, the launcher's error lines, and whether anything else leaked."""
    results = {}

    def attempt(name, config=None, extra=()):
        path = os.path.join(out, f"bad_{name}.json")
        if config is not None:
            with open(path, "w") as f:
                f.write(config if isinstance(config, str) else json.dumps(config))
        args = ["--deepspeed_config", path if config is not None else CONFIG, "--out_dir",
                os.path.join(out, f"bad_{name}"), *extra]
        proc, seconds = launcher.run(2, args)
        output = proc.stdout + proc.stderr
        results[name] = {"exit": proc.returncode, "seconds": round(seconds, 1),
                         "printed": [line for line in output.splitlines() if line.startswith("[train] error")],
                         "traceback": "Traceback" in output, "abort": "terminate called" in output}

    def config():
        with open(CONFIG) as f:
            return json.load(f)
    c = config()
    c["zero_optimisation"] = c.pop("zero_optimization")
    attempt("misspelt_deepspeed_key", c)
    c = config()
    c["train"]["epoch"] = 3
    attempt("misspelt_train_key", c)
    c = config()
    c["scheduler"]["params"]["min_lr"] = "1e-5"
    attempt("number_as_string", c)
    c = config()
    c["scheduler"]["params"]["cooldown_type"] = "linear_decay"
    attempt("unknown_cooldown", c)
    c = config()
    c["train"]["model"] = "resnet_50"
    attempt("unknown_model", c)
    c = config()
    c["train_batch_size"] = 96
    attempt("world_size_cannot_reach_batch", c)
    c = config()
    c["optimizer"]["type"] = "Lamb"
    attempt("lamb_on_zero", c)
    attempt("invalid_json", '{"train_batch_size": 64,')
    attempt("missing_config", None, ["--deepspeed_config", os.path.join(out, "nonexistent.json")])
    attempt("missing_beton", config(), ["--data_dir", out])
    attempt("resume_without_checkpoint", config(), ["--resume"])
    corrupt = os.path.join(out, "corrupt")
    os.makedirs(corrupt, exist_ok=True)
    with open(os.path.join(corrupt, "train.beton"), "wb") as f:
        f.write(os.urandom(4096))
    shutil.copy(os.path.join(BETONS, "val.beton"), corrupt)
    attempt("corrupt_beton", config(), ["--data_dir", corrupt])
    return results


if __name__ == "__main__":
    sys.exit(main())
