"""The default mode's quick start (``autowu.flat_start``): the ramp runs faster while the loss has not moved, and
spreads what is left over the steps left once it has."""
import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from autowu import AutoWU
from autowu.flat_start import loss_shift, not_yet_known
from autowu.schedule import Schedule
from autowu.synthetic import LossCurve, run_scheduler


def _losses(values, seed=0, noise=0.002):
    return np.asarray(values, dtype=np.float64) + noise * np.random.default_rng(seed).standard_normal(len(values))


def test_a_flat_loss_has_not_moved_and_a_fall_or_a_rise_has():
    usable = np.ones(40, dtype=bool)
    flat = _losses(np.full(40, 2.306))
    assert loss_shift(flat, usable, window=4) == 0
    falling = _losses(np.r_[np.full(32, 2.306), np.linspace(2.30, 2.20, 8)])
    assert loss_shift(falling, usable, window=4) == -1
    rising = _losses(np.r_[np.full(32, 2.306), np.linspace(2.35, 2.60, 8)])
    assert loss_shift(rising, usable, window=4) == 1
    # a drift far beyond the noise but of 0.2% of the level: not yet the useful LRs
    drift = _losses(np.linspace(2.306, 2.301, 40), noise=0.0002)
    assert loss_shift(drift, usable, window=4) == 0


def test_a_loss_left_out_does_not_count_and_too_few_losses_are_not_yet_known():
    losses = _losses(np.full(12, 2.306))
    usable = np.ones(12, dtype=bool)
    losses[-1], usable[-1] = 40.0, False  # a spike the spike rule left out
    assert loss_shift(losses, usable, window=4) == 0
    assert not_yet_known(losses[:7], usable[:7], window=4) and not not_yet_known(losses, usable, window=4)
    assert not_yet_known(losses, usable, window=6)  # 11 usable < two windows of 6


def test_the_ramp_advances_by_the_pace_in_force_holds_aside():
    ramp = Schedule(min_lr=1e-5, max_lr=1.0, max_warmup_steps=100, total_steps=500, cooldown_start_step=500)
    paced = SimpleNamespace(holds=[], rewinds=[], paces=[[10, 2.0], [20, 0.5]])
    assert ramp.ramp_position(30, paced) == pytest.approx(10 + 2 * 10 + 0.5 * 10)
    held = SimpleNamespace(holds=[[22, 26]], rewinds=[[26, 1.5]], paces=[[10, 2.0], [20, 0.5]])
    assert ramp.ramp_position(30, held) == pytest.approx(35 - 0.5 * 4 - 1.5)
    plain = SimpleNamespace(holds=[[22, 26]], rewinds=[], switch_step=None, peak_lr=None)  # no paces: as before
    assert ramp.ramp_position(30, plain) == 26
    assert ramp.warmup_lr(250) == pytest.approx(1.0)  # past the cap: the cap's LR


def _short_run(**options):
    """A large batch for few epochs: 12 steps an epoch, 20 epochs, a ramp capped at 48 steps; the loss flat for
    the first three decades of the ramp."""
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=0.1)
    return AutoWU(optimizer, 12, 20, immediate_cooldown=True, **options)


CURVE = LossCurve(learn_at=-1.6, width=0.25, explode_at=-0.4, sharpness=0.15, noise=0.003)


def test_on_a_short_run_the_quick_start_reaches_the_deciding_decades_sooner_and_slower():
    quick = _short_run()
    lrs = run_scheduler(quick, CURVE, seed=1)
    paces = [r["ramp_pace"] for r in quick.history if "ramp_pace" in r]
    assert paces[0] == 2.0 and 0 < paces[1] < 1.0  # sped up while flat; slower than its own once it moved
    plain = _short_run(flat_ramp_speedup=1.0)
    plain_lrs = run_scheduler(plain, CURVE, seed=1)
    assert not any("ramp_pace" in r for r in plain.history)
    onset = 10 ** CURVE.learn_at / 10  # a decade below where the loss falls fastest

    def first_step_at(lrs_):
        return next(i for i, lr in enumerate(lrs_) if lr >= onset)
    assert first_step_at(lrs) < first_step_at(plain_lrs)
    # ramp steps per decade between the onset and the switch: more with the quick start (on this curve 13.5
    # against 10.5)
    def steps_per_decade(sched, lrs_):
        start = first_step_at(lrs_)
        return (sched.switch_step - start) / math.log10(lrs_[sched.switch_step - 1] / lrs_[start])
    assert steps_per_decade(quick, lrs) > 1.2 * steps_per_decade(plain, plain_lrs)
    best = CURVE.best_lr()
    assert best / 2 <= quick.peak_lr <= best * 2 and not quick.history[-1]["at_cap"]


