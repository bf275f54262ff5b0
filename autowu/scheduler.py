"""AutoWU: the learning-rate scheduler that decides the warmup's length and the peak LR by itself.

The LR grows exponentially (or linearly) from ``min_lr`` towards ``max_lr``, which it would reach at
``max_warmup_fraction`` of the run. A Gaussian-process test (``autowu.gp``) asks, at every epoch's end (or more
often on a fast ramp), whether the training loss's minimum already lies in the past; after ``patience`` passing
tests in a row (``autowu.switch``), or at the warmup cap, the LR drops to the LR at the GP's predicted minimum
and decays: by cosine to 0 at the last step (``immediate_cooldown=True``), or it stays constant and cosines to
0 over the last ``cooldown_fraction``. The scheduler measures and applies; the LR is a pure function of the step
and the decisions (``autowu.schedule``); the options and the two modes, ``"paper"`` (the paper's code exactly)
and ``"default"``, are ``autowu.options``.

Usage, as in the paper's code::

    scheduler = AutoWU(optimizer, steps_per_epoch, total_epochs, immediate_cooldown=True)
    for batch in loader:
        loss = ...; loss.backward(); optimizer.step()
        scheduler.step(loss)   # no host sync: the loss stays on its device until the next test

Under DeepSpeed the engine steps the scheduler itself; after ``import autowu.deepspeed`` a hook on the engine
hands it each step's loss (``receive_loss``) and connects the ranks (``connect_ranks``).
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

from .errors import ConfigError
from .flat_start import MIN_STEPS_PER_DECADE, MIN_WINDOW, NOT_YET_KNOWN, loss_shift, not_yet_known
from .gp import GPHyperparameters, GPTestResult, PastMinimumTest
from .options import AutoWUOptions
from .rollback import SwitchRollback
from .schedule import Schedule
from .spikes import usable_losses
from .switch import RAMP, SWITCH, SwitchRule

# The level the GP sees the losses start at, with ``scale_free``: ln 10, a 10-class cross-entropy at initialisation,
# where the GP's fixed constants (noise floor and initial noise, jitter) and the default mode were measured.
SCALE_FREE_LEVEL = math.log(10)


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
    ramp_pace: Optional[float] = None      # flat_ramp_speedup: the ramp's pace set by this test
    before_move: Optional[bool] = None     # pass_once_moved: the GP passed it, but the loss had not yet moved

    def to_dict(self) -> Dict:
        record = dataclasses.asdict(self)
        for optional in ("failed_fits", "error", "rolled_back_to", "ramp_pace", "before_move"):
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
        options: an ``AutoWUOptions``; or give its fields as keyword arguments (``mode="paper"``,
            ``immediate_cooldown=True``, ...), not both. ``autowu.options`` lists them with their help.
        device: where losses are buffered; by default the device of the first loss (no copy, no sync).
        model: the module whose buffers (BatchNorm statistics) the rollback puts back with the parameters;
            without it they are not put back.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_epochs: int,
                 options: Optional[AutoWUOptions] = None, *, device=None, model: Optional[torch.nn.Module] = None,
                 **option_values):
        if options is not None and option_values:
            raise TypeError("AutoWU: pass options= or option keyword arguments, not both")
        options = options if options is not None else AutoWUOptions.build(**option_values)
        if isinstance(steps_per_epoch, bool) or int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
            raise ConfigError(f"AutoWU: steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
        if isinstance(total_epochs, bool) or int(total_epochs) != total_epochs or total_epochs < 1:
            raise ConfigError(f"AutoWU: total_epochs must be a positive integer, got {total_epochs!r}")
        if options.min_epochs_before_test > total_epochs:
            raise ConfigError(f"AutoWU: min_epochs_before_test must be in [0, total_epochs], got "
                              f"{options.min_epochs_before_test!r}")
        if not optimizer.param_groups:
            raise ValueError("AutoWU: the optimizer has no param groups")
        if model is not None and not options.rollback:
            raise ValueError("AutoWU: model= is used only by rollback (on in the default mode)")

        self.options = options
        self.optimizer = optimizer
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_epochs = int(total_epochs)
        self.total_steps = self.steps_per_epoch * self.total_epochs
        self.rule = SwitchRule(options.patience, options.hold, options.peak_fraction, options.resume_from_argmin,
                               options.peak_highest_of_hold)
        # Without model= the parameters and optimizer state go back, BatchNorm's running statistics do not (they
        # follow the restored weights again within some tens of steps; what evaluation sees at the end is exact).
        self._rollback = (SwitchRollback(optimizer, [model] if model is not None else [], options.rollback_keep)
                          if options.rollback else None)
        self.device = torch.device(device) if device is not None else None
        self.schedule = Schedule.build(self.total_steps, options.min_lr, options.max_lr, options.max_warmup_fraction,
                                       options.warmup_type, options.immediate_cooldown, options.cooldown_type,
                                       options.cooldown_fraction)
        if self.schedule.warmup_end_cap < 1:
            raise ConfigError(f"AutoWU: the cooldown starts at step {self.schedule.cooldown_start_step} of "
                              f"{self.total_steps}, leaving the warmup no step (cooldown_fraction "
                              f"{options.cooldown_fraction}); lower it, or use immediate_cooldown")
        # Steps between GP tests: an epoch (the paper), or fewer where the exponential ramp would otherwise grow
        # the LR by more than max_lr_growth_per_test between two tests (short budgets ramp fast).
        self.test_every = self.steps_per_epoch
        if options.max_lr_growth_per_test is not None and options.warmup_type == "exp":
            per_growth = self.schedule.steps_per_growth(options.max_lr_growth_per_test)
            self.test_every = max(1, min(self.steps_per_epoch, int(per_growth)))
        self.first_test_step = math.ceil(options.min_epochs_before_test * self.steps_per_epoch)

        settings = options.gp_settings
        if options.gp_backend == "fast":
            self._gp_test = PastMinimumTest(settings)
        else:
            from .gp_gpytorch import GPyTorchPastMinimumTest
            self._gp_test = GPyTorchPastMinimumTest(settings)

        initial = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        reference = max(initial)
        self.base_lrs: List[float] = list(initial)
        self.lr_ratios: List[float] = [lr / reference if reference > 0 else 1.0 for lr in initial]

        # Set through connect_ranks by a distributed caller (autowu.deepspeed): reduce the losses buffered since
        # the last test in place, and make every rank take rank 0's decision. Not part of the state.
        self._loss_reducer: Optional[Callable[[torch.Tensor], None]] = None
        self._decision_sync: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self._handed_loss = None  # a loss handed over by an engine hook (receive_loss), taken by the next step()

        self.last_step = 0
        self.phase = "warmup"
        self.history: List[Dict] = []   # TestRecord.to_dict() of every test
        self.switch_curve: Optional[Dict] = None
        self._num_reduced = 0
        self._hyper = GPHyperparameters.initial(settings)
        self._loss_unit: Optional[float] = None   # scale_free: the GP's loss unit, fixed at the first test
        self._loss_moved = False   # autowu.flat_start: the loss has responded to the ramp (fallen or risen)
        self._generator = torch.Generator().manual_seed(options.seed)
        self._losses: Optional[torch.Tensor] = None
        self._restored_losses: Optional[torch.Tensor] = None
        self._set_lrs()

    # ---------------------------------------------------------------- results and the schedule (autowu.schedule)
    @property
    def switch_step(self) -> Optional[int]:
        """The step at which the warmup ended (None before the switch)."""
        return self.rule.switch_step

    @property
    def peak_lr(self) -> Optional[float]:
        """The LR the decay starts from (None before the switch)."""
        return self.rule.peak_lr

    def lr_at(self, step: int) -> float:
        """The schedule's LR for step index ``step`` (0-based): a pure function of the step and the decisions
        taken so far (the switch rule's holds, rewinds, switch step and peak LR)."""
        return self.schedule.lr(step, self.rule)

    def _warmup_lr_at(self, step: float) -> float:
        return self.schedule.warmup_lr_at(step, self.rule)

    def _set_lrs(self) -> None:
        lr = self.lr_at(self.last_step)
        self._last_lr = [lr * ratio for ratio in self.lr_ratios]
        for group, group_lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = group_lr

    # ---------------------------------------------------------------- what a distributed caller connects
    def connect_ranks(self, loss_reducer: Optional[Callable[[torch.Tensor], None]],
                      decision_sync: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        """Run on several ranks: ``loss_reducer(losses)`` averages the losses buffered since the last reduction
        over the ranks, in place (before each test, and before a checkpoint); ``decision_sync(decision)`` makes
        every rank take rank 0's decision. ``None, None`` disconnects."""
        self._loss_reducer, self._decision_sync = loss_reducer, decision_sync

    def receive_loss(self, loss) -> None:
        """The loss of the optimizer step about to be taken, handed over by a hook that sees it (under DeepSpeed
        the engine steps the scheduler itself, without it); the next ``step()`` takes it."""
        self._handed_loss = loss

    @property
    def switch_rollback(self) -> Optional[SwitchRollback]:
        """What the switch puts back (None: the switch does not roll back)."""
        return self._rollback

    def use_rollback(self, rollback: Optional[SwitchRollback]) -> None:
        """Take ``rollback`` as the state to put back at the switch (``autowu.deepspeed`` gives an engine's), or
        None for no rollback (an engine that cannot roll back); before the first step."""
        if self.last_step != 0:
            raise RuntimeError("AutoWU.use_rollback: only before the first step")
        self.options = dataclasses.replace(self.options, rollback=rollback is not None,
                                           rollback_keep=rollback.keep if rollback is not None else None)
        self._rollback = rollback

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
        engine hook handed it over (``receive_loss``); afterwards it is ignored.
        """
        if isinstance(loss, (bool, int)):
            # DeepSpeed retries a scheduler step that raised TypeError as step(train_batch_size): a batch
            # size must never be taken for a loss.
            raise TypeError(f"AutoWU.step expects the step's loss (a float or a scalar tensor), got int {loss}")
        if loss is None:
            loss, self._handed_loss = self._handed_loss, None
        if self.phase == "warmup":
            if loss is None:
                raise ValueError("AutoWU.step(loss): the warmup needs each step's training loss (under DeepSpeed the "
                                 "engine hands it over from engine.backward(loss): build the engine after "
                                 "`import autowu.deepspeed`, or call autowu.deepspeed.attach(engine))")
            self._record(loss)
        self.last_step += 1
        if self.tests_at(self.last_step):
            self._test(at_cap=self.at_cap(self.last_step))
        self._set_lrs()

    def tests_at(self, step: int) -> bool:
        """Whether the ``step()`` that completes optimizer step ``step`` runs a GP test (and its one host sync):
        every ``test_every`` steps of the warmup from ``first_test_step`` on, and at the warmup cap."""
        if self.phase != "warmup":
            return False
        return self.at_cap(step) or (step % self.test_every == 0 and step >= self.first_test_step)

    def at_cap(self, step: int) -> bool:
        """Whether the warmup ends at ``step`` whatever the tests say: the step cap, or a ramp sped up
        (``flat_ramp_speedup``) that has reached ``max_lr``."""
        # (without a pace set, the ramp is never ahead of the step: no position to compute on every step)
        return step >= self.schedule.warmup_end_cap or bool(
            self.rule.paces and self.schedule.ramp_position(step, self.rule) >= self.schedule.max_warmup_steps)

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
        # autowu.flat_start: how the loss has moved (-1 fallen, +1 risen, 0 not, NOT_YET_KNOWN), rank 0's with
        # the test's answer, so that every rank paces its ramp alike
        moved = 0
        if (self.options.flat_ramp_speedup > 1 or self.options.pass_once_moved) and not self._loss_moved:
            window = max(self.test_every, MIN_WINDOW)
            moved = NOT_YET_KNOWN if not_yet_known(losses, usable, window) else loss_shift(losses, usable, window)
        passed, argmin_lr, moved = self._agree(record.passed, record.argmin_lr, moved)
        first_move = moved in (-1, 1)
        self._loss_moved = self._loss_moved or first_move
        if self.options.pass_once_moved and not self._loss_moved and passed:
            passed, record.before_move = False, True
        action = self.rule.decide(passed, at_cap, record.step, argmin_lr, self.schedule)
        if self._rollback is not None and action == SWITCH:
            record.rolled_back_to = self._rollback.restore(self.peak_lr)
        elif self._rollback is not None:
            self._rollback.take(record.step, record.lr)
        record.at_cap = at_cap and self.rule.switched_by_cap
        if self.options.flat_ramp_speedup > 1 and (
                (first_move and action != SWITCH) or (action == RAMP and not self._loss_moved)):
            self._quick_start(record, first_move, moved == NOT_YET_KNOWN)
        record.passed, record.argmin_lr, record.action = passed, argmin_lr, action
        record.passes_in_row, record.switched = self.rule.passes_in_row, action == SWITCH
        record.seconds = time.perf_counter() - started
        self.history.append(record.to_dict())
        if action == SWITCH:
            self._enter_decay(result, losses, usable)

    def _quick_start(self, record: TestRecord, first_move: bool, unknown: bool) -> None:
        """The ramp's pace (``autowu.flat_start``), on an exponential ramp that climbs a decade in fewer than
        ``MIN_STEPS_PER_DECADE`` steps: ``flat_ramp_speedup`` while the loss has not moved; at the test that first
        sees it move, the pace that spreads the rest of the ramp over the steps left to the cap (the steps the
        quick start saved go to the decades that decide). The LR is never taken back: a falling LR raises the
        loss, which the GP, a function of the step, would read as a minimum passed."""
        schedule = self.schedule
        if schedule.warmup_type != "exp":
            return
        own_steps_per_decade = schedule.max_warmup_steps / math.log10(schedule.max_lr / schedule.min_lr)
        if own_steps_per_decade >= MIN_STEPS_PER_DECADE:
            return
        if first_move:
            steps_left = schedule.warmup_end_cap - record.step
            ramp_left = schedule.max_warmup_steps - schedule.ramp_position(record.step, self.rule)
            pace = min(1.0, ramp_left / steps_left) if steps_left > 0 else 1.0   # reaches the top at the cap
            if pace != self.rule.pace:
                self.rule.set_pace(record.step, pace)
                record.ramp_pace = pace
        elif not unknown and self.rule.pace == 1.0:
            self.rule.set_pace(record.step, self.options.flat_ramp_speedup)
            record.ramp_pace = self.options.flat_ramp_speedup

    def _measure(self, at_cap: bool):
        """The GP test on the losses so far (all-reduced over ranks first): the record, with this rank's
        ``passed`` and ``argmin_lr``, the GP result (None if there was none), the losses and the usable mask."""
        n = self.last_step
        self.reduce_pending_losses()  # one all-reduce per test
        losses = self._losses[:n].double().cpu().numpy()  # the one host sync of a test
        usable = usable_losses(losses, self.options.spike_threshold)
        record = TestRecord(step=n, epoch=n / self.steps_per_epoch, lr=self._warmup_lr_at(n - 1),
                            nonfinite=int((~np.isfinite(losses)).sum()),
                            spikes_ignored=int(np.isfinite(losses).sum() - usable.sum()), at_cap=at_cap)
        result = None
        if usable.sum() >= 2:
            result = self._gp_result(losses / self._unit_of(losses, usable), usable, record)
        if result is not None and result.argmin_x:
            record.argmin_lr = float(np.mean([self._warmup_lr_at(x * n) for x in result.argmin_x]))
            record.passed = result.passed
            record.probability, record.probabilities = result.probability, list(result.probabilities)
            record.votes, record.failed_fits = result.votes, result.failed_fits
        else:
            record.argmin_lr = self._warmup_lr_at(n - 1)
        return record, result, losses, usable

    def _unit_of(self, losses: np.ndarray, usable: np.ndarray) -> float:
        """What the GP sees as one loss unit: with ``scale_free``, the one that puts the mean magnitude of the
        usable losses at the first test at ``SCALE_FREE_LEVEL`` (kept from then on, so that the GP's
        hyperparameters carried from test to test stay in one unit); otherwise 1, the losses as they are (the
        paper)."""
        if not self.options.scale_free:
            return 1.0
        if self._loss_unit is None:
            level = float(np.mean(np.abs(losses[usable]))) if usable.any() else SCALE_FREE_LEVEL
            self._loss_unit = level / SCALE_FREE_LEVEL if math.isfinite(level) and level > 0 else 1.0
        return self._loss_unit

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

    def _agree(self, passed: bool, argmin_lr: float, moved: int):
        """Every rank takes rank 0's answer (through ``decision_sync``), so all switch at the same step and pace
        the ramp alike."""
        if self._decision_sync is None:
            return passed, argmin_lr, moved
        decision = torch.tensor([float(passed), argmin_lr, float(moved)], dtype=torch.float64,
                                device=self._losses.device)
        synced = self._decision_sync(decision).cpu()
        return bool(synced[0] > 0.5), float(synced[1]), int(round(float(synced[2])))

    def _enter_decay(self, result: Optional[GPTestResult], losses: np.ndarray, usable: np.ndarray) -> None:
        n = self.last_step
        self.phase = "decay"
        self._losses = self._restored_losses = None  # the buffer is only needed during warmup
        if result is not None:
            # What the GP saw and predicted at the switch, for logs and plots.
            unit = self._unit_of(losses, usable)  # the curve back in the losses' own units
            self.switch_curve = {"step": n, "x": result.grid.tolist(), "mean": (result.curve_mean * unit).tolist(),
                                 "std": (result.curve_std * unit).tolist(),
                                 "lr": [self._warmup_lr_at(x * n) for x in result.grid],
                                 "losses": losses.tolist(), "usable": usable.tolist()}

    def reduce_pending_losses(self) -> None:
        """All-reduce (through ``connect_ranks``' ``loss_reducer``) the losses buffered since the last reduction.

        Called before each test, and by the DeepSpeed hook before a checkpoint (a collective, so on every
        rank): a checkpoint then holds the ranks' mean losses, not one rank's own.
        """
        n = self.last_step
        if self._loss_reducer is not None and self._losses is not None and n > self._num_reduced:
            self._loss_reducer(self._losses[self._num_reduced:n])
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
            "generator_state": self._generator.get_state(), "losses": losses, "loss_unit": self._loss_unit,
            "loss_moved": self._loss_moved,
            "settings": self.state_dict_settings(),
            **({"rollback": self._rollback.state_dict()} if self._rollback is not None else {}),
        }

    def state_dict_settings(self) -> Dict:
        """The settings a checkpoint must have been made with to resume exactly: the options, the run's length
        and the test cadence they give."""
        return {"steps_per_epoch": self.steps_per_epoch, "total_epochs": self.total_epochs,
                "test_every": self.test_every, "first_test_step": self.first_test_step, **self.options.as_dict()}

    def load_state_dict(self, state: Dict) -> None:
        mine = self.state_dict_settings()
        # A checkpoint from before scale_free (flat_ramp_speedup, pass_once_moved) existed fitted the losses as they
        # were (ramped at its own pace, passed from the first test).
        saved = {"scale_free": False, "flat_ramp_speedup": 1.0, "pass_once_moved": False, **state["settings"]}
        mismatched = {k: (v, mine.get(k)) for k, v in saved.items() if mine.get(k) != v}
        if mismatched:
            raise ConfigError("AutoWU.load_state_dict: the checkpoint was made with other settings "
                             + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in mismatched.items()))
        self.last_step = int(state["last_step"])
        self.phase = state["phase"]
        self.history = [dict(r) for r in state["history"]]
        self.switch_curve = state["switch_curve"]
        self.rule.load_state_dict(_rule_state(state))
        self._num_reduced = int(state["num_reduced"])
        self._hyper = GPHyperparameters.from_state_dict(state["gp_hyperparameters"])
        self._generator.set_state(state["generator_state"])
        self._loss_unit = state.get("loss_unit")
        self._loss_moved = bool(state.get("loss_moved", False))
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
