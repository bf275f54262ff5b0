"""AutoWU(rollback=True): at the switch, the training state goes back to the last GP test at or below the peak.

Real training on scikit-learn's digits (an MLP with BatchNorm, Adam), real GP tests; each test's state is copied
by the loop itself and compared with what the scheduler put back. The same under DeepSpeed on 2 CPU ranks
(``ds_scripts/rollback_engine.py``).
"""
import copy
import io
import json

import pytest
import torch
from sklearn.datasets import load_digits

from autowu import AutoWU
from autowu.ds_config import resolve
from autowu.rollback import SwitchRollback

from conftest import REPO

BATCH, EPOCHS = 64, 30


def digits():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target)


def build(seed=0, **autowu):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, _ = digits()
    scheduler = AutoWU(optimizer, len(x) // BATCH, EPOCHS, immediate_cooldown=True, cooldown_type="cosine",
                       **({"model": model} if autowu.get("rollback") else {}), **autowu)
    return model, optimizer, scheduler


def state_of(model, optimizer):
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()["state"])}


def train(model, optimizer, scheduler, start=0, stop=None, on_test=None):
    """Train from optimizer step ``start`` to ``stop`` (the run's end by default) with a fixed batch order;
    ``on_test(step, record)`` after every step that ran a GP test."""
    x, y = digits()
    order = torch.Generator().manual_seed(1)
    steps_per_epoch = len(x) // BATCH
    batches = [torch.randperm(len(x), generator=order)[i * BATCH:(i + 1) * BATCH]
               for _ in range(EPOCHS) for i in range(steps_per_epoch)]
    for step in range(start, len(batches) if stop is None else stop):
        idx = batches[step]
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        tests = len(scheduler.history)
        scheduler.step(loss)
        if on_test is not None and len(scheduler.history) > tests:
            on_test(step + 1, scheduler.history[-1])


def test_the_switch_puts_back_the_state_of_the_last_test_at_or_below_the_peak():
    model, optimizer, scheduler = build(rollback=True)
    taken, at_switch = {}, {}

    def on_test(step, record):
        if record["switched"]:
            at_switch.update(state_of(model, optimizer), step=step, record=record,
                             lr=optimizer.param_groups[0]["lr"])
        else:
            taken[step] = (record["lr"], state_of(model, optimizer))

    train(model, optimizer, scheduler, stop=scheduler.schedule.max_warmup_steps + 1, on_test=on_test)
    assert scheduler.switch_step is not None
    record = at_switch["record"]
    below = [step for step, (lr, _) in taken.items() if lr <= scheduler.peak_lr]
    assert record["rolled_back_to"] == max(below) < scheduler.switch_step
    assert max(lr for lr, _ in taken.values()) > 1.5 * scheduler.peak_lr  # the ramp did run past the peak
    back = taken[record["rolled_back_to"]][1]
    for name, value in back["model"].items():   # the weights and BatchNorm's statistics
        assert torch.equal(at_switch["model"][name], value), name
    for index, moments in back["optimizer"].items():
        for key, value in moments.items():
            assert torch.equal(at_switch["optimizer"][index][key], value), (index, key)
    assert at_switch["lr"] == scheduler.peak_lr   # the next step trains at the peak, from the state put back

    # The decisions are those of the same run without rollback: it changes the state, not the search.
    plain_model, plain_optimizer, plain = build(rollback=False)
    train(plain_model, plain_optimizer, plain, stop=scheduler.switch_step)
    assert (plain.switch_step, plain.peak_lr) == (scheduler.switch_step, scheduler.peak_lr)
    assert not torch.equal(plain_model[0].weight, model[0].weight)


def test_a_run_resumed_mid_warmup_rolls_back_and_ends_exactly_as_one_not_stopped():
    whole_model, whole_optimizer, whole = build(rollback=True)
    train(whole_model, whole_optimizer, whole)

    model, optimizer, scheduler = build(rollback=True)
    stop = whole.switch_step - 5     # snapshots held, the switch still to come
    train(model, optimizer, scheduler, stop=stop)
    assert scheduler.switch_rollback.snapshots
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model, optimizer, scheduler = build(seed=5, rollback=True)   # other initial weights, all overwritten
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    train(model, optimizer, scheduler, start=stop)
    assert scheduler.history[-1]["rolled_back_to"] == whole.history[-1]["rolled_back_to"] is not None
    for a, b in zip(whole_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_snapshots_only_grow_in_lr_and_are_bounded():
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=0.1, momentum=0.9)
    rollback = SwitchRollback(optimizer, [], keep=3)
    for step, lr in enumerate([1, 2, 3, 1.5, 4, 5, 6, 7, 8]):
        with torch.no_grad():
            parameter.fill_(step)
        rollback.take(step, lr)
        lrs = [s["lr"] for s in rollback.snapshots]
        assert lrs == sorted(set(lrs)) and len(lrs) <= 3
    assert [s["lr"] for s in rollback.snapshots] == [6, 7, 8]
    assert rollback.restore(6.5) == 6 and parameter.tolist() == [6.0, 6.0]
    assert rollback.snapshots == []
    rollback.take(9, 8)
    assert rollback.restore(0.5) is None and parameter.tolist() == [6.0, 6.0]   # none at or below: unchanged


