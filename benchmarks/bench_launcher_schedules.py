"""AutoWU against DeepSpeed's own warmup-cosine at a grid of peak LRs, on the path users run.

Each run is the main job: ``deepspeed --num_gpus 2 launch/train.py`` on the embedded digits default (timm's
``test_resnet``, ZeRO-1, autowu's AdamP, 2 CPU ranks, 30 epochs), with

- ``ds_configs/cpu_digits.json``: AutoWU's default (it picks the warmup and the peak LR);
- ``ds_configs/cpu_digits_cosine.json`` with its AdamP ``lr`` set to each peak of the grid: DeepSpeed's
  ``WarmupCosineLR`` (linear warmup over the launcher's "auto" share of the run, cosine to 0): the tuned
  reference a DeepSpeed user would sweep;
- ``autowu_no_rollback``: ``cpu_digits.json`` with ``"rollback": false`` in AutoWU's params: the default as it was
  before 2026-11-30, without the training state put back at the switch (``autowu.rollback.EngineRollback``); in
  ``results/launcher_schedules.json``, made before, ``autowu`` is this;
- ``rerun``: the ``warmup_cosine.json`` an AutoWU run writes (that schedule at the peak AutoWU found), as a user
  trains the recipe again: seed s runs the file of the AutoWU run of the next seed in ``--seeds`` (cyclically),
  so its peak was found on another initialisation and data order.

``--batch_scale 4`` runs all of them at 4 times the configs' batch (``train_batch_size`` and the micro batch; the
same epochs, so a quarter of the steps).

Every run for each ``--seeds`` (the launcher's ``--seed``: model initialisation and data order). Reports the
final top-1 (359 validation images: one image is 0.28 points) per run, the mean per method and the gap of
AutoWU to the best grid point, and writes them with ``--out``.

    .venv/bin/python benchmarks/bench_launcher_schedules.py --seeds 0,1 --out benchmarks/results/launcher_schedules.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = [0.001, 0.003, 0.006, 0.01, 0.03, 0.1]


def run(config_path, seed, out_dir):
    """One main job; returns its final record from log.jsonl."""
    cmd = [os.path.join(REPO, ".venv", "bin", "deepspeed"), "--num_gpus", "2", os.path.join(REPO, "launch", "train.py"),
           "--deepspeed_config", config_path, "--seed", str(seed), "--out_dir", out_dir]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        final = [json.loads(line) for line in f if '"kind": "final"' in line][-1]
    final["seconds"] = time.perf_counter() - started
    return final


def scaled(config, batch_scale):
    """The config at ``batch_scale`` times its batch: the global batch and the micro batch (same ranks, no more
    accumulation; ``train.data_config`` is read relative to the repository wherever the config is written)."""
    config["train_batch_size"] *= batch_scale
    config["train_micro_batch_size_per_gpu"] *= batch_scale
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--grid", default=",".join(map(str, GRID)))
    parser.add_argument("--methods", default="autowu,rerun,warmup_cosine")
    parser.add_argument("--reuse", default=None,
                        help="a JSON written by --out whose runs of the methods not run now are taken over")
    parser.add_argument("--batch_scale", type=int, default=1,
                        help="every run at this many times the configs' batch, for the same epochs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.batch_scale < 1:
        parser.error(f"--batch_scale must be a positive integer, got {args.batch_scale}")
    methods, seeds = args.methods.split(","), list(map(int, args.seeds.split(",")))
    known = {"autowu", "autowu_no_rollback", "rerun", "warmup_cosine"}
    if set(methods) - known:
        parser.error(f"unknown methods {sorted(set(methods) - known)}")
    if "rerun" in methods and ("autowu" not in methods or len(seeds) < 2):
        parser.error("rerun needs the autowu runs of this invocation and at least 2 seeds")
    with open(os.path.join(REPO, "ds_configs", "cpu_digits_cosine.json")) as f:
        cosine = scaled(json.load(f), args.batch_scale)
    with open(os.path.join(REPO, "ds_configs", "cpu_digits.json")) as f:
        autowu = scaled(json.load(f), args.batch_scale)
    no_rollback = json.loads(json.dumps(autowu))
    no_rollback["scheduler"]["params"]["rollback"] = False
    batch_size = autowu["train_batch_size"]
    results = []

    def record(method, peak, seed, final, **extra):
        result = {"method": method, "peak_lr": peak if peak is not None else final.get("peak_lr"), "seed": seed,
                  "top1": final["top1"] * 100, "switch_step": final.get("switch_step"),
                  "seconds": final["seconds"], "batch_size": batch_size, **extra}
        results.append(result)
        print(f"seed {seed} {method} peak {result['peak_lr']:.3g}: top-1 {result['top1']:.2f} "
              f"({result['seconds']:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        rerun_configs = {}
        autowu_path = os.path.join(tmp, "autowu.json")
        with open(autowu_path, "w") as f:
            json.dump(autowu, f)
        for seed in seeds:
            jobs = []
            if "autowu" in methods:
                jobs.append(("autowu", None, autowu_path))
            if "autowu_no_rollback" in methods:
                path = os.path.join(tmp, "no_rollback.json")
                with open(path, "w") as f:
                    json.dump(no_rollback, f)
                jobs.append(("autowu_no_rollback", None, path))
            for peak in map(float, args.grid.split(",") if "warmup_cosine" in methods else []):
                config = json.loads(json.dumps(cosine))
                config["optimizer"]["params"]["lr"] = peak
                path = os.path.join(tmp, f"cosine_{peak:g}.json")
                with open(path, "w") as f:
                    json.dump(config, f)
                jobs.append(("warmup_cosine", peak, path))
            for method, peak, path in jobs:
                out_dir = os.path.join(tmp, f"{method}_{peak}_{seed}")
                final = run(path, seed, out_dir)
                if method == "autowu" and final.get("rerun_config"):  # its name in the run directory
                    rerun_configs[seed] = os.path.join(out_dir, final["rerun_config"])
                record(method, peak, seed, final)
        if "rerun" in methods:
            for i, seed in enumerate(seeds):
                found_by = seeds[(i + 1) % len(seeds)]
                path = rerun_configs.get(found_by)
                if path is None:
                    raise RuntimeError(f"the AutoWU run of seed {found_by} did not switch: no rerun config")
                with open(path) as f:
                    peak = json.load(f)["optimizer"]["params"]["lr"]
                record("rerun", peak, seed, run(path, seed, os.path.join(tmp, f"rerun_{seed}")),
                       peak_found_by_seed=found_by)
    if args.reuse:
        with open(args.reuse) as f:
            results += [r for r in json.load(f)["results"] if r["method"] not in methods]
    grid = {}
    for r in results:
        if r["method"] == "warmup_cosine":
            grid.setdefault(r["peak_lr"], []).append(r["top1"])
    grid_means = {peak: statistics.mean(v) for peak, v in grid.items()}
    best = max(grid_means, key=grid_means.get) if grid_means else None
    autowu = {r["seed"]: r["top1"] for r in results if r["method"] == "autowu"}
    reruns = {r["seed"]: r["top1"] for r in results if r["method"] == "rerun"}
    summary = {"batch_size": batch_size, "grid_means": {f"{k:g}": v for k, v in sorted(grid_means.items())}, "best_grid_peak": best,
               "grid_seeds": sorted({r["seed"] for r in results if r["method"] == "warmup_cosine"}),
               "best_grid_top1": grid_means.get(best), "autowu_mean_top1": statistics.mean(autowu.values()),
               "autowu_per_seed": autowu,
               "autowu_gap_to_best_grid": grid_means[best] - statistics.mean(autowu.values()) if grid else None}
    without = {r["seed"]: r["top1"] for r in results if r["method"] == "autowu_no_rollback"}
    if without:
        diffs = [autowu[s] - without[s] for s in without if s in autowu]
        summary.update(no_rollback_mean_top1=statistics.mean(without.values()), no_rollback_per_seed=without,
                       autowu_minus_no_rollback=statistics.mean(diffs) if diffs else None,
                       autowu_minus_no_rollback_paired_se=(statistics.stdev(diffs) / len(diffs) ** 0.5
                                                           if len(diffs) > 1 else None))
    if reruns:
        diffs = [reruns[s] - autowu[s] for s in reruns if s in autowu]
        summary.update(rerun_mean_top1=statistics.mean(reruns.values()), rerun_per_seed=reruns,
                       rerun_minus_autowu=statistics.mean(diffs),
                       rerun_minus_autowu_paired_se=(statistics.stdev(diffs) / len(diffs) ** 0.5
                                                     if len(diffs) > 1 else None))
    print(json.dumps(summary, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"results": results, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
