"""AutoWU on synthetic loss curves of known minimum, real gpytorch for the reference test."""
import io
import json
import math

import numpy as np
import pytest
import torch

from autowu import AutoWU, GPTestSettings, PastMinimumTest
from autowu.gp import GPHyperparameters
from autowu.gp_gpytorch import GPyTorchPastMinimumTest
from autowu.synthetic import LossCurve, exponential_warmup_lrs, run_scheduler
from conftest import REPO

STEPS_PER_EPOCH, EPOCHS = 50, 60


def make(groups_lrs=(0.1,), **kwargs):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in groups_lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, groups_lrs)], lr=0.1)
    kwargs.setdefault("steps_per_epoch", STEPS_PER_EPOCH)
    kwargs.setdefault("total_epochs", EPOCHS)
    return AutoWU(optimizer, **kwargs)


def test_warmup_is_the_papers_exponential_then_linear():
    assert make().schedule.max_warmup_steps == STEPS_PER_EPOCH * EPOCHS // 5  # the default ramps over a fifth
    sched = make(mode="paper")
    warmup_steps = sched.schedule.max_warmup_steps
    assert warmup_steps == STEPS_PER_EPOCH * EPOCHS // 2
    seen = []
    for _ in range(10):
        seen.append(sched.get_last_lr()[0])
        sched.step(1.0)
    expected = [1e-5 * (1.0 / 1e-5) ** (t / warmup_steps) for t in range(10)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert sched.optimizer.param_groups[0]["lr"] == sched.get_last_lr()[0]
    linear = make(warmup_type="linear", mode="paper")
    assert linear.schedule.warmup_lr(warmup_steps / 2) == pytest.approx(1e-5 + (1.0 - 1e-5) / 2)


def test_param_groups_keep_their_ratios():
    sched = make(groups_lrs=(0.4, 0.1, 0.0))
    for _ in range(120):
        sched.step(2.0)
        lrs = [g["lr"] for g in sched.optimizer.param_groups]
        assert lrs[1] == pytest.approx(lrs[0] / 4) and lrs[2] == 0.0
    assert sched.get_last_lr() == lrs


CURVES = {
    "default": LossCurve(),
    "early_optimum": LossCurve(learn_at=-4.0, explode_at=-2.5, noise=0.01),
    "late_optimum": LossCurve(learn_at=-2.5, explode_at=-0.5, noise=0.05),
    "noisy": LossCurve(noise=0.1),
}


@pytest.mark.parametrize("mode", ["default", "paper"])
@pytest.mark.parametrize("name", sorted(CURVES))
def test_switch_lands_near_the_known_optimum_and_never_before_it(name, mode):
    curve = CURVES[name]
    sched = make(immediate_cooldown=True, mode=mode)
    run_scheduler(sched, curve, seed=1)
    best = curve.best_lr()
    assert sched.switch_step is not None and sched.switch_step <= sched.schedule.max_warmup_steps
    # Never before the optimum: the warmup had already passed the best LR when it switched.
    assert sched.schedule.warmup_lr_at(sched.switch_step - 1, sched.rule) > best
    assert best / 2 < sched.peak_lr < best * 2, (sched.peak_lr, best)
    switched = [r for r in sched.history if r["switched"]]
    assert len(switched) == 1 and not switched[0]["at_cap"]
    assert [r["passed"] for r in sched.history[-sched.options.patience:]] == [True] * sched.options.patience


def test_the_lr_holds_while_a_pass_is_confirmed_and_the_ramp_resumes_after_a_failure():
    sched = make(immediate_cooldown=True)
    lrs = run_scheduler(sched, CURVES["default"], seed=1)
    for start, end in sched.rule.holds:
        assert len(set(lrs[start:end])) == 1  # held: no overshoot while confirming
        test = next(r for r in sched.history if r["step"] == start)
        assert test["passed"] and test["action"] == "hold"
    # The last hold ended in the switch; its LR is the LR at the first pass, not 1.78x per confirming epoch.
    assert sched.rule.holds and sched.rule.holds[-1][1] == sched.switch_step
    paper = make(immediate_cooldown=True, mode="paper")
    paper_lrs = run_scheduler(paper, CURVES["default"], seed=1)
    assert max(lrs) < max(paper_lrs)
    # A hold that a failing test ends resumes the ramp where it stopped.
    rule_test = make(immediate_cooldown=True)
    rule_test.rule.holds = [[100, 150]]
    assert rule_test.schedule.warmup_lr_at(170, rule_test.rule) == rule_test.schedule.warmup_lr(120)
    assert rule_test.schedule.warmup_lr_at(130, rule_test.rule) == rule_test.schedule.warmup_lr(100)


def test_tests_come_often_enough_on_a_fast_ramp():
    assert make(mode="paper").test_every == STEPS_PER_EPOCH
    # 5 decades over 600 steps: 1.8x every 30 steps, so a test every 30 steps, not every 50.
    assert make().test_every == int(600 * math.log(1.8) / math.log(1e5)) == 30
    assert make(total_epochs=400).test_every == STEPS_PER_EPOCH  # a slow ramp: once an epoch, never less


def test_a_recorded_real_curve_where_the_old_filter_delayed_the_switch():
    """tests/fixtures/digits_cnn_adamp_seed0_ramp.json: losses of a real run (benchmarks/bench_schedules.py,
    task digits_cnn_adamp: an 8x8-digits CNN with BatchNorm, timm's AdamP, seed 0) along the paper's ramp. The
    paper's test passes at epochs 11, 12 and 13. The earlier spike filter (a centred running median) removed 7
    losses of the noisy rising flank at epoch 12; that test fell to p=0.67, the count restarted, and the switch
    came at epoch 15 instead of 13: the run ended at 80.8% top-1 instead of 98.3%."""
    fixture = json.loads((REPO / "tests" / "fixtures" / "digits_cnn_adamp_seed0_ramp.json").read_text())
    losses = np.array(fixture["losses"])
    steps_per_epoch = fixture["steps_per_epoch"]
    runs = {}
    for name, kwargs in {"paper": dict(mode="paper"),
                         # the paper's procedure with only the spike rule added
                         "spike_rule": dict(mode="paper", spike_threshold=6.0)}.items():
        sched = make(steps_per_epoch=steps_per_epoch, total_epochs=fixture["total_epochs"],
                     immediate_cooldown=True, **kwargs)
        for loss in losses:
            sched.step(float(loss))
            if sched.phase != "warmup":
                break
        runs[name] = sched
    assert runs["paper"].switch_step == 13 * steps_per_epoch
    assert runs["spike_rule"].switch_step == runs["paper"].switch_step
    assert runs["spike_rule"].peak_lr == pytest.approx(runs["paper"].peak_lr, rel=0.3)
    # The rule keeps the top of the rise: on the flank (the last two epochs) it removes at most a few losses.
    for test in runs["spike_rule"].history[-3:]:
        assert test["passed"] and test["spikes_ignored"] <= 5


def test_no_test_before_an_epoch_of_losses_when_asked():
    """tests/fixtures/digits_cnn_adamp_seed4_first_steps.json: the first 9 losses of a real run whose tests came
    every 3 steps (max_lr_growth_per_test 1.4): the GP saw 6 and then 9 noisy losses at LR 1.2e-5 to 1.7e-5,
    passed twice, and the run switched at 1.4e-5 (64.4% top-1, against 98.6-99.7% for its other seeds).
    ``min_epochs_before_test=1`` waits for an epoch of losses, as the paper's first test does. The default's
    ``pass_once_moved`` refuses those passes too: the loss had not yet moved from where it started."""
    fixture = json.loads((REPO / "tests" / "fixtures" / "digits_cnn_adamp_seed4_first_steps.json").read_text())
    runs = {}
    for min_epochs, once_moved in ((0, False), (1, False), (0, True)):
        sched = make(steps_per_epoch=fixture["steps_per_epoch"], total_epochs=fixture["total_epochs"],
                     immediate_cooldown=True, max_lr_growth_per_test=fixture["max_lr_growth_per_test"],
                     min_epochs_before_test=min_epochs, pass_once_moved=once_moved, flat_ramp_speedup=1.0)
        for loss in fixture["losses"]:
            sched.step(float(loss))
        runs[min_epochs, once_moved] = sched
    early = runs[0, False]
    assert early.test_every == 3 and [t["passed"] for t in early.history] == [False, True, True]
    assert early.switch_step == 9 and early.peak_lr < 2e-5   # the failure, as recorded
    once_moved = runs[0, True]
    assert [t["passed"] for t in once_moved.history] == [False, False, False]
    assert [t.get("before_move", False) for t in once_moved.history] == [False, True, True]  # the GP's passes
    assert once_moved.switch_step is None and once_moved.phase == "warmup"
    waiting = runs[1, False]
    assert waiting.first_test_step == 22 and waiting.history == [] and waiting.phase == "warmup"
    assert [waiting.tests_at(s) for s in (21, 22, 24, 25)] == [False, False, True, False]
    with pytest.raises(ValueError, match="min_epochs_before_test"):
        make(min_epochs_before_test=-1)


def test_a_switch_after_a_hold_takes_the_highest_minimum_of_the_hold_on_a_recorded_real_curve():
    """tests/fixtures/digits_cnn_adamp_seed3_default_hold.json: a real run of the default (digits_cnn_adamp,
    seed 3) up to its switch. Its first passing test (step 102) put the minimum at LR 0.033; the LR held, the
    losses rose under it, and the confirming test (step 108) put it at 0.017, where the run went on (98.06%
    top-1; from 0.033, 98.61%). The default now takes the hold's highest predicted minimum; the paper's rule,
    the last test's."""
    fixture = json.loads((REPO / "tests" / "fixtures" / "digits_cnn_adamp_seed3_default_hold.json").read_text())
    runs = {}
    for highest in (True, False):
        sched = make(steps_per_epoch=fixture["steps_per_epoch"], total_epochs=fixture["total_epochs"],
                     immediate_cooldown=True, peak_highest_of_hold=highest,
                     flat_ramp_speedup=1.0)  # at the pace the losses were recorded at (before the quick start)
        for loss in fixture["losses"]:
            sched.step(float(loss))
        runs[highest] = sched
    recorded = fixture["recorded"]
    for sched in runs.values():  # the same tests and the same switch step either way
        first, confirming = sched.history[-2:]
        assert first["passed"] and first["action"] == "hold" and confirming["switched"]
        assert sched.switch_step == recorded["switch_step"] == len(fixture["losses"])
        assert confirming["argmin_lr"] < first["argmin_lr"] / 1.5
    assert runs[False].peak_lr == pytest.approx(recorded["peak_lr"], rel=1e-9) == runs[False].history[-1]["argmin_lr"]
    assert runs[True].peak_lr == runs[True].history[-2]["argmin_lr"]
    assert runs[True].peak_lr == pytest.approx(recorded["peak_lr_with_peak_highest_of_hold"], rel=1e-9)
    assert runs[True].peak_lr <= runs[True].history[-2]["lr"]  # here below the LR the run held
    assert make().rule.peak_highest_of_hold and not make(mode="paper").rule.peak_highest_of_hold


def test_the_highest_minimum_of_a_hold_is_kept_across_tests_and_checkpoints():
    """SwitchRule alone: with patience 3 the hold has two confirming tests; a later, higher minimum (the loss
    still falling under the held LR) is taken as it is; a failed fit (NaN) is left out; a hold that fails
    starts the count again; the running highest survives state_dict/load_state_dict mid-hold."""
    from types import SimpleNamespace

    from autowu.switch import SwitchRule
    schedule = SimpleNamespace(warmup_lr_at=lambda step, rule: 0.1, ramp_position=lambda step, rule: step,
                               position_of=lambda lr: 0.0)
    rule = SwitchRule(patience=3, hold=True, peak_highest_of_hold=True)
    assert rule.decide(True, False, 10, 0.02, schedule) == "hold"
    assert rule.decide(True, False, 20, float("nan"), schedule) == "hold"
    copy = SwitchRule(patience=3, hold=True, peak_highest_of_hold=True)
    copy.load_state_dict(rule.state_dict())
    assert copy.hold_highest_argmin_lr == 0.02
    assert copy.decide(True, False, 30, 0.01, schedule) == "switch" and copy.peak_lr == 0.02
    rising = SwitchRule(patience=2, hold=True, peak_highest_of_hold=True)
    rising.decide(True, False, 10, 0.13, schedule)
    assert rising.decide(True, False, 20, 0.17, schedule) == "switch" and rising.peak_lr == 0.17
    failed = SwitchRule(patience=2, hold=True, peak_highest_of_hold=True)
    failed.decide(True, False, 10, 0.05, schedule)
    assert failed.decide(False, False, 20, 0.04, schedule) == "ramp"
    failed.decide(True, False, 30, 0.01, schedule)
    assert failed.decide(True, False, 40, 0.008, schedule) == "switch" and failed.peak_lr == 0.01
    last = SwitchRule(patience=2, hold=True)  # the paper's rule: the last test's minimum
    last.decide(True, False, 10, 0.05, schedule)
    last.decide(True, False, 20, 0.03, schedule)
    assert last.peak_lr == 0.03
    # A checkpoint from before the highest minimum was kept resumes with its hold's first test's.
    old = rule.state_dict()
    del old["hold_highest_argmin_lr"]
    resumed = SwitchRule(patience=3, hold=True, peak_highest_of_hold=True)
    resumed.load_state_dict(old)
    assert resumed.hold_highest_argmin_lr == 0.02


def test_no_minimum_runs_to_the_cap_and_takes_the_gp_argmin():
    curve = LossCurve(blowup=0.0, learn_at=-1.5)  # still falling at max_lr
    sched = make(immediate_cooldown=True)
    run_scheduler(sched, curve, seed=2)
    assert sched.switch_step == sched.schedule.max_warmup_steps
    last = sched.history[-1]
    assert last["at_cap"] and last["switched"]
    assert sched.peak_lr == last["argmin_lr"]
    assert sched.peak_lr > 0.2  # the minimum predicted near the end of a still-falling curve


@pytest.mark.parametrize("seed", [3, 10, 11])
@pytest.mark.parametrize("spike_rate", [0.01, 0.03])
def test_loss_spikes_do_not_end_the_warmup(spike_rate, seed):
    curve = CURVES["default"]
    clean = make(immediate_cooldown=True)
    run_scheduler(clean, curve, seed=seed)
    spiky = make(immediate_cooldown=True)
    run_scheduler(spiky, curve, seed=seed, spike_rate=spike_rate, nonfinite_rate=0.005)
    assert spiky.switch_step >= clean.switch_step - STEPS_PER_EPOCH  # never early
    assert abs(spiky.switch_step - clean.switch_step) <= 3 * STEPS_PER_EPOCH
    assert spiky.peak_lr == pytest.approx(clean.peak_lr, rel=0.5)
    assert sum(r["spikes_ignored"] for r in spiky.history[-1:]) > 0


@pytest.mark.parametrize("spike_rate", [0.01, 0.03])
def test_without_the_spike_filter_the_papers_test_ends_the_warmup_at_once(spike_rate):
    """The failure the filter exists for: 100 steps an epoch, spikes of 5x; most seeds ruined by epoch 6."""
    kwargs = dict(steps_per_epoch=100, total_epochs=100, immediate_cooldown=True)
    ruined = 0
    for seed in range(5):
        unfiltered = make(mode="paper", **kwargs)
        run_scheduler(unfiltered, CURVES["default"], seed=seed, spike_rate=spike_rate, stop_at=1000)
        ruined += unfiltered.switch_step is not None and unfiltered.peak_lr < 1e-4
        filtered = make(**kwargs)
        run_scheduler(filtered, CURVES["default"], seed=seed, spike_rate=spike_rate, stop_at=1000)
        assert filtered.phase == "warmup"
    assert ruined >= 3


def test_nonfinite_losses_are_ignored():
    sched = make(immediate_cooldown=True)
    run_scheduler(sched, CURVES["default"], seed=4, nonfinite_rate=0.05)
    assert sched.history[-1]["nonfinite"] > 0
    assert math.isfinite(sched.peak_lr) and sched.switch_step is not None


def test_cooldowns_reach_zero_at_the_last_step():
    immediate = make(immediate_cooldown=True)
    lrs = run_scheduler(immediate, CURVES["default"], seed=5)
    s = immediate.switch_step
    assert lrs[s] == immediate.peak_lr
    assert all(a >= b for a, b in zip(lrs[s:], lrs[s + 1:]))  # monotone cosine
    assert immediate.get_last_lr() == [0.0]
    mid = (s + immediate.total_steps) // 2
    assert lrs[mid] == pytest.approx(immediate.peak_lr * 0.5 * (1 + math.cos(math.pi * (mid - s) / (immediate.total_steps - s))))

    delayed = make(immediate_cooldown=False, cooldown_fraction=0.2)
    lrs = run_scheduler(delayed, CURVES["default"], seed=5)
    start = delayed.schedule.cooldown_start_step
    assert start == int(0.8 * delayed.total_steps)
    assert set(lrs[delayed.switch_step:start + 1]) == {delayed.peak_lr}
    assert lrs[start + 1] < delayed.peak_lr and delayed.get_last_lr() == [0.0]

    half = make(immediate_cooldown=True, cooldown_type="half_cosine")
    lrs = run_scheduler(half, CURVES["default"], seed=5)
    assert lrs[half.switch_step] == pytest.approx(half.peak_lr * 0.5)  # the paper's half_cosine
    assert half.get_last_lr() == [0.0]

    linear = make(immediate_cooldown=True, cooldown_type="linear")
    lrs = run_scheduler(linear, CURVES["default"], seed=5)
    s, total = linear.switch_step, linear.total_steps
    assert lrs[s] == linear.peak_lr and linear.get_last_lr() == [0.0]
    for step in (s + 1, (s + total) // 2, total - 1):  # a straight line from the peak to 0 at the last step
        assert lrs[step] == pytest.approx(linear.peak_lr * (1 - (step - s) / (total - s)))


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("mode,cut_epochs", [("paper", 11.5), ("paper", 40), ("default", 11.5), ("default", 40),
                                            ("default", "in_hold")])  # mid-warmup (mid-epoch), after the switch
@pytest.mark.parametrize("spike_rate", [0.0, 0.02])
def test_resume_gives_the_identical_lr_sequence(mode, cut_epochs, spike_rate):
    curve = CURVES["default"]
    whole = make(immediate_cooldown=True, mode=mode)
    whole_lrs = run_scheduler(whole, curve, seed=6, spike_rate=spike_rate)
    if cut_epochs == "in_hold":  # while a pass is being confirmed
        assert whole.rule.holds
        cut = whole.rule.holds[-1][0] + 7
    else:
        cut = int(cut_epochs * STEPS_PER_EPOCH)
    first = make(immediate_cooldown=True, mode=mode)
    lrs = run_scheduler(first, curve, seed=6, spike_rate=spike_rate, stop_at=cut)
    state = _roundtrip(first.state_dict())
    resumed = make(immediate_cooldown=True, mode=mode)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == first.get_last_lr()
    lrs += run_scheduler(resumed, curve, seed=6, spike_rate=spike_rate)
    assert lrs == whole_lrs
    assert resumed.switch_step == whole.switch_step and resumed.peak_lr == whole.peak_lr
    assert [r["probabilities"] for r in resumed.history] == [r["probabilities"] for r in whole.history]


@pytest.mark.parametrize("layout", ["pass_count_under_rule", "pass_count_at_top"])
def test_checkpoints_in_earlier_layouts_resume_identically(layout):
    """Checkpoints from before the switch rule's state was saved whole under "rule" kept its parts at the top
    level (and, earlier still, the pass count too): cut while a pass is being confirmed, so that every part
    matters, they resume to the same LRs and the same switch."""
    curve = CURVES["default"]
    whole = make(immediate_cooldown=True)
    whole_lrs = run_scheduler(whole, curve, seed=6)
    cut = whole.rule.holds[-1][0] + 7
    first = make(immediate_cooldown=True)
    lrs = run_scheduler(first, curve, seed=6, stop_at=cut)
    state = _roundtrip(first.state_dict())
    rule = state.pop("rule")
    assert rule["holds"] and rule["hold_argmin_lr"] is not None  # cut inside a hold
    state.update({k: rule[k] for k in ("holds", "rewinds", "hold_argmin_lr", "hold_highest_argmin_lr")})
    if layout == "pass_count_under_rule":
        state["rule"] = {"passes_in_row": rule["passes_in_row"]}
    else:
        state["passes_in_row"] = rule["passes_in_row"]
    resumed = make(immediate_cooldown=True)
    resumed.load_state_dict(state)
    assert resumed.rule.state_dict() == rule
    lrs += run_scheduler(resumed, curve, seed=6)
    assert lrs == whole_lrs
    assert (resumed.switch_step, resumed.peak_lr) == (whole.switch_step, whole.peak_lr)


def test_resume_refuses_other_settings():
    sched = make()
    run_scheduler(sched, CURVES["default"], stop_at=120)
    other = make(total_epochs=EPOCHS + 1)
    with pytest.raises(ValueError, match="total_epochs"):
        other.load_state_dict(sched.state_dict())
    with pytest.raises(ValueError, match="mode='default' \\(now 'paper'\\)"):
        make(mode="paper").load_state_dict(sched.state_dict())


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="cooldown_type"):
        make(cooldown_type="linear_decay")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make(steps_per_epoch=0)
    with pytest.raises(ValueError, match="min_lr"):
        make(min_lr=2.0)
    with pytest.raises(ValueError, match="mode"):
        make(mode="papr")
    with pytest.raises(ValueError, match="peak_fraction"):
        make(peak_fraction=1.5)
    with pytest.raises(ValueError, match="max_lr_growth_per_test"):
        make(max_lr_growth_per_test=1.0)
    sched = make()
    with pytest.raises(TypeError, match="int"):
        sched.step(2048)  # DeepSpeed's fallback passes the batch size: never a loss
    with pytest.raises(ValueError, match="loss"):
        sched.step()
    assert sched.last_step == 0


def test_history_records_every_test():
    sched = make(immediate_cooldown=True)
    run_scheduler(sched, CURVES["default"], seed=7)
    assert [r["step"] for r in sched.history] == [sched.test_every * (i + 1) for i in range(len(sched.history))]
    paper = make(immediate_cooldown=True, mode="paper")
    run_scheduler(paper, CURVES["default"], seed=7)
    assert [r["step"] for r in paper.history] == [STEPS_PER_EPOCH * (i + 1) for i in range(len(paper.history))]
    for record in sched.history:
        assert {"step", "lr", "probability", "votes", "argmin_lr", "passed", "switched"} <= set(record)
        assert len(record["probabilities"]) == 5 and 0 <= record["votes"] <= 5
    assert sched.switch_curve is not None and len(sched.switch_curve["mean"]) == 500


def test_fast_test_matches_the_gpytorch_reference():
    """Same draws, same hyperparameter trajectory, same decisions as the paper's computation in gpytorch."""
    curve = CURVES["default"]
    lrs = exponential_warmup_lrs(1500, 1500)
    losses = curve.sample(lrs, seed=8)
    fast, reference = PastMinimumTest(), GPyTorchPastMinimumTest()
    h_fast = GPHyperparameters.initial(fast.settings)
    h_ref = h_fast.copy()
    g_fast, g_ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    decisions = []
    for n in range(100, 1501, 100):
        y = losses[:n]
        a, h_fast = fast(y, np.isfinite(y), h_fast, g_fast)
        b, h_ref = reference(y, np.isfinite(y), h_ref, g_ref)
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=2e-3)
        np.testing.assert_allclose(h_fast.raw, h_ref.raw, atol=1e-5)
        assert a.argmin_x == b.argmin_x
        decisions.append((a.passed, b.passed))
    assert all(x == y for x, y in decisions) and any(x for x, _ in decisions)


