"""AutoWU against DeepSpeed's own warmup-cosine at a grid of peak LRs, on the path users run.

Each run is the main job: ``deepspeed --num_gpus 2 launch/train.py`` on the embedded digits default (timm's
``test_resnet``, ZeRO-1, autowu's AdamP, 2 CPU ranks, 30 epochs), with

- ``ds_configs/cpu_digits.json``: AutoWU's default (it picks the warmup and the peak LR);
- ``ds_configs/cpu_digits_cosine.json`` with its AdamP ``lr`` set to each peak of the grid: DeepSpeed's
  ``WarmupCosineLR`` (linear warmup over the launcher's "auto" share of the run, cosine to 0): the tuned
  reference a DeepSpeed user would sweep.

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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--grid", default=",".join(map(str, GRID)))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with open(os.path.join(REPO, "ds_configs", "cpu_digits_cosine.json")) as f:
        cosine = json.load(f)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, args.seeds.split(",")):
            jobs = [("autowu", None, os.path.join(REPO, "ds_configs", "cpu_digits.json"))]
            for peak in map(float, args.grid.split(",")):
                config = json.loads(json.dumps(cosine))
                config["optimizer"]["params"]["lr"] = peak
                path = os.path.join(tmp, f"cosine_{peak:g}.json")
                with open(path, "w") as f:
                    json.dump(config, f)
                jobs.append(("warmup_cosine", peak, path))
            for method, peak, path in jobs:
                final = run(path, seed, os.path.join(tmp, f"{method}_{peak}_{seed}"))
                result = {"method": method, "peak_lr": peak if peak is not None else final.get("peak_lr"),
                          "seed": seed, "top1": final["top1"] * 100, "switch_step": final.get("switch_step"),
                          "seconds": final["seconds"]}
                results.append(result)
                print(f"seed {seed} {method} peak {result['peak_lr']:.3g}: top-1 {result['top1']:.2f} "
                      f"({result['seconds']:.0f} s)", flush=True)
    grid = {}
    for r in results:
        if r["method"] == "warmup_cosine":
            grid.setdefault(r["peak_lr"], []).append(r["top1"])
    grid_means = {peak: statistics.mean(v) for peak, v in grid.items()}
    best = max(grid_means, key=grid_means.get)
    autowu = [r["top1"] for r in results if r["method"] == "autowu"]
    summary = {"grid_means": {f"{k:g}": v for k, v in sorted(grid_means.items())}, "best_grid_peak": best,
               "best_grid_top1": grid_means[best], "autowu_mean_top1": statistics.mean(autowu),
               "autowu_per_seed": autowu, "autowu_gap_to_best_grid": grid_means[best] - statistics.mean(autowu)}
    print(json.dumps(summary, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"results": results, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
