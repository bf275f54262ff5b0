"""Where the ranks of a run live: nodes, node-local storage, and which node was lost when a collective fails.

DeepSpeed's launcher (pdsh over ssh) starts one ``deepspeed.launcher.launch`` per node, which sets ``CROSS_RANK``
(the node's rank), ``LOCAL_RANK`` and ``LOCAL_SIZE`` for its ranks. From those and one all-gather:

- ``NodeTable``: every rank's node, host name and process id, for the log and for naming a lost node;
- ``is_shared_path``: whether a directory is one file system for all ranks (a shared disk) or each node's own
  (FFCV's usual layout: betons copied to every node's local disk), found by a marker file, not assumed;
- ``PeerWatch``: every rank writes a heartbeat into the job's rendezvous store (a TCPStore client of its own, on a
  daemon thread); when a collective fails, the ranks whose heartbeat stopped are the lost ones.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..environment import master_address, master_port, node_rank


def collective_device() -> torch.device:
    """Where a small tensor for a collective must live: nccl takes CUDA tensors only (after set_device)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class RankPlace:
    rank: int
    node: int
    host: str
    pid: int


class NodeTable:
    """Every rank's place, gathered once at start-up (one all-gather of small objects)."""

    def __init__(self):
        mine = RankPlace(dist.get_rank(), node_rank(), socket.gethostname(), os.getpid())
        places: List[Optional[RankPlace]] = [None] * dist.get_world_size()
        dist.all_gather_object(places, mine)
        self.places: List[RankPlace] = places

    @property
    def nodes(self) -> Dict[int, List[RankPlace]]:
        nodes: Dict[int, List[RankPlace]] = {}
        for place in self.places:
            nodes.setdefault(place.node, []).append(place)
        return dict(sorted(nodes.items()))

    def describe_node(self, node: int) -> str:
        places = self.nodes[node]
        hosts = sorted({p.host for p in places})
        return f"node {node} (host {', '.join(hosts)}, rank{'s' if len(places) > 1 else ''} " \
               f"{', '.join(str(p.rank) for p in places)})"


def is_shared_path(path: str) -> bool:
    """True when every rank sees the same directory ``path`` (rank 0 writes a marker; all look for it)."""
    if dist.get_world_size() == 1:
        return True
    os.makedirs(path, exist_ok=True)
    name = [f".autowu_shared_{uuid.uuid4().hex}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    marker = os.path.join(path, name[0])
    if dist.get_rank() == 0:
        with open(marker, "w"):
            pass
    dist.barrier()
    seen = torch.tensor([1 if os.path.exists(marker) else 0], device=collective_device())
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    dist.barrier()
    if dist.get_rank() == 0:
        os.remove(marker)
    return bool(seen.item())


class PeerWatch:
    """Heartbeats in the job's rendezvous store, to name the lost node when a collective fails.

    Each rank sets ``autowu/heartbeat/<rank>`` to a counter every ``interval`` seconds. ``lost_ranks`` reads
    all counters twice, ``2 * interval + 1`` seconds apart: a rank whose counter did not move is gone. If the
    store itself is unreachable, the rank that hosts it (rank 0's process on the first node) is gone.
    """

    def __init__(self, table: NodeTable, interval: float = 2.0):
        self.table, self.interval = table, interval
        self.rank = dist.get_rank()
        self._stop = threading.Event()
        self._store = self._connect()
        self._thread = threading.Thread(target=self._beat, name="autowu-heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def _connect():
        return dist.TCPStore(master_address(), int(master_port()), is_master=False,
                             timeout=timedelta(seconds=10))

    def _beat(self):
        count = 0
        while not self._stop.is_set():
            count += 1
            try:
                self._store.set(f"autowu/heartbeat/{self.rank}", str(count))
            except Exception:  # the store is gone: lost_ranks says so
                return
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()

    def lost_ranks(self) -> Optional[List[int]]:
        """The ranks whose heartbeat stopped; None if the store (rank 0's process) cannot be reached."""
        try:
            store = self._connect()
            keys = [f"autowu/heartbeat/{p.rank}" for p in self.table.places]
            first = store.multi_get(keys)
            time.sleep(2 * self.interval + 1)
            second = store.multi_get(keys)
        except Exception:
            return None
        return [p.rank for p, a, b in zip(self.table.places, first, second) if a == b and p.rank != self.rank]

    def describe(self, lost: Optional[List[int]]) -> str:
        """``lost_ranks()``'s answer as a sentence naming the nodes."""
        if lost is None:
            return (f"lost {self.table.describe_node(self.table.places[0].node)}: the job's rendezvous store "
                    "(rank 0's process) does not answer")
        nodes = sorted({self.table.places[r].node for r in lost})
        return "lost " + "; ".join(
            f"{self.table.describe_node(n)}: no heartbeat from "
            f"rank{'s' if sum(self.table.places[r].node == n for r in lost) > 1 else ''} "
            f"{', '.join(str(r) for r in lost if self.table.places[r].node == n)}" for n in nodes)
