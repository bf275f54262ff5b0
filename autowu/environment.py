"""The process's place in a distributed job, read from the environment in one place.

DeepSpeed's launcher (one ``deepspeed.launcher.launch`` per node, started over pdsh) sets ``RANK``,
``LOCAL_RANK``, ``LOCAL_SIZE`` (the ranks on this node) and ``CROSS_RANK`` (the node's rank); torchrun sets
``LOCAL_WORLD_SIZE`` and ``GROUP_RANK`` for the last two. Both set ``MASTER_ADDR`` and ``MASTER_PORT``. A process
started alone is rank 0 of 1 on node 0.
"""
from __future__ import annotations

import os
from typing import Optional


def rank() -> int:
    """This process's global rank, as its launcher set it (before or without a process group)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Ranks on this node."""
    return int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))


def node_rank() -> int:
    return int(os.environ.get("CROSS_RANK", os.environ.get("GROUP_RANK", "0")))


def master_address() -> Optional[str]:
    return os.environ.get("MASTER_ADDR")


def master_port() -> Optional[str]:
    """The rendezvous port, or None where no launcher set one (names this job's DeepSpeed CPU buffers)."""
    return os.environ.get("MASTER_PORT")


def threads_set_by_user() -> bool:
    """Whether ``OMP_NUM_THREADS`` fixes torch's threads (DeepSpeed forwards it to other nodes only when set)."""
    return "OMP_NUM_THREADS" in os.environ


def usable_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
