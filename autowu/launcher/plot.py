"""A run's picture: LR and training loss against step, the GP's predicted curve at the switch, the tests.

Reads the ``log.jsonl`` that ``launch/train.py`` writes (``launch/plot_run.py`` is the command).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

import numpy as np

from ..errors import MissingFileError


def read_log(path: str) -> Dict[str, List[dict]]:
    if not os.path.isfile(path):
        raise MissingFileError(f"no run log at {path} (launch/train.py writes log.jsonl in its run directory)")
    records: Dict[str, List[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise MissingFileError(f"{path}:{number}: not a JSON line ({err})") from None
            records.setdefault(record.get("kind", "unknown"), []).append(record)
    return records


def plot_run(run_dir: str, out_path: Optional[str] = None, title: Optional[str] = None) -> str:
    """Draw ``run_dir/log.jsonl`` into a PNG (default ``run_dir/autowu.png``); return its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(os.path.join(run_dir, "log.jsonl"))
    train = records.get("train", [])
    if not train:
        raise MissingFileError(f"{run_dir}/log.jsonl has no training records yet")
    switch = records.get("autowu_switch", [None])[-1]
    tests = records.get("autowu_test", [])
    val = records.get("val", [])
    out_path = out_path or os.path.join(run_dir, "autowu.png")

    fig, (ax_lr, ax_loss, ax_test) = plt.subplots(3, 1, figsize=(10, 10), sharex=True,
                                                  gridspec_kw={"height_ratios": [1, 1.6, 1]})
    steps = np.array([r["step"] for r in train])
    ax_lr.plot(steps, [r["lr"] for r in train], color="tab:blue", lw=1.5, label="LR (logged)")
    if switch:
        warm_steps = np.arange(switch["step"])
        warm_lrs = np.interp(warm_steps, np.array(switch["x"]) * switch["step"], switch["lr"])
        ax_lr.plot(warm_steps, warm_lrs, color="tab:blue", lw=1.5)
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")

    if switch:
        n = switch["step"]
        losses = np.array(switch["losses"], dtype=float)
        usable = np.array(switch["usable"], dtype=bool)
        x_steps = np.arange(n)
        ax_loss.plot(x_steps[usable], losses[usable], ".", ms=2, color="0.55", label="training loss (rank mean)")
        if (~usable & np.isfinite(losses)).any():
            ax_loss.plot(x_steps[~usable & np.isfinite(losses)], losses[~usable & np.isfinite(losses)], "x",
                         color="tab:red", ms=4, label="left out (spike)")
        grid_steps = np.array(switch["x"]) * n
        mean, std = np.array(switch["mean"]), np.array(switch["std"])
        ax_loss.plot(grid_steps, mean, color="tab:orange", lw=2, label="GP predicted curve at the switch")
        ax_loss.fill_between(grid_steps, mean - 2 * std, mean + 2 * std, color="tab:orange", alpha=0.25)
        best = int(np.argmin(mean))
        ax_loss.plot(grid_steps[best], mean[best], "v", color="tab:green", ms=10,
                     label=f"predicted minimum (LR {switch['lr'][best]:.3g})")
    interval_losses = np.array([r["loss"] for r in train], dtype=float)
    ax_loss.plot(steps, interval_losses, color="tab:purple", lw=1.2, label="training loss (interval mean)")
    if switch and usable.any():  # leave out the divergence's extremes, keep everything else in view
        top = max(np.nanpercentile(losses[usable], 99.5), np.nanmax(interval_losses))
        bottom = min(np.nanmin(losses[usable]), mean.min(), np.nanmin(interval_losses))
        if math.isfinite(top) and math.isfinite(bottom):
            ax_loss.set_ylim(bottom - 0.05 * (top - bottom), top + 0.1 * (top - bottom))
    ax_loss.set_ylabel("training loss")

    if tests:
        ax_test.plot([t["step"] for t in tests], [t["probability"] for t in tests], "o-", color="tab:orange",
                     ms=4, label="AutoWU test: P(minimum passed), median of 5 fits")
        confidence = 0.95
        ax_test.axhline(confidence, color="tab:orange", ls=":", lw=1, label="confidence 0.95")
    ax_test.set_ylim(-0.02, 1.02)
    ax_test.set_ylabel("probability")
    ax_test.set_xlabel("optimizer step")
    if val:
        ax_val = ax_test.twinx()
        ax_val.plot([v["step"] for v in val], [100 * v["top1"] for v in val], "s-", color="tab:green", ms=3,
                    label="val top-1 (%)")
        ax_val.set_ylabel("val top-1 (%)")
        ax_val.legend(loc="lower right", fontsize=8)

    for ax in (ax_lr, ax_loss, ax_test):
        if switch:
            ax.axvline(switch["step"], color="tab:red", ls="--", lw=1)
        ax.grid(alpha=0.3)
    if switch:
        ax_lr.annotate(f"switch at step {switch['step']}\npeak LR {switch['peak_lr']:.3g}",
                       xy=(switch["step"], switch["peak_lr"]), xytext=(10, -30), textcoords="offset points",
                       color="tab:red", fontsize=9, arrowprops={"arrowstyle": "->", "color": "tab:red"})
    ax_lr.legend(loc="upper left", fontsize=8)
    ax_loss.legend(loc="upper left", fontsize=8)
    ax_test.legend(loc="center left", fontsize=8)
    final = records.get("final", [{}])[-1]
    headline = title or os.path.basename(os.path.normpath(run_dir))
    if final.get("top1") is not None:
        headline += f" - final top-1 {100 * final['top1']:.2f}%"
    fig.suptitle(headline)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