def test_gp_numerical_failures_are_retried_not_raised(monkeypatch):
    test = PastMinimumTest(GPTestSettings())
    losses = CURVES["default"].sample(exponential_warmup_lrs(400, 1000), seed=9)
    real_cholesky = np.linalg.cholesky
    calls = {"n": 0}

    def flaky_cholesky(matrix):  # the first two factorisations report "not positive definite"
        calls["n"] += 1
        if calls["n"] <= 2:
            raise np.linalg.LinAlgError("Matrix is not positive definite")
        return real_cholesky(matrix)

    monkeypatch.setattr(np.linalg, "cholesky", flaky_cholesky)
    result, _ = test(losses, np.isfinite(losses), GPHyperparameters.initial(test.settings),
                     torch.Generator().manual_seed(0))
    assert len(result.probabilities) == 5

    # A broken install is no numerical failure: it would fail every test and ramp the LR to the cap unseen.
    # (Found by tests/test_core_install.py: numba's linear algebra without scipy.)
    broken = make()
    monkeypatch.setattr(broken, "_gp_test", lambda *a: (_ for _ in ()).throw(ImportError("scipy is required")))
    with pytest.raises(ImportError, match="scipy"):
        run_scheduler(broken, CURVES["default"], stop_at=3 * STEPS_PER_EPOCH)

    monkeypatch.setattr(np.linalg, "cholesky", lambda m: (_ for _ in ()).throw(np.linalg.LinAlgError("x")))
    sched = make()
    run_scheduler(sched, CURVES["default"], stop_at=3 * STEPS_PER_EPOCH)  # fails every fit, never raises
    assert sched.phase == "warmup" and not any(r["passed"] for r in sched.history)


