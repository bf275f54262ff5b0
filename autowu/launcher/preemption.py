"""Stopping a run on a signal without losing work: SIGTERM (SLURM, Kubernetes), SIGUSR1 (SLURM's ``--signal``),
SIGINT (Ctrl-C).

The handler only notes the signal. Every ``check_every`` optimizer steps the ranks agree on it with one small
all-reduce (MAX), so all of them stop after the same step whichever rank was signalled, and no rank waits on
the GPU in between. The launcher then saves a mid-epoch checkpoint and exits with 128 + the signal's number, as a
shell reports a process ended by it, so that a scheduler's requeue can tell "interrupted" from "finished".

DeepSpeed's launcher relays a signal it receives to its ranks as SIGTERM within milliseconds (and SLURM signals
every process of a step): a repeat within ``relay_window_s`` of the first is the same request. A signal after that
window, or no checkpoint within ``timeout_s`` of the first (DeepSpeed's launcher kills its ranks 30 s after
relaying), ends the process at once (``autowu.launcher.processes.exit_now``).

A process forked after the handler was installed (a worker pool) inherits it; there a signal ends the process at
once, as it would have without the handler: a pool's workers, which their pool ends with SIGTERM, must not wait
out the watchdog.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .nodes import collective_device
from .processes import exit_forked_child, exit_now

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequests:
    def __init__(self, check_every: int, timeout_s: float = 25.0, relay_window_s: float = 5.0):
        if check_every < 1:
            raise ConfigError(f"stop_check_every must be >= 1, got {check_every}")
        self.check_every = check_every
        self.timeout_s = timeout_s
        self.relay_window_s = relay_window_s
        self._pid = os.getpid()
        self.signum: Optional[int] = None
        self._first_at: Optional[float] = None
        self._watchdog: Optional[threading.Timer] = None
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child (a pool's worker): end it, as the signal would have
            exit_forked_child(128 + signum)
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            self._watchdog = threading.Timer(self.timeout_s, self.exit_now,
                                             args=(f"no checkpoint within {self.timeout_s:g} s of the signal",))
            self._watchdog.daemon = True
            self._watchdog.start()
        elif now - self._first_at > self.relay_window_s:
            self.exit_now(f"a second signal ({signal.Signals(signum).name})")

    def exit_now(self, why: str) -> None:
        """End this process at once (from the signal handler or the watchdog): clean up, no teardown."""
        code = 128 + (self.signum or signal.SIGTERM)
        print(f"[train] rank {dist.get_rank() if dist.is_initialized() else 0}: stopping at once: {why}; exit "
              f"{code}; continue from the last committed checkpoint with --resume", file=sys.stderr, flush=True)
        exit_now(code)

    def agreed(self, step: int, force: bool = False) -> Optional[int]:
        """At an optimizer step boundary: the signal every rank agrees to stop for, or None. A collective every
        ``check_every`` steps, or now with ``force`` (every rank calls it alike)."""
        if step % self.check_every and not force:
            return None
        flag = torch.tensor([self.signum or 0], dtype=torch.int32, device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        if signum and self.signum is None:
            self.signum = signum  # a peer's signal: this rank's exit code says the same
        return signum or None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    def done(self) -> None:
        """The checkpoint is committed: no watchdog any more."""
        if self._watchdog is not None:
            self._watchdog.cancel()

    def restore(self) -> None:
        """Give the signals their previous handlers (the run is over, or ending on an error)."""
        self.done()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
