"""Ending a rank: the one way out of a launcher process, and the clean-up it owes the machine.

Every exit of the launcher goes through ``exit_now``: clean-up (``at_exit``'s callbacks, DeepSpeed's own atexit
handlers), output flushed, then ``os._exit``. Not a normal interpreter exit: ``destroy_process_group`` forgets the
groups but DeepSpeed still holds them (the engine, its ZeRO optimizer, ``deepspeed.utils.groups``), so gloo's
worker threads (4 ``pt_gloo_runloop``, 2 ``gloo_tcp_loop`` on 2 ranks, counted) are still running when the
interpreter tears down, and their destructors then now and then abort the rank ("terminate called without an
active exception", exit -6: a finished run reported as failed; torch's pull request 179291 describes the same).
FFCV's epoch thread would only delay it too.
"""
from __future__ import annotations

import atexit
import glob
import os
import sys
from typing import Callable, List

import torch.distributed as dist

_CLEAN_UPS: List[Callable[[], None]] = []


def remove_cpu_shm_buffers(master_port, local_rank="*") -> None:
    """DeepSpeed's CPU all-reduce (its ``deepspeed_shm_comm`` op) creates a 66 MB file in /dev/shm for each rank,
    ``deepspeed_allreduce_buffer_<n>_<addr>_<port>_<local rank>``, and never removes it: every CPU run leaked
    132 MB of memory on 2 ranks until a reboot. Removing the names at exit is safe: ranks that mapped the memory
    keep it until they end."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{master_port}_{local_rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass


def at_exit(clean_up: Callable[[], None]) -> None:
    """Run ``clean_up`` however this process ends: a normal exit, ``exit_now`` or ``end_process``."""
    _CLEAN_UPS.append(clean_up)
    atexit.register(clean_up)


def exit_now(code: int, run_atexit: bool = False) -> None:
    """End this process at once, from anywhere (a signal handler, a watchdog, an error): clean up, flush, exit.
    ``run_atexit`` also runs every atexit handler (DeepSpeed's, loggers'): from the main thread only, where nothing
    they might wait for is stuck."""
    if run_atexit:
        atexit._run_exitfuncs()
    for clean_up in reversed(_CLEAN_UPS):
        try:
            clean_up()
        except Exception:  # noqa: BLE001  (a failed clean-up must not keep the process alive)
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_forked_child(code: int) -> None:
    """End a process forked from a launcher process (a library's worker pool) at once, without the parent's
    clean-ups: they belong to the parent (its DeepSpeed buffers, its files)."""
    os._exit(code)


def end_process(exit_code: int = 0) -> None:
    """End a DeepSpeed rank that finished: a barrier, the process groups destroyed, atexit handlers run (DeepSpeed's
    /dev/shm files, loggers), then ``exit_now``."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    exit_now(exit_code, run_atexit=True)
