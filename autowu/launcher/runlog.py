"""A run's output, in one rank-aware place: the console lines, the progress bar, ``log.jsonl`` and DeepSpeed's
monitors (TensorBoard, CSV). Every rank may call every method; only global rank 0 writes."""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Iterable, Optional, Tuple

import torch.distributed as dist


class RunLog:
    def __init__(self, out_dir: Optional[str] = None):
        self.is_writer = not dist.is_initialized() or dist.get_rank() == 0
        self.out_dir = out_dir
        # JSON lines, flushed at once so that a crash loses nothing.
        self.file = (open(os.path.join(out_dir, "log.jsonl"), "a", encoding="utf-8")
                     if out_dir and self.is_writer else None)
        self.monitor = None   # DeepSpeed's MonitorMaster, once there is an engine

    def line(self, message: str) -> None:
        """One console line from rank 0, above the progress bar if one is showing."""
        if self.is_writer:
            from tqdm import tqdm
            tqdm.write(f"[train] {message}", file=sys.stdout)
            sys.stdout.flush()

    def record(self, kind: str, **fields) -> None:
        """One ``log.jsonl`` line."""
        if self.file:
            self.file.write(json.dumps({"kind": kind, **fields}) + "\n")
            self.file.flush()

    def scalars(self, events: Iterable[Tuple[str, float, int]]) -> None:
        """(name, value, step) events for DeepSpeed's monitors."""
        if self.is_writer and self.monitor is not None:
            self.monitor.write_events(list(events))

    def progress_bar(self, total: int, description: str):
        """Rank 0's bar on a terminal only, cleared when closed: a log file gets the epoch's line alone."""
        from tqdm import tqdm
        return tqdm(total=total, desc=description, leave=False, disable=not self.is_writer or not sys.stdout.isatty(),
                    dynamic_ncols=True, file=sys.stdout)

    def write_run_config(self, resolved: Dict) -> None:
        if self.is_writer and self.out_dir:
            with open(os.path.join(self.out_dir, "run_config.json"), "w", encoding="utf-8") as f:
                json.dump(resolved, f, indent=1, default=str)

    def autowu_tests(self, scheduler, already_logged: int) -> int:
        """Log AutoWU's tests since ``already_logged`` (and the switch, with the GP's curve); return the count."""
        for test in scheduler.history[already_logged:]:
            self.record("autowu_test", **test)
            self.scalars((f"AutoWU/{k}", float(test[k]), test["step"])
                         for k in ("probability", "votes", "argmin_lr", "passed", "switched"))
            if test["switched"]:
                self.line(f"AutoWU switched at step {test['step']} (epoch {test['epoch']:.1f}): peak LR "
                          f"{scheduler.peak_lr:.4g}" + (" (warmup cap)" if test["at_cap"] else "")
                          + (f"; training state of step {test['rolled_back_to']} put back"
                             if test.get("rolled_back_to") is not None else ""))
                curve = scheduler.switch_curve or {"step": test["step"]}  # none when the GP had failed
                self.record("autowu_switch", **curve, peak_lr=scheduler.peak_lr,
                            total_steps=scheduler.total_steps)
        return len(scheduler.history)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
