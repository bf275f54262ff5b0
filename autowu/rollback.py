"""Taking the training state back, at the switch, to before the LR passed the peak (``AutoWU(rollback=True)``).

The GP test can only see the loss curve's minimum once the loss has risen past it, so by the switch the ramp has
run the LR well past the peak it then switches to (on the benchmark's digits_cnn_adamp: 3.2x, median over 20
seeds) and, with ``hold``, trained there while the pass was confirmed. On that task AutoWU's own ramp to its own
peak at its own switch step, never going past it, scored 0.29 points more (``benchmarks/RESULTS.md``, issue 19):
the overshoot, not the search's length, is what the run pays. This object keeps the training state at each GP
test of the warmup and, at the switch, puts back the latest one whose LR was at most the peak: the run goes on
from the weights it had before the overshoot, at the peak, with the decisions (switch step, peak) unchanged.

What a snapshot holds: every parameter of the optimizer's param groups, the optimizer's per-parameter state
(moments, step counts) and the buffers of the modules given (BatchNorm's running statistics), copied to host
memory. Snapshots only ever grow in LR: one taken at a lower LR than an older one makes the older one useless
(any peak at or above the older one's LR is also at or above the newer one's, and the newer one is later), so
the older is dropped; at most ``keep`` are held.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import torch


class SwitchRollback:
    def __init__(self, optimizer: torch.optim.Optimizer, modules: Sequence[torch.nn.Module], keep: int = 6):
        if int(keep) != keep or keep < 1:
            raise ValueError(f"AutoWU: rollback_keep must be a positive integer, got {keep!r}")
        self.optimizer = optimizer
        self.modules = list(modules)
        self.keep = int(keep)
        self.snapshots: List[Dict] = []   # oldest first; LRs strictly increasing

    def _params(self) -> List[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _buffers(self) -> List[torch.Tensor]:
        return [b for module in self.modules for b in module.buffers()]

    def take(self, step: int, lr: float) -> None:
        """Keep the state after optimizer step ``step``, trained at LRs up to ``lr``."""
        self.snapshots = [s for s in self.snapshots if s["lr"] < lr]
        state = self.optimizer.state_dict()["state"]
        self.snapshots.append({
            "step": int(step), "lr": float(lr),
            "params": [p.detach().to("cpu", copy=True) for p in self._params()],
            "optimizer_state": {k: {n: v.to("cpu", copy=True) if torch.is_tensor(v) else copy.deepcopy(v)
                                    for n, v in s.items()} for k, s in state.items()},
            "buffers": [b.detach().to("cpu", copy=True) for b in self._buffers()],
        })
        del self.snapshots[:-self.keep]

    @torch.no_grad()
    def restore(self, peak_lr: float) -> Optional[int]:
        """Put back the latest snapshot taken at an LR at most ``peak_lr``; return its step (None: none was, and
        nothing changed). The snapshots are dropped either way: a run switches once."""
        usable = [s for s in self.snapshots if s["lr"] <= peak_lr * (1 + 1e-9)]
        self.snapshots = []
        if not usable:
            return None
        snapshot = usable[-1]
        for p, saved in zip(self._params(), snapshot["params"]):
            p.copy_(saved)
        for b, saved in zip(self._buffers(), snapshot["buffers"]):
            b.copy_(saved)
        # The optimizer's own loading casts the state to each parameter's device and dtype; the param groups
        # (and so the LR the scheduler set) are the current ones.
        current = self.optimizer.state_dict()
        current["state"] = snapshot["optimizer_state"]
        self.optimizer.load_state_dict(current)
        return snapshot["step"]

    def state_dict(self) -> Dict:
        return {"keep": self.keep, "snapshots": self.snapshots}

    def load_state_dict(self, state: Dict) -> None:
        self.snapshots = list(state["snapshots"])
