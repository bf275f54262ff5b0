"""Where a run's checkpoints live, which one to resume from, and saving and loading them through DeepSpeed.

``<out_dir>/checkpoints/epoch<N>/`` are DeepSpeed checkpoints; ``client_state`` carries the epoch. When
``out_dir`` is each node's own disk (checked with a marker file, not assumed), DeepSpeed's
``use_node_local_storage`` makes every node write the model states too, and each node keeps its own ``latest``
(DeepSpeed writes it on global rank 0 alone), so that every node holds what it needs to resume.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from .nodes import collective_device, is_shared_path, local_rank


class Checkpoints:
    def __init__(self, out_dir: str, ds_config: Dict[str, Any], source: str, log):
        """Decide the storage (before the engine is built: it edits ``ds_config``'s checkpoint block)."""
        self.dir = os.path.join(out_dir, "checkpoints")
        self.node_local = not is_shared_path(out_dir)
        if self.node_local:
            # DeepSpeed writes the model states on global rank 0 alone unless told otherwise: another node's
            # disk would hold its optimizer shards but no model to resume.
            if ds_config.get("checkpoint", {}).get("use_node_local_storage") is False:
                raise ValueError(f"--out_dir {out_dir} is each node's own disk, and {source} sets "
                                 "checkpoint.use_node_local_storage false: no node but the first could resume; "
                                 "remove that setting or use a shared --out_dir")
            ds_config.setdefault("checkpoint", {})["use_node_local_storage"] = True
            log.line(f"{out_dir} is node-local: every node keeps its own checkpoints (DeepSpeed's "
                     "use_node_local_storage)")

    def latest_tag(self) -> str:
        """The tag to resume from: rank 0's ``latest``, which every rank's disk must hold (node-local or shared)."""
        latest = os.path.join(self.dir, "latest")
        tag = [open(latest).read().strip() if dist.get_rank() == 0 and os.path.isfile(latest) else None]
        dist.broadcast_object_list(tag, src=0)
        if tag[0] is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.dir} (no 'latest' file)")
        here = torch.tensor([int(os.path.isdir(os.path.join(self.dir, tag[0])))], device=collective_device())
        everywhere = here.clone()
        dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
        if not everywhere.item():
            raise FileNotFoundError(f"--resume: checkpoint {tag[0]} (rank 0's latest) is missing on "
                                    f"{'this node' if not here.item() else 'another node'}: {self.dir}/{tag[0]}")
        return tag[0]

    def save(self, engine, epoch: int) -> None:
        """Every rank calls it (DeepSpeed's save is collective)."""
        tag = f"epoch{epoch}"
        engine.save_checkpoint(self.dir, tag=tag, client_state={"epoch": epoch})
        if self.node_local and local_rank() == 0 and dist.get_rank() != 0:
            # DeepSpeed writes 'latest' on global rank 0 only; this node's copy of the run needs its own.
            with open(os.path.join(self.dir, "latest"), "w") as f:
                f.write(tag)

    def load(self, engine, tag: Optional[str]) -> int:
        """Load ``tag`` into the engine (model, optimizer, scheduler); return the epoch it ended."""
        _, client_state = engine.load_checkpoint(self.dir, tag=tag)
        return int(client_state["epoch"])
