"""Taking the training state back, at the switch, to before the LR passed the peak (``AutoWU(rollback=True)``).

The GP test can only see the loss curve's minimum once the loss has risen past it, so by the switch the ramp has
run the LR past the peak it then switches to and, with ``hold``, trained there while the pass was confirmed: the
overshoot, not the search's length, is what the run pays (``benchmarks/RESULTS.md``). This object keeps the
training state at each GP
test of the warmup and, at the switch, puts back the latest one whose LR was at most the peak: the run goes on
from the weights it had before the overshoot, at the peak, with the decisions (switch step, peak) unchanged.

What a snapshot holds: every parameter of the optimizer's param groups, the optimizer's per-parameter state
(moments, step counts) and the buffers of the modules given (BatchNorm's running statistics), copied to host
memory. Snapshots only ever grow in LR: one taken at a lower LR than an older one makes the older one useless
(any peak at or above the older one's LR is also at or above the newer one's, and the newer one is later), so
the older is dropped; at most ``keep`` are held.

Under DeepSpeed (``EngineRollback``) the state is each rank's own: its fp32 master partition and the client
optimizer's state for it (ZeRO-1/2), and the module's buffers. Each rank keeps its snapshots and writes them
beside its checkpoint shards; the scheduler's state, saved from rank 0 and loaded by every rank, names only
which snapshots there are.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .errors import ConfigError, MissingFileError, UserError


class SwitchRollback:
    def __init__(self, optimizer: torch.optim.Optimizer, modules: Sequence[torch.nn.Module], keep: int = 6):
        # ``keep`` is AutoWU's rollback_keep, checked where it is declared (``autowu.options``)
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


ROLLBACK_FILE = "autowu_rollback_rank{rank}.pt"


class EngineRollback(SwitchRollback):
    """``SwitchRollback`` for a DeepSpeed engine (``"rollback": true`` in the config's AutoWU params).

    What each rank snapshots is what its client optimizer steps: under ZeRO-1/2 the fp32 master partition (the
    parameter of each of its param groups) and the optimizer's state for it, and, without ZeRO in fp32, the
    module's parameters themselves; with the module's buffers. After a restore under ZeRO the model's 16-bit
    (or, in fp32, working) copies are rebuilt from the restored partitions as ZeRO's own step ends, each rank
    copying its partition and all ranks gathering (``update_lp_params``): every rank restores at the same step,
    since the switch is decided once and broadcast.

    Checkpoints: ``state_dict`` names the snapshots' steps and the world size; the snapshots themselves go to
    ``save_rank_file`` (one file a rank, in the checkpoint's folder) and come back by ``load_rank_file``.
    """

    def __init__(self, engine, keep: int = 6):
        optimizer, zero = engine.basic_optimizer, engine.optimizer
        if engine.zero_optimization_stage() >= 3:  # its module parameters are placeholders; not mapped here
            raise ConfigError("AutoWU rollback: ZeRO stage 3 is not supported; use \"zero_optimization\": "
                             "{\"stage\": 1} or 2, or set \"rollback\": false in the scheduler params")
        # ZeRO-1/2's optimizer and the bf16 optimizer rebuild their 16-bit weights from the client's partitions
        self.zero = zero if hasattr(zero, "update_lp_params") else None
        if self.zero is None:
            module_params = {id(p) for p in engine.module.parameters()}
            stepped = [p for group in optimizer.param_groups for p in group["params"]]
            if not all(id(p) in module_params for p in stepped):
                raise ConfigError(
                    f"AutoWU rollback: the engine's optimizer ({type(zero).__name__}) keeps master weights autowu "
                    "cannot put back (it knows ZeRO stage 1 and 2, and fp32 without ZeRO); use "
                    "\"zero_optimization\": {\"stage\": 1} or 2, or set \"rollback\": false in the scheduler params")
        super().__init__(optimizer, [engine.module], keep)
        self.expected: Dict = {"steps": [], "world_size": _world_size()}

    @torch.no_grad()
    def restore(self, peak_lr: float) -> Optional[int]:
        step = super().restore(peak_lr)
        if step is not None and self.zero is not None:
            self.zero.update_lp_params()
        return step

    def state_dict(self) -> Dict:
        return {"keep": self.keep, "per_rank": True, "steps": [s["step"] for s in self.snapshots],
                "world_size": _world_size()}

    def load_state_dict(self, state: Dict) -> None:
        # Rank 0's view, loaded by every rank: which snapshots there are. Each rank's own come from its file.
        self.snapshots = []
        self.expected = {"steps": list(state.get("steps", [])), "world_size": state.get("world_size")}

    def save_rank_file(self, folder: str) -> None:
        """This rank's snapshots into ``folder`` (written whole, then renamed into place)."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, ROLLBACK_FILE.format(rank=_rank()))
        torch.save({"world_size": _world_size(), "snapshots": self.snapshots}, path + ".tmp")
        os.replace(path + ".tmp", path)

    def load_rank_file(self, folder: str) -> None:
        """This rank's snapshots from ``folder``, as the loaded scheduler state says there are."""
        steps, saved_on = self.expected["steps"], self.expected["world_size"]
        self.snapshots = []
        if not steps:
            return
        if saved_on != _world_size():
            # Each rank's snapshots are of its own partition; they do not re-partition onto another number of
            # ranks. The run goes on, and the switch comes without a rollback.
            warnings.warn(f"AutoWU rollback: the checkpoint's {len(steps)} snapshot(s) were taken on {saved_on} "
                          f"ranks and this run has {_world_size()}: they cannot be re-partitioned and are dropped; "
                          "the switch will not roll back", RuntimeWarning)
            return
        path = os.path.join(folder, ROLLBACK_FILE.format(rank=_rank()))
        if not os.path.exists(path):
            raise MissingFileError(f"AutoWU rollback: the checkpoint in {folder} holds {len(steps)} snapshot(s) "
                                    f"but no {os.path.basename(path)} (this rank's)")
        saved = torch.load(path, map_location="cpu", weights_only=False)
        found = [s["step"] for s in saved["snapshots"]]
        if found != steps:
            raise UserError(f"AutoWU rollback: {path} holds the snapshots of steps {found}, the scheduler's state "
                             f"says {steps}: the files are from different saves")
        self.snapshots = saved["snapshots"]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
