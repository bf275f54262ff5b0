"""The GP test: autowu's weight-space computation against the paper's procedure in plain gpytorch.

Both run the same test on the same synthetic loss curves, with the same subsampling draws and the same
carried-over hyperparameter state, test after test as a warmup would (one test an epoch). The paper's
procedure: gpytorch ExactGP in float32 (as the paper's code), 100 Adam steps on 100 points, 5 predictions
of 500 x 500 covariances from 500 points each. Reports the mean time per test and whether every decision
(pass/fail of each test) agrees.

    .venv/bin/python benchmarks/bench_gp.py
"""
import os
import time

import numpy as np
import torch

from autowu.gp import GPHyperparameters, PastMinimumTest
from autowu.gp_gpytorch import GPyTorchPastMinimumTest
from autowu.spikes import usable_losses
from autowu.synthetic import LossCurve, exponential_warmup_lrs

CURVES = {"default": LossCurve(), "noisy": LossCurve(noise=0.1),
          "early": LossCurve(learn_at=-4.0, explode_at=-2.5, noise=0.01),
          "no_minimum": LossCurve(blowup=0.0, learn_at=-1.5)}


def run(test, losses, steps_per_epoch):
    hyper = GPHyperparameters.initial(test.settings)
    generator = torch.Generator().manual_seed(0)
    seconds, decisions = [], []
    for n in range(steps_per_epoch, len(losses) + 1, steps_per_epoch):
        y = losses[:n]
        start = time.perf_counter()
        result, hyper = test(y, np.isfinite(y), hyper, generator)
        seconds.append(time.perf_counter() - start)
        decisions.append(result.passed)
    return np.array(seconds), decisions


def main():
    torch.set_num_threads(os.cpu_count())
    fast, paper = PastMinimumTest(), GPyTorchPastMinimumTest(dtype=torch.float32)
    run(fast, LossCurve().sample(exponential_warmup_lrs(200, 200)), 100)  # numba compiles the fit once
    warmup_steps, steps_per_epoch = 5000, 100  # 50 tests, up to 5,000 losses
    print(f"{os.cpu_count()} cores, torch {torch.__version__}; {warmup_steps // steps_per_epoch} tests a curve")
    totals = {"fast": [], "paper": []}
    all_agree = True
    for name, curve in CURVES.items():
        losses = curve.sample(exponential_warmup_lrs(warmup_steps, warmup_steps), seed=1)
        t_fast, d_fast = run(fast, losses, steps_per_epoch)
        t_paper, d_paper = run(paper, losses, steps_per_epoch)
        agree = d_fast == d_paper
        all_agree &= agree
        totals["fast"].append(t_fast)
        totals["paper"].append(t_paper)
        print(f"{name:>11}: paper {t_paper.mean() * 1e3:7.1f} ms/test, autowu {t_fast.mean() * 1e3:6.2f} ms/test, "
              f"ratio {t_paper.mean() / t_fast.mean():5.1f}x, decisions agree: {agree} "
              f"({sum(d_fast)} passes)")
    fast_all, paper_all = np.concatenate(totals["fast"]), np.concatenate(totals["paper"])
    print(f"overall: paper {paper_all.mean() * 1e3:.1f} ms/test, autowu {fast_all.mean() * 1e3:.2f} ms/test "
          f"({fast_all.mean() / paper_all.mean():.3f} of the paper's time, {paper_all.mean() / fast_all.mean():.1f}x); "
          f"all decisions agree: {all_agree}")
    losses = LossCurve().sample(exponential_warmup_lrs(14000, 14000), seed=2, spike_rate=0.02)
    start = time.perf_counter()
    for _ in range(5):
        usable_losses(losses)
    print(f"spike filter on 14,000 losses (ImageNet 4K's longest warmup): {(time.perf_counter() - start) / 5 * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