def test_the_papers_mode_ramps_at_its_own_pace():
    paper = _short_run(mode="paper")
    run_scheduler(paper, CURVE, seed=1)
    assert paper.options.flat_ramp_speedup == 1.0 and paper.rule.paces == []


def test_a_run_cut_during_the_quick_start_resumes_identically():
    whole = _short_run()
    whole_lrs = run_scheduler(whole, CURVE, seed=2)
    set_at = [r["step"] for r in whole.history if "ramp_pace" in r]
    assert len(set_at) == 2
    for cut in (set_at[0] + 1, set_at[1] + 1):  # sped up; slowed after the move
        first = _short_run()
        lrs = run_scheduler(first, CURVE, seed=2, stop_at=cut)
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        resumed = _short_run()
        resumed.load_state_dict(torch.load(buffer, weights_only=False))
        lrs += run_scheduler(resumed, CURVE, seed=2)
        assert lrs == whole_lrs and resumed.peak_lr == whole.peak_lr


def test_a_checkpoint_from_before_the_quick_start_resumes_only_as_it_ran():
    sched = _short_run()
    run_scheduler(sched, CURVE, seed=3, stop_at=6)
    state = sched.state_dict()
    del state["settings"]["flat_ramp_speedup"]
    with pytest.raises(ValueError, match="flat_ramp_speedup=1.0 \\(now 2.0\\)"):
        _short_run().load_state_dict(state)
    resumed = _short_run(flat_ramp_speedup=1.0)
    resumed.load_state_dict(state)
    assert resumed.last_step == 6


@pytest.mark.parametrize("value", [0.5, 0, -1, True, "2"])
def test_a_speedup_below_1_is_refused(value):
    with pytest.raises(ValueError, match="flat_ramp_speedup"):
        _short_run(flat_ramp_speedup=value)


def test_a_ramp_slow_enough_ramps_as_before():
    """50 steps an epoch for 60 epochs: a ramp of 600 steps, 120 a decade. The quick start leaves it as it was
    (sped up through its flat start, one seed in 20 of a 40-steps-a-decade SGD run switched at 0.6 and diverged)."""
    def run(speedup):
        params = [torch.nn.Parameter(torch.zeros(1))]
        sched = AutoWU(torch.optim.SGD(params, lr=0.1), 50, 60, immediate_cooldown=True, flat_ramp_speedup=speedup)
        return sched, run_scheduler(sched, LossCurve(), seed=4)
    (quick, lrs), (plain, plain_lrs) = run(2.0), run(1.0)
    assert quick.rule.paces == [] and lrs == plain_lrs and quick.peak_lr == plain.peak_lr


def test_a_loss_that_rises_before_it_ever_falls_still_ends_the_warmup():
    """``pass_once_moved`` waits for the loss to move, either way: a run that diverges before it learns (no fall,
    then a steep rise) switches by its tests, back below the LRs where the loss rose."""
    curve = LossCurve(drop=0.0, blowup=0.5, explode_at=-3.0, sharpness=0.2, noise=0.01)
    params = [torch.nn.Parameter(torch.zeros(1))]
    sched = AutoWU(torch.optim.SGD(params, lr=0.1), 50, 60, immediate_cooldown=True)
    run_scheduler(sched, curve, seed=0)
    assert sched.switch_step is not None and not sched.history[-1]["at_cap"]
    assert sched.peak_lr < 10 ** curve.explode_at
    assert not any(r.get("before_move") for r in sched.history[-2:])
