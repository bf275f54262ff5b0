"""AutoWU inside real DeepSpeed engines: 2 CPU ranks through the deepspeed launcher (gloo), ZeRO-1, AdamP."""
import json

import pytest
import torch

from autowu.deepspeed import initialize
from autowu.ds_config import load_config, resolve
from conftest import REPO, run_deepspeed

SCRIPT = REPO / "tests" / "ds_scripts" / "autowu_engine.py"
STEPS_PER_EPOCH, TOTAL_STEPS = 10, 400


def launch(mode, tmp_path):
    proc = run_deepspeed([SCRIPT, "--mode", mode, "--out", tmp_path])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def as_int_keys(lrs):
    return {int(k): v for k, v in lrs.items()}


@pytest.mark.slow
def test_gradient_accumulation_resume_and_ranks_switch_together(tmp_path):
    ranks = launch("resume", tmp_path)
    full = [r["full"] for r in ranks]
    # Every rank took the same decisions at the same steps, with the same LRs at every step.
    assert full[0] == full[1]
    assert ranks[0]["full_lrs"] == ranks[1]["full_lrs"]
    assert full[0]["switch_step"] is not None and full[0]["switch_step"] % STEPS_PER_EPOCH == 0
    assert [h["step"] for h in full[0]["history"]] == list(range(10, full[0]["switch_step"] + 1, 10))
    assert full[0]["last_step"] == TOTAL_STEPS and full[0]["final_lr"] == 0.0
    # Resumed from a mid-warmup, mid-epoch checkpoint: the same LRs, switch step and peak LR.
    for r in ranks:
        assert r["resumed_from"] == {"global_steps": 53, "scheduler_step": 53}
        full_lrs, resumed_lrs = as_int_keys(r["full_lrs"]), as_int_keys(r["resumed_lrs"])
        assert resumed_lrs == {k: v for k, v in full_lrs.items() if k >= 53}
        assert r["resumed"] == r["full"]


@pytest.mark.slow
def test_fp16_overflows_keep_the_schedule_aligned_with_the_data(tmp_path):
    ranks = launch("fp16", tmp_path)
    for r in ranks:
        run = r["fp16"]
        assert r["dtype"] == "torch.float16"
        assert r["skipped_steps"] >= 4  # the four forced overflows, plus the loss scaler's own
        assert run["last_step"] == r["global_steps"] == TOTAL_STEPS  # stepped on skipped steps too
        # A test at every epoch's end, also where an epoch's last step overflowed (steps 20 and 90).
        assert [h["step"] for h in run["history"]] == list(range(10, run["switch_step"] + 1, 10))
        assert run["history"][-1]["nonfinite"] >= 4  # the forced inf losses were ignored, not fitted
        assert run["final_lr"] == 0.0  # the cosine reached 0 at the last step
    assert ranks[0]["fp16"] == ranks[1]["fp16"] and ranks[0]["lrs"] == ranks[1]["lrs"]


@pytest.mark.slow
def test_a_diverging_fp16_warmup_is_skipped_and_seen_not_fatal(tmp_path):
    ranks = launch("diverge", tmp_path)
    for r in ranks:
        # Stock DeepSpeed: 30 steps that overflow at any scale drive the dynamic scaler from 2^16 to its
        # minimum and it raises, 17 steps into the stretch (steps 50-79).
        assert "Current loss scale already at minimum" in r["stock_error"]
        assert 50 < r["stock_died_at_step"] < 80
        # Under AutoWU the same stretch is skipped at the minimum scale and the run goes on to the end.
        run = r["diverge"]
        assert r["skipped_steps"] >= 30 and r["global_steps"] == run["last_step"] == TOTAL_STEPS
        assert r["final_loss_scale"] > 1  # the scale grew back after the stretch
        # The tests saw the rise: the first test after the stretch began passed, and AutoWU switched by test
        # at an LR before the stretch.
        tests = {h["step"]: h for h in run["history"]}
        assert tests[60]["passed"] and tests[60]["nonfinite"] == 0
        assert run["switch_step"] <= 80 and run["final_lr"] == 0.0
        assert run["peak_lr"] < as_int_keys(r["lrs"])[50]
    assert ranks[0]["diverge"] == ranks[1]["diverge"]


@pytest.mark.slow
def test_a_builtin_deepspeed_scheduler_still_works(tmp_path):
    ranks = launch("builtin", tmp_path)
    assert ranks[0]["scheduler_type"] == "WarmupLR"
    lrs = list(ranks[0]["lrs"].values())
    assert lrs[-1] == pytest.approx(0.01) and lrs[0] == 0.0


def test_config_errors_are_clear(tmp_path):
    config = {"scheduler": {"type": "AutoWU", "params": {"steps_per_epoch": 10, "total_epoch": 5}}}
    with pytest.raises(ValueError, match="unknown key 'total_epoch' \\(did you mean 'total_epochs'\\?\\)"):
        resolve(config)
    with pytest.raises(ValueError, match="total_epochs"):
        resolve({"scheduler": {"type": "AutoWU", "params": {"steps_per_epoch": 10}}}).autowu_arguments()
    assert resolve({"scheduler": {"type": "WarmupLR", "params": {}}}).autowu is None
    resolved = resolve({"scheduler": {"type": "AutoWU", "params": {"immediate_cooldown": True}}},
                       steps_per_epoch=7, total_epochs=3)
    assert resolved.autowu.immediate_cooldown and (resolved.steps_per_epoch, resolved.total_epochs) == (7, 3)
    with pytest.raises(FileNotFoundError, match="no_such.json"):
        load_config(tmp_path / "no_such.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"train_batch_size\": 8,}")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(bad)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="choose one"):
        initialize(model=model, config={"scheduler": {"type": "AutoWU", "params": {}}}, steps_per_epoch=1,
                   total_epochs=1, lr_scheduler=object())


@pytest.mark.slow
def test_a_channels_last_model_initializes_and_trains_as_in_nchw(tmp_path):
    """DeepSpeed 0.19.8's initialize raised on channels_last weights (its broadcast views them as bytes): the
    launcher's channels_last ResNet-50 would have died before its first step on a GPU."""
    out = tmp_path / "channels_last.json"
    proc = run_deepspeed([REPO / "tests" / "ds_scripts" / "channels_last.py", "--out", out])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    # No ZeRO: the layout comes back after initialize; ZeRO-1 binds the weights to its flat buffer (NCHW).
    assert results["no_zero_adam"]["channels_last_after_initialize"] == [True, True, True]
    assert results["zero1_adamp"]["channels_last_after_initialize"][:2] == [False, False]
    for name in results:
        assert results[name]["max_difference_to_nchw_run"] < 1e-5, (name, results[name])
