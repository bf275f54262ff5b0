"""AutoWU on synthetic loss curves of known minimum, real gpytorch for the reference test."""
import io
import math

import numpy as np
import pytest
import torch

from autowu import AutoWU, GPTestSettings, PastMinimumTest
from autowu.gp import GPHyperparameters
from autowu.gp_gpytorch import GPyTorchPastMinimumTest
from autowu.synthetic import LossCurve, exponential_warmup_lrs, run_scheduler

STEPS_PER_EPOCH, EPOCHS = 50, 60


def make(groups_lrs=(0.1,), **kwargs):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in groups_lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, groups_lrs)], lr=0.1)
    kwargs.setdefault("steps_per_epoch", STEPS_PER_EPOCH)
    kwargs.setdefault("total_epochs", EPOCHS)
    return AutoWU(optimizer, **kwargs)


def test_warmup_is_the_papers_exponential_then_linear():
    sched = make()
    warmup_steps = sched.max_warmup_steps
    assert warmup_steps == STEPS_PER_EPOCH * EPOCHS // 2
    seen = []
    for _ in range(10):
        seen.append(sched.get_last_lr()[0])
        sched.step(1.0)
    expected = [1e-5 * (1.0 / 1e-5) ** (t / warmup_steps) for t in range(10)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert sched.optimizer.param_groups[0]["lr"] == sched.get_last_lr()[0]
    linear = make(warmup_type="linear")
    assert linear.warmup_lr(warmup_steps / 2) == pytest.approx(1e-5 + (1.0 - 1e-5) / 2)


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


@pytest.mark.parametrize("name", sorted(CURVES))
def test_switch_lands_near_the_known_optimum_and_never_before_it(name):
    curve = CURVES[name]
    sched = make(immediate_cooldown=True)
    run_scheduler(sched, curve, seed=1)
    best = curve.best_lr()
    assert sched.switch_step is not None and sched.switch_step <= sched.max_warmup_steps
    # Never before the optimum: the warmup had already passed the best LR when it switched.
    assert sched.warmup_lr(sched.switch_step - 1) > best
    assert best / 2 < sched.peak_lr < best * 2, (sched.peak_lr, best)
    switched = [r for r in sched.history if r["switched"]]
    assert len(switched) == 1 and not switched[0]["at_cap"]
    assert [r["passed"] for r in sched.history[-3:]] == [True, True, True]


def test_no_minimum_runs_to_the_cap_and_takes_the_gp_argmin():
    curve = LossCurve(blowup=0.0, learn_at=-1.5)  # still falling at max_lr
    sched = make(immediate_cooldown=True)
    run_scheduler(sched, curve, seed=2)
    assert sched.switch_step == sched.max_warmup_steps
    last = sched.history[-1]
    assert last["at_cap"] and last["switched"]
    assert sched.peak_lr == last["argmin_lr"]
    assert sched.peak_lr > 0.2  # the minimum predicted near the end of a still-falling curve


@pytest.mark.parametrize("spike_rate", [0.01, 0.03])
def test_loss_spikes_do_not_end_the_warmup(spike_rate):
    curve = CURVES["default"]
    clean = make(immediate_cooldown=True)
    run_scheduler(clean, curve, seed=3)
    spiky = make(immediate_cooldown=True)
    run_scheduler(spiky, curve, seed=3, spike_rate=spike_rate, nonfinite_rate=0.005)
    assert abs(spiky.switch_step - clean.switch_step) <= 3 * STEPS_PER_EPOCH
    assert spiky.peak_lr == pytest.approx(clean.peak_lr, rel=0.5)
    assert sum(r["spikes_ignored"] for r in spiky.history[-1:]) > 0


@pytest.mark.parametrize("spike_rate", [0.01, 0.03])
def test_without_the_spike_filter_the_papers_test_ends_the_warmup_at_once(spike_rate):
    """The failure the filter exists for: 100 steps an epoch, spikes of 5x; most seeds ruined by epoch 6."""
    kwargs = dict(steps_per_epoch=100, total_epochs=100, immediate_cooldown=True)
    ruined = 0
    for seed in range(5):
        unfiltered = make(spike_threshold=None, **kwargs)
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
    start = delayed.cooldown_start_step
    assert start == int(0.8 * delayed.total_steps)
    assert set(lrs[delayed.switch_step:start + 1]) == {delayed.peak_lr}
    assert lrs[start + 1] < delayed.peak_lr and delayed.get_last_lr() == [0.0]

    half = make(immediate_cooldown=True, cooldown_type="half_cosine")
    lrs = run_scheduler(half, CURVES["default"], seed=5)
    assert lrs[half.switch_step] == pytest.approx(half.peak_lr * 0.5)  # the paper's half_cosine
    assert half.get_last_lr() == [0.0]


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("cut_epochs", [11.5, 40])  # mid-warmup (mid-epoch), and after the switch
@pytest.mark.parametrize("spike_rate", [0.0, 0.02])
def test_resume_gives_the_identical_lr_sequence(cut_epochs, spike_rate):
    curve = CURVES["default"]
    whole = make(immediate_cooldown=True)
    whole_lrs = run_scheduler(whole, curve, seed=6, spike_rate=spike_rate)
    cut = int(cut_epochs * STEPS_PER_EPOCH)
    first = make(immediate_cooldown=True)
    lrs = run_scheduler(first, curve, seed=6, spike_rate=spike_rate, stop_at=cut)
    state = _roundtrip(first.state_dict())
    resumed = make(immediate_cooldown=True)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == first.get_last_lr()
    lrs += run_scheduler(resumed, curve, seed=6, spike_rate=spike_rate)
    assert lrs == whole_lrs
    assert resumed.switch_step == whole.switch_step and resumed.peak_lr == whole.peak_lr
    assert [r["probabilities"] for r in resumed.history] == [r["probabilities"] for r in whole.history]


def test_resume_refuses_other_settings():
    sched = make()
    run_scheduler(sched, CURVES["default"], stop_at=120)
    other = make(total_epochs=EPOCHS + 1)
    with pytest.raises(ValueError, match="total_epochs"):
        other.load_state_dict(sched.state_dict())


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="cooldown_type"):
        make(cooldown_type="linear")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make(steps_per_epoch=0)
    with pytest.raises(ValueError, match="min_lr"):
        make(min_lr=2.0)
    sched = make()
    with pytest.raises(TypeError, match="int"):
        sched.step(2048)  # DeepSpeed's fallback passes the batch size: never a loss
    with pytest.raises(ValueError, match="loss"):
        sched.step()
    assert sched.last_step == 0


def test_history_records_every_test():
    sched = make(immediate_cooldown=True)
    run_scheduler(sched, CURVES["default"], seed=7)
    assert [r["step"] for r in sched.history] == [STEPS_PER_EPOCH * (i + 1) for i in range(len(sched.history))]
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

    monkeypatch.setattr(np.linalg, "cholesky", lambda m: (_ for _ in ()).throw(np.linalg.LinAlgError("x")))
    sched = make()
    run_scheduler(sched, CURVES["default"], stop_at=3 * STEPS_PER_EPOCH)  # fails every fit, never raises
    assert sched.phase == "warmup" and not any(r["passed"] for r in sched.history)