def test_the_schedule_is_a_pure_function_without_an_optimizer():
    """autowu.schedule.Schedule alone: the ramp, its inverse, holds and rewinds, the cooldown to 0."""
    from types import SimpleNamespace

    from autowu.schedule import Schedule
    shape = Schedule.build(total_steps=1000, min_lr=1e-5, max_lr=1.0, max_warmup_fraction=0.2, warmup_type="exp",
                           immediate_cooldown=True, cooldown_type="cosine", cooldown_fraction=0.2)
    assert (shape.max_warmup_steps, shape.cooldown_start_step, shape.warmup_end_cap) == (200, 800, 200)
    assert shape.warmup_lr(100) == pytest.approx(1e-5 * 1e5 ** 0.5)
    assert shape.position_of(shape.warmup_lr(37.5)) == pytest.approx(37.5)
    ramping = SimpleNamespace(holds=[], rewinds=[], switch_step=None, peak_lr=None)
    assert [shape.lr(s, ramping) for s in (0, 50)] == [1e-5, shape.warmup_lr(50)]
    # Held from step 60 to 80, then 10 ramp steps taken back: step 100 trains at ramp position 100 - 20 - 10.
    decided = SimpleNamespace(holds=[[60, 80]], rewinds=[[80, 10.0]], switch_step=120, peak_lr=0.01)
    assert shape.lr(70, decided) == shape.warmup_lr(60)
    assert shape.lr(100, decided) == pytest.approx(shape.warmup_lr(70))
    assert shape.lr(120, decided) == 0.01 and shape.lr(1000, decided) == 0.0
    assert shape.lr(560, decided) == pytest.approx(0.005)  # halfway from the switch to the end: half the peak


