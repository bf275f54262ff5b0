"""The table of AutoWU variants and diagnostics in ``benchmarks/RESULTS.md`` (issue 19), from their runs.

``results/schedule_variants.json`` holds each variant's runs (top-1, peak LR, switch epoch per task and seed; how
each was run is in its ``args``); each is paired by seed with the runs of the default they were measured against,
the default before it rolled back (``no_rollback`` in ``results/schedules.json``). A cell: the variant's mean
top-1 minus that default's (paired standard error); for AutoWU variants also the geometric mean of its peak LR over
the default's, and its median switch as a share of the run.

    .venv/bin/python benchmarks/variants_table.py
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from bench_schedules import TASKS, paired

RESULTS = Path(__file__).resolve().parent / "results"


def cell(runs, defaults, with_schedule: bool) -> str:
    mean, se = paired({r["seed"]: r["top1"] for r in runs}, {s: d["top1"] for s, d in defaults.items()})
    text = f"{mean:+.2f} ({se:.2f})"
    if with_schedule:
        ratio = math.exp(statistics.mean(math.log(r["peak_lr"] / defaults[r["seed"]]["peak_lr"]) for r in runs))
        switch = statistics.median(100 * r["switch_epoch"] / defaults[r["seed"]]["epochs"] for r in runs)
        text += f", x{ratio:.2f}, {switch:.1f}%"
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=str(RESULTS / "schedule_variants.json"))
    parser.add_argument("--defaults", default=str(RESULTS / "schedules.json"))
    args = parser.parse_args()
    defaults = {}
    for r in json.loads(Path(args.defaults).read_text())["results"]:
        if r["method"] == "no_rollback":   # what the variants were measured against (before the default rolled back)
            defaults.setdefault(r["task"], {})[r["seed"]] = r
    print("| variant | " + " | ".join(TASKS) + " |")
    print("|---|" + "---|" * len(TASKS))
    for variant in json.loads(Path(args.variants).read_text())["variants"]:
        cells = []
        for task in TASKS:
            runs = [r for r in variant["runs"] if r["task"] == task]
            cells.append(cell(runs, defaults[task], variant["method"] == "default") if runs else "")
        print(f"| {variant['name']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
