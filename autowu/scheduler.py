"""AutoWU: the learning-rate scheduler that decides the warmup's length and the peak LR by itself.

The LR grows exponentially (or linearly) from ``min_lr`` towards ``max_lr``, which it would reach at
``max_warmup_fraction`` of the run. A Gaussian-process test (``autowu.gp``) asks, at every epoch's end (or more
often on a fast ramp), whether the training loss's minimum already lies in the past; after ``patience`` passing
tests in a row (``autowu.switch``), or at the warmup cap, the LR drops to the LR at the GP's predicted minimum
and decays: by cosine to 0 at the last step (``immediate_cooldown=True``), or it stays constant and cosines to
0 over the last ``cooldown_fraction``.

Two modes. ``mode="paper"`` is the paper's code exactly: a test an epoch, three passes in a row, the ramp
over half the run, every finite loss fitted. ``mode="default"`` (the default) differs where the paper's
procedure lost accuracy on real runs (``benchmarks/bench_schedules.py``, README): the ramp covers a fifth of
the run, the LR holds while a passing test is confirmed (two passes in a row) and, if the pass is not
confirmed, ramps again from the LR that test saw as the minimum; tests come often enough that the ramp grows
the LR at most 1.8x between two; isolated loss spikes are left out of the fit; and at the switch the training
state of the last test at or below the peak is put back (``autowu.rollback``: the ramp has run past the peak by
then, and the run goes on from before it; pass ``model=`` so that BatchNorm's statistics go back too).

Usage, as in the paper's code::

    scheduler = AutoWU(optimizer, steps_per_epoch, total_epochs, immediate_cooldown=True)
    for batch in loader:
        loss = ...; loss.backward(); optimizer.step()
        scheduler.step(loss)   # no host sync: the loss stays on its device until the next test

Under DeepSpeed, ``autowu.deepspeed.initialize`` feeds it the losses instead (``step()`` without a loss).
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .gp import GPHyperparameters, GPTestResult, GPTestSettings, PastMinimumTest
from .rollback import SwitchRollback
from .schedule import COOLDOWN_TYPES, WARMUP_TYPES, Schedule
from .spikes import usable_losses
from .switch import SWITCH, SwitchRule

GP_BACKENDS = ("fast", "gpytorch")
MODES = ("default", "paper")
# What each mode sets unless the caller sets it: "paper" is the paper's code exactly.
MODE_DEFAULTS = {
    "paper": {"max_warmup_fraction": 0.5, "patience": 3, "spike_threshold": None, "hold": False,
              "peak_fraction": 1.0, "max_lr_growth_per_test": None, "resume_from_argmin": False,
              "min_epochs_before_test": 0.0, "peak_highest_of_hold": False, "rollback": False},
    "default": {"max_warmup_fraction": 0.2, "patience": 2, "spike_threshold": 6.0, "hold": True,
                "peak_fraction": 1.0, "max_lr_growth_per_test": 1.8, "resume_from_argmin": True,
                "min_epochs_before_test": 0.0, "peak_highest_of_hold": True, "rollback": True},
}
_FROM_MODE = object()  # "not given": the mode's value


def _choice(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"AutoWU: invalid {name} {value!r}; allowed: {', '.join(map(repr, allowed))}")
    return value


@dataclass
class TestRecord:
    """One GP test as ``AutoWU.history`` keeps it (as a dict: logs and checkpoints hold plain data)."""
    step: int                       # optimizer steps taken when the test ran
    epoch: float
    lr: float                       # the LR of the last step tested
    nonfinite: int                  # losses left out as inf/NaN
    spikes_ignored: int             # finite losses left out by the spike rule
    at_cap: bool                    # the warmup cap ended the warmup (not enough passes in a row)
    probability: float = math.nan   # the median fit's max_{i<k} P(f_i < f_k)
    probabilities: List[float] = field(default_factory=list)
    votes: int = 0
    failed_fits: Optional[int] = None   # fits redrawn after a numerical failure (None: no GP result)
    error: Optional[str] = None         # a GP failure that made the test count as not passed
    passed: bool = False
    passes_in_row: int = 0
    argmin_lr: float = math.nan     # the LR at the predicted minimum (mean over the fits)
    switched: bool = False
    action: str = ""                # "ramp", "hold" or "switch" (autowu.switch)
    seconds: float = 0.0
    rolled_back_to: Optional[int] = None   # rollback: the step whose training state the switch put back

    def to_dict(self) -> Dict:
        record = dataclasses.asdict(self)
        for optional in ("failed_fits", "error", "rolled_back_to"):
            if record[optional] is None:
                del record[optional]
        return record


class AutoWU:
    """Automated warmup LR scheduler (Kim et al., 2021), stepped once per optimizer step.

    Args:
        optimizer: the wrapped optimizer. Param groups keep the ratios of their initial LRs; the schedule's
            LR is that of the group with the largest initial LR.
        steps_per_epoch: optimizer steps in an epoch; the GP test runs at each epoch's end, or more often.
        total_epochs: length of the run; the LR reaches 0 after ``steps_per_epoch * total_epochs`` steps.
        min_lr, max_lr: warmup starts at ``min_lr`` and would reach ``max_lr`` at the warmup cap.
        max_warmup_fraction: the warmup cap, as a fraction of all steps (the mode's: 0.2, the paper 0.5).
        warmup_type: ``"exp"`` (the paper's) or ``"linear"``.
        immediate_cooldown: cosine from the switch to 0; otherwise constant, then the cooldown.
        cooldown_type: ``"cosine"``, ``"half_cosine"`` (the paper's code's variant) or ``"linear"`` (straight to
            0; measured against the cosine in ``benchmarks/RESULTS.md``, issue 19: no better on any task).
        cooldown_fraction: the last fraction of steps spent in cooldown when not ``immediate_cooldown``.
        device: where losses are buffered; by default the device of the first loss (no copy, no sync).
        patience: passing tests in a row that end the warmup (the mode's: 2, the paper 3).
        spike_threshold: losses this many robust standard deviations beyond the levels both before and after
            them are left out of the GP fit (``autowu.spikes``); ``None`` (the paper) keeps all finite losses.
        gp_settings: ``GPTestSettings``; the paper's by default.
        gp_backend: ``"fast"`` (weight-space numpy, default) or ``"gpytorch"`` (the paper's computation).
        seed: seed of the subsampling generator (every rank must use the same).
        mode: ``"default"`` or ``"paper"``; sets every option below and those marked "the mode's" above,
            unless given.
        hold: keep the LR while a passing test is being confirmed (``autowu.switch``; the paper: no).
        peak_fraction: post-switch LR as a fraction of the LR at the predicted minimum (both modes: 1).
        max_lr_growth_per_test: test often enough that the exponential ramp grows the LR at most this much
            between two tests (never less than once an epoch); ``None``, the paper: once an epoch.
        resume_from_argmin: when a hold ends in a failing test, ramp again from the LR at the minimum that the
            hold's first test predicted, not from the held LR (which was already past it).
        min_epochs_before_test: no GP test before this many epochs of losses (the paper's first test comes after
            one epoch; more frequent tests would otherwise start with a handful of noisy losses).
        peak_highest_of_hold: a switch that ends a hold takes the highest LR any test of the hold predicted as
            the minimum, not the last test's (losses rising under a held LR pull the GP's minimum lower;
            ``autowu.switch``); the paper: the last test's.
        rollback: at the switch, put back the training state (parameters, optimizer state, ``model``'s buffers)
            of the last GP test whose LR was at most the peak, so that the run goes on from before the ramp
            overshot it (``autowu.rollback``). On in the default mode, off in the paper's. Under DeepSpeed the
            engine's own (its module, ZeRO's partitions: ``autowu.rollback.EngineRollback``).
        model: the module whose buffers (BatchNorm statistics) ``rollback`` keeps with the parameters; without it
            they are not put back.
        rollback_keep: snapshots held at most (each a copy of the parameters and optimizer state, in host
            memory); the default 6 reaches a peak 1.8^6 = 34x below the LR at the switch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_epochs: int,
                 min_lr: float = 1e-5, max_lr: float = 1.0, max_warmup_fraction: float = _FROM_MODE,
                 warmup_type: str = "exp", immediate_cooldown: bool = False, cooldown_type: str = "cosine",
                 cooldown_fraction: float = 0.2, device=None, patience: int = _FROM_MODE,
                 spike_threshold: Optional[float] = _FROM_MODE, gp_settings: Optional[GPTestSettings] = None,
                 gp_backend: str = "fast", seed: int = 0, mode: str = "default", hold: bool = _FROM_MODE,
                 peak_fraction: float = _FROM_MODE, max_lr_growth_per_test: Optional[float] = _FROM_MODE,
                 resume_from_argmin: bool = _FROM_MODE, min_epochs_before_test: float = _FROM_MODE,
                 peak_highest_of_hold: bool = _FROM_MODE, rollback: bool = _FROM_MODE,
                 model: Optional[torch.nn.Module] = None, rollback_keep: int = 6):
        self.mode = _choice("mode", mode, MODES)
        given = dict(max_warmup_fraction=max_warmup_fraction, patience=patience, spike_threshold=spike_threshold,
                     hold=hold, peak_fraction=peak_fraction, max_lr_growth_per_test=max_lr_growth_per_test,
                     resume_from_argmin=resume_from_argmin, min_epochs_before_test=min_epochs_before_test,
                     peak_highest_of_hold=peak_highest_of_hold, rollback=rollback)
        options = {k: MODE_DEFAULTS[self.mode][k] if v is _FROM_MODE else v for k, v in given.items()}
        max_warmup_fraction = options["max_warmup_fraction"]
        if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
            raise ValueError(f"AutoWU: steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
        if int(total_epochs) != total_epochs or total_epochs < 1:
            raise ValueError(f"AutoWU: total_epochs must be a positive integer, got {total_epochs!r}")
        if not 0 < min_lr < max_lr:
            raise ValueError(f"AutoWU: need 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
        if not 0 < max_warmup_fraction <= 1:
            raise ValueError(f"AutoWU: max_warmup_fraction must be in (0, 1], got {max_warmup_fraction}")
        if not 0 <= cooldown_fraction <= 1:
            raise ValueError(f"AutoWU: cooldown_fraction must be in [0, 1], got {cooldown_fraction}")
        growth = options["max_lr_growth_per_test"]
        if growth is not None and not growth > 1:
            raise ValueError(f"AutoWU: max_lr_growth_per_test must be > 1 or None, got {growth!r}")
        min_epochs_before_test = options["min_epochs_before_test"]
        if isinstance(min_epochs_before_test, bool) or not 0 <= min_epochs_before_test <= total_epochs:
            raise ValueError(f"AutoWU: min_epochs_before_test must be in [0, total_epochs], got "
                             f"{min_epochs_before_test!r}")
        if gp_settings is not None and not isinstance(gp_settings, GPTestSettings):
            raise TypeError(f"AutoWU: gp_settings must be an autowu.GPTestSettings, got {type(gp_settings).__name__}"
                            " (from a JSON config, autowu.deepspeed builds it from an object of its fields)")
        if not optimizer.param_groups:
            raise ValueError("AutoWU: the optimizer has no param groups")
        rollback = options["rollback"]
        if model is not None and not rollback:
            raise ValueError("AutoWU: model= is used only by rollback (on in the default mode)")

        self.optimizer = optimizer
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_epochs = int(total_epochs)
        self.total_steps = self.steps_per_epoch * self.total_epochs
        self.min_lr, self.max_lr = float(min_lr), float(max_lr)
        self.max_warmup_fraction = float(max_warmup_fraction)
        self.warmup_type = _choice("warmup_type", warmup_type, WARMUP_TYPES)
        self.immediate_cooldown = bool(immediate_cooldown)
        self.cooldown_type = _choice("cooldown_type", cooldown_type, COOLDOWN_TYPES)
        self.cooldown_fraction = float(cooldown_fraction)
        self.spike_threshold = options["spike_threshold"]
        self.max_lr_growth_per_test = growth
        self.rule = SwitchRule(options["patience"], options["hold"], options["peak_fraction"],
                               options["resume_from_argmin"], options["peak_highest_of_hold"])
        self.patience = self.rule.patience
        self.resume_from_argmin = self.rule.resume_from_argmin
        self.gp_backend = _choice("gp_backend", gp_backend, GP_BACKENDS)
        self.seed = int(seed)
        self.rollback = bool(rollback)
        # Without model= the parameters and optimizer state go back, BatchNorm's running statistics do not (they
        # follow the restored weights again within some tens of steps; what evaluation sees at the end is exact).
        self._rollback = (SwitchRollback(optimizer, [model] if model is not None else [], rollback_keep)
                          if self.rollback else None)
        self.device = torch.device(device) if device is not None else None
        self.schedule = Schedule.build(self.total_steps, self.min_lr, self.max_lr, self.max_warmup_fraction,
                                       self.warmup_type, self.immediate_cooldown, self.cooldown_type,
                                       self.cooldown_fraction)
        # Steps between GP tests: an epoch (the paper), or fewer where the exponential ramp would otherwise grow
        # the LR by more than max_lr_growth_per_test between two tests (short budgets ramp fast).
        self.test_every = self.steps_per_epoch
        if self.max_lr_growth_per_test is not None and self.warmup_type == "exp":
            per_growth = self.schedule.steps_per_growth(self.max_lr_growth_per_test)
            self.test_every = max(1, min(self.steps_per_epoch, int(per_growth)))
        self.min_epochs_before_test = float(min_epochs_before_test)
        self.first_test_step = math.ceil(self.min_epochs_before_test * self.steps_per_epoch)

        settings = gp_settings or GPTestSettings()
        if self.gp_backend == "fast":
            self._gp_test = PastMinimumTest(settings)
        else:
            from .gp_gpytorch import GPyTorchPastMinimumTest
            self._gp_test = GPyTorchPastMinimumTest(settings)

        initial = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        reference = max(initial)
        self.base_lrs: List[float] = list(initial)
        self.lr_ratios: List[float] = [lr / reference if reference > 0 else 1.0 for lr in initial]

        # Distributed hooks (set by autowu.deepspeed): reduce the losses buffered since the last test in
        # place, and make every rank take rank 0's decision. Not part of the state.
        self.loss_reducer: Optional[Callable[[torch.Tensor], None]] = None
        self.decision_sync: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.pending_loss = None  # a loss handed over by an engine hook, taken by the next step()

        self.last_step = 0
        self.phase = "warmup"
        self.history: List[Dict] = []   # TestRecord.to_dict() of every test
        self.switch_curve: Optional[Dict] = None
        self._num_reduced = 0
        self._hyper = GPHyperparameters.initial(settings)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._losses: Optional[torch.Tensor] = None
        self._restored_losses: Optional[torch.Tensor] = None
        self._set_lrs()

    # ---------------------------------------------------------------- the schedule (autowu.schedule) and decisions
    @property
    def max_warmup_steps(self) -> int:
        return self.schedule.max_warmup_steps

    @property
    def cooldown_start_step(self) -> int:
        return self.schedule.cooldown_start_step

    # The decisions are the switch rule's (autowu.switch); these names are the scheduler's public view of them.
    holds = property(lambda self: self.rule.holds, lambda self, value: setattr(self.rule, "holds", value))
    rewinds = property(lambda self: self.rule.rewinds, lambda self, value: setattr(self.rule, "rewinds", value))
    switch_step = property(lambda self: self.rule.switch_step)
    peak_lr = property(lambda self: self.rule.peak_lr)

    def warmup_lr(self, position: float) -> float:
        """The ramp's LR at (possibly fractional) ramp position ``position``: ``min_lr`` at 0, ``max_lr`` at the cap."""
        return self.schedule.warmup_lr(position)

    def ramp_position(self, step: float) -> float:
        """Steps the ramp has advanced by ``step``: the steps so far less those spent holding or taken back."""
        return self.schedule.ramp_position(step, self.rule)

    def warmup_lr_at(self, step: float) -> float:
        """The warmup LR used at (possibly fractional) step index ``step``, holds included."""
        return self.schedule.warmup_lr_at(step, self.rule)

    def lr_at(self, step: int) -> float:
        """The schedule's LR for step index ``step`` (0-based): a pure function of the step and the decisions
        taken so far (``holds``, ``rewinds``, ``switch_step``, ``peak_lr``)."""
        return self.schedule.lr(step, self.rule)

    def _set_lrs(self) -> None:
        lr = self.lr_at(self.last_step)
        self._last_lr = [lr * ratio for ratio in self.lr_ratios]
        for group, group_lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = group_lr

    # ---------------------------------------------------------------- PyTorch scheduler protocol
    def get_last_lr(self) -> List[float]:
        """The LRs (one per param group) that the next optimizer step uses."""
        return list(self._last_lr)

    get_lr = get_last_lr

    @property
    def last_epoch(self) -> int:
        """PyTorch's name for the step counter: optimizer steps taken."""
        return self.last_step

    def step(self, loss=None) -> None:
        """Record the loss of the optimizer step just taken and set the LR of the next one.

        ``loss``: a scalar tensor (left on its device) or a float. During warmup it is required, unless an
        engine hook handed it over (``pending_loss``); afterwards it is ignored.
        """
        if isinstance(loss, (bool, int)):
            # DeepSpeed retries a scheduler step that raised TypeError as step(train_batch_size): a batch
            # size must never be taken for a loss.
            raise TypeError(f"AutoWU.step expects the step's loss (a float or a scalar tensor), got int {loss}")
        if loss is None:
            loss, self.pending_loss = self.pending_loss, None
        if self.phase == "warmup":
            if loss is None:
                raise ValueError("AutoWU.step(loss): the warmup needs each step's training loss (under DeepSpeed the "
                                 "engine hands it over from engine.backward(loss): build the engine after "
                                 "`import autowu.deepspeed`, or call autowu.deepspeed.attach(engine))")
            self._record(loss)
        self.last_step += 1
        if self.tests_at(self.last_step):
            self._test(at_cap=self.last_step >= self.schedule.warmup_end_cap)
        self._set_lrs()

    def tests_at(self, step: int) -> bool:
        """Whether the ``step()`` that completes optimizer step ``step`` runs a GP test (and its one host sync):
        every ``test_every`` steps of the warmup from ``first_test_step`` on, and at the warmup cap."""
        if self.phase != "warmup":
            return False
        return step >= self.schedule.warmup_end_cap or (step % self.test_every == 0 and step >= self.first_test_step)

    # ---------------------------------------------------------------- warmup internals
    def _record(self, loss) -> None:
        if self._losses is None:
            device = self.device or (loss.device if torch.is_tensor(loss) else torch.device("cpu"))
            self._losses = torch.full((self.schedule.warmup_end_cap,), float("nan"), dtype=torch.float32,
                                      device=device)
            if self._restored_losses is not None:  # from load_state_dict, now on the losses' own device
                self._losses[:len(self._restored_losses)] = self._restored_losses.to(device)
                self._restored_losses = None
        if torch.is_tensor(loss):
            loss = loss.detach().reshape(())
        self._losses[self.last_step] = loss  # a device-side copy: no host synchronisation

    def _test(self, at_cap: bool) -> None:
        """Measure (the GP test on every loss so far), agree (every rank takes rank 0's answer), apply (the
        switch rule's decision, and the record)."""
        started = time.perf_counter()
        record, result, losses, usable = self._measure(at_cap)
        passed, argmin_lr = self._agree(record.passed, record.argmin_lr)
        action = self.rule.decide(passed, at_cap, record.step, argmin_lr, self.schedule)
        if self._rollback is not None and action == SWITCH:
            record.rolled_back_to = self._rollback.restore(self.peak_lr)
        elif self._rollback is not None:
            self._rollback.take(record.step, record.lr)
        record.at_cap = at_cap and self.rule.switched_by_cap
        record.passed, record.argmin_lr, record.action = passed, argmin_lr, action
        record.passes_in_row, record.switched = self.rule.passes_in_row, action == SWITCH
        record.seconds = time.perf_counter() - started
        self.history.append(record.to_dict())
        if action == SWITCH:
            self._enter_decay(result, losses, usable)

    def _measure(self, at_cap: bool):
        """The GP test on the losses so far (all-reduced over ranks first): the record, with this rank's
        ``passed`` and ``argmin_lr``, the GP result (None if there was none), the losses and the usable mask."""
        n = self.last_step
        self.reduce_pending_losses()  # one all-reduce per test
        losses = self._losses[:n].double().cpu().numpy()  # the one host sync of a test
        usable = usable_losses(losses, self.spike_threshold)
        record = TestRecord(step=n, epoch=n / self.steps_per_epoch, lr=self.warmup_lr_at(n - 1),
                            nonfinite=int((~np.isfinite(losses)).sum()),
                            spikes_ignored=int(np.isfinite(losses).sum() - usable.sum()), at_cap=at_cap)
        result = self._gp_result(losses, usable, record) if usable.sum() >= 2 else None
        if result is not None and result.argmin_x:
            record.argmin_lr = float(np.mean([self.warmup_lr_at(x * n) for x in result.argmin_x]))
            record.passed = result.passed
            record.probability, record.probabilities = result.probability, list(result.probabilities)
            record.votes, record.failed_fits = result.votes, result.failed_fits
        else:
            record.argmin_lr = self.warmup_lr_at(n - 1)
        return record, result, losses, usable

    def _gp_result(self, losses: np.ndarray, usable: np.ndarray, record: TestRecord) -> Optional[GPTestResult]:
        """The GP test's result; a numerical failure counts as a test not passed, never ends the run."""
        try:
            result, self._hyper = self._gp_test(losses, usable, self._hyper, self._generator)
            return result
        except (ImportError, AttributeError, TypeError, NameError):
            raise  # a broken install or a bug, not a numerical failure: it would fail every test silently
        except Exception as err:
            warnings.warn(f"AutoWU: GP test at step {record.step} failed ({err!r}); counted as not passed")
            record.error = repr(err)
            return None

    def _agree(self, passed: bool, argmin_lr: float):
        """Every rank takes rank 0's answer (through ``decision_sync``), so all switch at the same step."""
        if self.decision_sync is None:
            return passed, argmin_lr
        decision = torch.tensor([float(passed), argmin_lr], dtype=torch.float64, device=self._losses.device)
        synced = self.decision_sync(decision).cpu()
        return bool(synced[0] > 0.5), float(synced[1])

    def _enter_decay(self, result: Optional[GPTestResult], losses: np.ndarray, usable: np.ndarray) -> None:
        n = self.last_step
        self.phase = "decay"
        self._losses = self._restored_losses = None  # the buffer is only needed during warmup
        if result is not None:
            # What the GP saw and predicted at the switch, for logs and plots.
            self.switch_curve = {"step": n, "x": result.grid.tolist(), "mean": result.curve_mean.tolist(),
                                 "std": result.curve_std.tolist(),
                                 "lr": [self.warmup_lr_at(x * n) for x in result.grid],
                                 "losses": losses.tolist(), "usable": usable.tolist()}

    def reduce_pending_losses(self) -> None:
        """All-reduce (through ``loss_reducer``) the losses buffered since the last reduction.

        Called before each test, and by the DeepSpeed hook before a checkpoint (a collective, so on every
        rank): a checkpoint then holds the ranks' mean losses, not one rank's own.
        """
        n = self.last_step
        if self.loss_reducer is not None and self._losses is not None and n > self._num_reduced:
            self.loss_reducer(self._losses[self._num_reduced:n])
        self._num_reduced = n

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> Dict:
        """Everything needed to continue exactly: counters, decisions, losses so far, GP state, RNG state."""
        losses = self._restored_losses
        if self._losses is not None:
            losses = self._losses[:self.last_step].detach().cpu().clone()
        decisions = self.rule.state_dict()
        return {
            # switch_step and peak_lr: for whoever reads a checkpoint; "rule" is what load_state_dict restores
            "last_step": self.last_step, "phase": self.phase, "switch_step": decisions["switch_step"],
            "peak_lr": decisions["peak_lr"], "history": [dict(r) for r in self.history],
            "switch_curve": self.switch_curve, "rule": decisions,
            "num_reduced": self._num_reduced, "gp_hyperparameters": self._hyper.state_dict(),
            "generator_state": self._generator.get_state(), "losses": losses,
            "settings": self.state_dict_settings(),
            **({"rollback": self._rollback.state_dict()} if self._rollback is not None else {}),
        }

    def use_rollback(self, rollback: SwitchRollback) -> None:
        """Take ``rollback`` as the state to put back at the switch (``autowu.deepspeed`` gives an engine's);
        before any step."""
        if self.last_step != 0:
            raise RuntimeError("AutoWU.use_rollback: only before the first step")
        self.rollback, self._rollback = True, rollback

    def state_dict_settings(self) -> Dict:
        """The settings a checkpoint must have been made with to resume exactly."""
        return {"steps_per_epoch": self.steps_per_epoch, "total_epochs": self.total_epochs,
                "min_lr": self.min_lr, "max_lr": self.max_lr,
                "max_warmup_fraction": self.max_warmup_fraction, "warmup_type": self.warmup_type,
                "immediate_cooldown": self.immediate_cooldown, "cooldown_type": self.cooldown_type,
                "cooldown_fraction": self.cooldown_fraction, "patience": self.patience,
                "mode": self.mode, "hold": self.rule.hold, "peak_fraction": self.rule.peak_fraction,
                "spike_threshold": self.spike_threshold, "test_every": self.test_every,
                "resume_from_argmin": self.resume_from_argmin, "first_test_step": self.first_test_step,
                "peak_highest_of_hold": self.rule.peak_highest_of_hold, "rollback": self.rollback}

    def load_state_dict(self, state: Dict) -> None:
        mine = self.state_dict_settings()
        mismatched = {k: (v, mine.get(k)) for k, v in state["settings"].items() if mine.get(k) != v}
        if mismatched:
            raise ValueError("AutoWU.load_state_dict: the checkpoint was made with other settings "
                             + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in mismatched.items()))
        self.last_step = int(state["last_step"])
        self.phase = state["phase"]
        self.history = [dict(r) for r in state["history"]]
        self.switch_curve = state["switch_curve"]
        self.rule.load_state_dict(_rule_state(state))
        self._num_reduced = int(state["num_reduced"])
        self._hyper = GPHyperparameters.from_state_dict(state["gp_hyperparameters"])
        self._generator.set_state(state["generator_state"])
        self._losses = None
        self._restored_losses = state["losses"] if self.phase == "warmup" else None
        if self._rollback is not None:
            self._rollback.load_state_dict(state.get("rollback", {"snapshots": []}))
        self._set_lrs()

    def __repr__(self) -> str:
        return (f"AutoWU(phase={self.phase}, step={self.last_step}/{self.total_steps}, "
                f"lr={self._last_lr[0]:.3g}, switch_step={self.switch_step}, peak_lr={self.peak_lr})")


def _rule_state(state: Dict) -> Dict:
    """The switch rule's state in an AutoWU checkpoint: ``state["rule"]`` whole, or, in checkpoints from before
    it was saved there, put together from the top-level keys that held it (the pass count alone under "rule",
    or at the top level in the oldest; ``SwitchRule.load_state_dict`` fills what those lack)."""
    rule = state.get("rule", {})
    if "holds" in rule:
        return rule
    legacy = {"passes_in_row": rule.get("passes_in_row", state.get("passes_in_row", 0)),
              "switch_step": state["switch_step"], "peak_lr": state["peak_lr"]}
    legacy.update({k: state[k] for k in ("holds", "rewinds", "hold_argmin_lr", "hold_highest_argmin_lr")
                   if k in state})
    return legacy
