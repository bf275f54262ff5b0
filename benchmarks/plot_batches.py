"""The batch axis in two pictures, drawn from stored runs of ``bench_schedules.py --batches 1,4,16``.

- ``peaks``: AutoWU's peak LR (the default's median over seeds, its range as a bar) against the best peak of the
  warmup-cosine grid, log-log, one line a task through its three batches; the diagonal is "the same peak", the
  band around it a factor of 2.
- ``top1``: mean top-1 against batch size for every method, one panel a task (the grid's best point, AutoWU's
  default and paper modes, schedule-free, Prodigy); a mean below the panel's range is marked at its floor.
  ``--before``: the default's runs from an earlier version, drawn dashed beside it.

    .venv/bin/python benchmarks/plot_batches.py benchmarks/results/schedules_batches.json \
        --before benchmarks/results/schedules_batches_default_before.json --out docs/figures/batches.png
"""
import argparse
import os
from typing import Dict, List

from bench_schedules import PEAK_FACTOR_GOAL, label, load_runs, summarise  # a script beside it: its folder is on the path

METHOD_STYLE = {  # label, colour, marker
    "grid": ("warmup-cosine, best of the grid", "black", "s"),
    "default": ("AutoWU (default)", "tab:blue", "o"),
    "paper": ("AutoWU (paper's mode)", "tab:orange", "v"),
    "schedulefree": ("schedule-free", "tab:green", "^"),
    "prodigy": ("Prodigy + cosine", "tab:red", "D"),
}


def by_task(summary: Dict) -> Dict[str, List[Dict]]:
    """Each task's entries, in batch order."""
    tasks: Dict[str, List[Dict]] = {}
    for entry in summary.values():
        if entry.get("best_grid_lr") is not None:
            tasks.setdefault(entry["task"], []).append(entry)
    return {t: sorted(es, key=lambda e: e["batch_size"]) for t, es in tasks.items() if len(es) > 1}


def draw(summary: Dict, out: str, before: Dict = None, before_label: str = "AutoWU (default), before") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = by_task(summary)
    if not tasks:
        raise SystemExit("no task has runs at more than one batch: run bench_schedules.py with --batches 1,4,16")
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(5 + 4 * len(tasks), 4.4))
    ax = axes[0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lows, highs = [], []
    for i, (task, entries) in enumerate(tasks.items()):
        xs = [e["best_grid_lr"] for e in entries]
        d = [e["methods"]["default"] for e in entries]
        ys = [m["median_peak_lr"] for m in d]
        err = [[y - m["peak_lr_range"][0] for y, m in zip(ys, d)], [m["peak_lr_range"][1] - y for y, m in zip(ys, d)]]
        ax.errorbar(xs, ys, yerr=err, color=colours[i], marker="o", capsize=3, label=task)
        for x, y, e in zip(xs, ys, entries):
            ax.annotate(f"{e['batch_size']}", (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7,
                        color=colours[i])
            if not e["best_grid_inside"]:  # the grid's best at its end: the optimum is not resolved
                ax.scatter([x], [y], s=120, facecolors="none", edgecolors="grey")
        lows += xs + [m["peak_lr_range"][0] for m in d]
        highs += xs + [m["peak_lr_range"][1] for m in d]
    lo, hi = min(lows) / 2, max(highs) * 2
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="same peak")
    ax.fill_between([lo, hi], [lo / PEAK_FACTOR_GOAL, hi / PEAK_FACTOR_GOAL], [lo * PEAK_FACTOR_GOAL, hi * PEAK_FACTOR_GOAL],
                    color="grey", alpha=0.15, label=f"within {PEAK_FACTOR_GOAL:g}x")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="grid's best peak LR",
           ylabel="AutoWU's peak LR (median, range over seeds)",
           title="peak LR across batch sizes (labels: batch)")
    ax.legend(fontsize=7, loc="upper left")
    for ax, (task, entries) in zip(axes[1:], tasks.items()):
        batches = [e["batch_size"] for e in entries]
        series = {"grid": [e["best_grid_top1"] for e in entries]}
        for method in ("default", "paper", "schedulefree", "prodigy"):
            if all(method in e["methods"] for e in entries):
                series[method] = [e["methods"][method]["mean_top1"] for e in entries]
        earlier = [before.get(label(e["task"], e["batch_scale"]), {}).get("methods", {}).get("default")
                   for e in entries] if before else []
        if earlier and all(earlier):
            series["before"] = [m["mean_top1"] for m in earlier]
        # the panel's range: the grid, the default and the rivals (a method that diverged is marked at the floor)
        kept = [v for m, vs in series.items() if m not in ("paper", "before") for v in vs]
        floor, top = min(kept) - 1.0, max(kept) + 0.5
        for method, values in series.items():
            name, colour, marker = METHOD_STYLE[method] if method != "before" else (before_label, "tab:blue", "o")
            shown = [max(v, floor) for v in values]
            style = dict(ls="--", alpha=0.5, mfc="none") if method == "before" else {}
            ax.plot(batches, shown, color=colour, marker=marker, label=name, **style)
            for b, v in zip(batches, values):
                if v < floor:
                    ax.annotate(f"{v:.0f}%", (b, floor), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=colour)
        ax.set(xscale="log", ylim=(floor - 0.2, top), xlabel="batch size", ylabel="test top-1 (%), mean over seeds",
               title=task)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="JSONs written by bench_schedules.py --out")
    parser.add_argument("--before", default=None, help="runs of an earlier default (drawn dashed)")
    parser.add_argument("--out", default="docs/figures/batches.png")
    args = parser.parse_args()
    for path in args.runs + ([args.before] if args.before else []):
        if not os.path.exists(path):
            raise SystemExit(f"no such file: {path}")
    before = summarise(load_runs([args.before])) if args.before else None
    print(draw(summarise(load_runs(args.runs)), args.out, before))


if __name__ == "__main__":
    main()