def test_the_default_modes_decisions_do_not_depend_on_the_losss_units():
    """A recorded real curve (digits_cnn_adamp, seed 3, the default mode's run up to its switch) in other units:
    the default mode takes the same decisions at 0.01x, 0.25x (a loss divided by 4 micro-batches) and 100x; the
    paper's mode fits the losses as they are, and its decisions move with them."""
    fixture = json.loads((REPO / "tests" / "fixtures" / "digits_cnn_adamp_seed3_default_hold.json").read_text())

    def run(scale, **kwargs):
        sched = make(steps_per_epoch=fixture["steps_per_epoch"], total_epochs=fixture["total_epochs"],
                     immediate_cooldown=True, **kwargs)
        for loss in fixture["losses"]:
            sched.step(float(loss) * scale)
            if sched.phase != "warmup":
                break
        return sched

    reference = run(1.0)
    assert reference.switch_step == fixture["recorded"]["switch_step"]
    for scale in (0.01, 0.25, 100.0):
        scaled = run(scale)
        assert scaled.switch_step == reference.switch_step
        assert scaled.peak_lr == pytest.approx(reference.peak_lr, rel=1e-9)
        assert [r["passed"] for r in scaled.history] == [r["passed"] for r in reference.history]
        assert [r["probability"] for r in scaled.history] == pytest.approx(
            [r["probability"] for r in reference.history], abs=1e-6)
    paper = [run(scale, mode="paper").history for scale in (1.0, 100.0)]
    assert [r["probability"] for r in paper[0]] != pytest.approx([r["probability"] for r in paper[1]], abs=1e-3)


def test_a_checkpoint_from_before_scale_free_resumes_only_as_it_ran():
    """Checkpoints saved before ``scale_free`` existed fitted the losses as they were: the default mode (scale-free)
    refuses them, naming the option, and resumes them with ``scale_free=False``."""
    sched = make()
    for step in range(40):
        sched.step(2.3 - 0.01 * step)
    state = sched.state_dict()
    del state["settings"]["scale_free"]
    with pytest.raises(ValueError, match="scale_free=False \\(now True\\)"):
        make().load_state_dict(state)
    resumed = make(scale_free=False)
    resumed.load_state_dict(state)
    assert resumed.last_step == 40