def test_rollback_is_refused_where_it_cannot_do_what_it_says():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    # On in the default mode (with or without model=: its buffers go back only if given), off in the paper's.
    assert AutoWU(optimizer, 10, 5).options.rollback and not AutoWU(optimizer, 10, 5, mode="paper").options.rollback
    for kwargs in ({"rollback": False}, {"mode": "paper"}):
        with pytest.raises(ValueError, match="only by rollback"):
            AutoWU(optimizer, 10, 5, model=torch.nn.Linear(1, 1), **kwargs)
    with pytest.raises(ValueError, match="rollback_keep"):
        AutoWU(optimizer, 10, 5, model=torch.nn.Linear(1, 1), rollback_keep=0)
    counts = {"steps_per_epoch": 10, "total_epochs": 5}
    config = {"scheduler": {"type": "AutoWU", "params": {**counts, "rollback": True}}}
    assert resolve(config).autowu.rollback is True   # under DeepSpeed: the engine's module (EngineRollback)
    # The mode's default, or asked for: what the AutoWU built from the config keeps (attach then puts the engine's
    # rollback in its place, or, on an engine that cannot roll back, turns it off with a warning: the fp16 engine
    # without ZeRO of ds_scripts/rollback_engine.py).
    for zero, params, keep in ((1, {}, 6), (1, {"rollback_keep": 2}, 2), (1, {"mode": "paper"}, None),
                               (1, {"rollback": False}, None),
                               (2, {"rollback": True, "rollback_keep": 3}, 3), (0, {}, 6)):
        config = {"zero_optimization": {"stage": zero}, "scheduler": {"type": "AutoWU", "params": params}}
        rollback = AutoWU(optimizer, **resolve(config, **counts).autowu_arguments()).switch_rollback
        assert (rollback.keep if rollback is not None else None) == keep
    for params, match in (({"model": "resnet50"}, "unknown key 'model'"),
                          ({"rollback": False, "rollback_keep": 3}, "only where the switch rolls back"),
                          ({"mode": "paper", "rollback_keep": 3}, "only where the switch rolls back"),
                          ({"rollback": True, "rollback_keep": 0}, "positive integer")):
        config["scheduler"]["params"] = {**counts, **params}
        with pytest.raises(ValueError, match=match):
            resolve(config)
    # Where the master weights are not what the client optimizer steps: refused before any engine is built.
    for extra, where in (({"zero_optimization": {"stage": 3}}, "ZeRO stage 3"),
                         ({"fp16": {"enabled": True}}, "fp16 without ZeRO"),
                         ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}, "bf16 without ZeRO")):
        config = {"train_batch_size": 8, "scheduler": {"type": "AutoWU", "params": {**counts, "rollback": True}},
                  **extra}
        with pytest.raises(ValueError, match=f"rollback with {where} is not supported"):
            resolve(config)


@pytest.mark.slow
def test_rollback_on_a_zero1_engine_of_two_ranks_puts_back_each_ranks_state_and_resumes_exactly(tmp_path,
                                                                                               deepspeed_runner):
    """"rollback": true in the config of a ZeRO-1 engine (AdamP, BatchNorm) on 2 real CPU ranks: at the switch
    every rank has the state of the last test at or below the peak back (its fp32 partition, the moments, the
    module's gathered weights and BatchNorm statistics), in fp32 and fp16; a run saved mid-warmup and loaded
    into a new engine ends with the unbroken run's weights, bit for bit."""
    proc = deepspeed_runner([REPO / "tests" / "ds_scripts" / "rollback_engine.py", "--out", tmp_path])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        for run in (r["whole"], r["fp16"]):
            lrs = {int(step): lr for step, lr in run["test_lrs"].items()}
            assert run["rolled_back_to"] == max(s for s, lr in lrs.items() if lr <= run["peak_lr"])
            assert run["rolled_back_to"] < run["switch_step"] and max(lrs.values()) > 1.5 * run["peak_lr"]
            assert run["put_back_equals_copy"] and run["module_differs_from_the_last_test"]
            assert run["lr_after_switch"] == run["peak_lr"]
        assert r["fp16"]["dtype"] == "torch.float16"
        # fp16 without ZeRO cannot roll back: the default mode's rollback is off there, with a warning
        assert r["fp16_no_zero"]["rollback"] is None
        assert "rollback at the switch is off for this engine (fp16 without ZeRO)" in r["fp16_no_zero"]["warning"]
        # The checkpoint: each rank's snapshots in its own file, the scheduler's state naming them only.
        assert len(r["snapshots_at_cut"]) == 6 and r["snapshots_loaded"] == r["snapshots_at_cut"]
        assert {"autowu_rollback_rank0.pt", "autowu_rollback_rank1.pt"} <= set(r["files"])
        assert r["scheduler_state_rollback"] == {"keep": 6, "per_rank": True, "steps": r["snapshots_at_cut"],
                                                 "world_size": 2}
        assert r["other_world_size"]["snapshots"] == 0
        assert "cannot be re-partitioned" in r["other_world_size"]["warning"]
        assert f"no autowu_rollback_rank{r['rank']}.pt" in r["missing_file_error"]
        assert r["resumed"] == {k: r["whole"][k] for k in ("switch_step", "peak_lr", "rolled_back_to")}
        whole = torch.load(tmp_path / f"whole_rank{r['rank']}.pt")
        resumed = torch.load(tmp_path / f"resumed_rank{r['rank']}.pt")
        for name, value in whole.items():
            assert torch.equal(resumed[name], value), name
    assert ranks[0]["whole"] == ranks[1]["whole"]   # the ranks switched and rolled back together
