"""AutoWU in any DeepSpeed program: DeepSpeed's own initialize builds AutoWU and AdamP from the JSON after
``import autowu.deepspeed``; ``attach`` for engines built otherwise; step counts from the JSON or from what a
framework fills in; a real framework (Hugging Face Accelerate) building the engine itself on 2 CPU ranks."""
import json
import subprocess
import sys

import pytest

from autowu.ds_config import resolve
from conftest import REPO, run_deepspeed

SCRIPTS = REPO / "tests" / "ds_scripts"


def launch(script, args, tmp_path, ranks):
    proc = run_deepspeed([SCRIPTS / script, *args, "--out", tmp_path], num_ranks=ranks)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]


def test_step_counts_from_the_json_or_a_framework():
    def params(**given):
        resolved = resolve({"scheduler": {"type": "AutoWU", "params": given}})
        return {k: v for k, v in resolved.autowu_arguments().items() if k != "options"}

    assert params(steps_per_epoch=10, total_epochs=4) == {"steps_per_epoch": 10, "total_epochs": 4}
    # What Accelerate and HF's Trainer write for "auto": the run's optimizer steps.
    assert params(steps_per_epoch=10, total_num_steps=40) == {"steps_per_epoch": 10, "total_epochs": 4}
    assert params(steps_per_epoch=10, total_num_steps=40, total_epochs=4)["total_epochs"] == 4
    with pytest.raises(ValueError, match="total_num_steps 40 is 4 epochs of 10 steps, but total_epochs is 5"):
        params(steps_per_epoch=10, total_num_steps=40, total_epochs=5)
    with pytest.raises(ValueError, match="total_num_steps 45 is not a whole number of epochs of 10 steps"):
        params(steps_per_epoch=10, total_num_steps=45)
    with pytest.raises(ValueError, match="total_num_steps 40 needs steps_per_epoch"):
        params(total_num_steps=40)
    with pytest.raises(ValueError, match=r"params: \['total_num_steps'\] still say \"auto\""):
        params(steps_per_epoch=10, total_num_steps="auto")
    with pytest.raises(ValueError, match="total_num_steps: expected a positive whole number, got 40.0"):
        params(steps_per_epoch=10, total_num_steps=40.0)
    with pytest.raises(ValueError, match="needs total_epochs"):
        params(steps_per_epoch=10)
    # From autowu.deepspeed.initialize's arguments: the same rules against the JSON.
    block = {"scheduler": {"type": "AutoWU", "params": {"total_num_steps": 40}}}
    assert resolve(block, steps_per_epoch=10).total_epochs == 4
    with pytest.raises(ValueError, match="is 4 epochs of 10 steps, but total_epochs is 3"):
        resolve(block, steps_per_epoch=10, total_epochs=3)


MOVED_SEAMS = {
    "init": ("""
def __init__(self, args, model, optimizer=None, model_parameters=None, lr_scheduler=None, config=None):
    raise AssertionError("never built")
DeepSpeedEngine.__init__ = __init__
""", "DeepSpeedEngine.__init__ no longer takes ['config_class']"),
    "scheduler": ("""
def _configure_lr_scheduler(self):
    self.lr_scheduler = self.client_lr_scheduler(self.optimizer)
DeepSpeedEngine._configure_lr_scheduler = _configure_lr_scheduler
""", "DeepSpeedEngine._configure_lr_scheduler no longer has `self.client_lr_scheduler(self.basic_optimizer)`"),
}


@pytest.mark.parametrize("seam", sorted(MOVED_SEAMS))
def test_a_deepspeed_that_moved_the_seam_fails_at_import(seam, tmp_path):
    """A DeepSpeed release that changes what the registration relies on: ``import autowu.deepspeed`` raises,
    naming what moved (simulated by changing the installed DeepSpeed's engine before the import)."""
    change, words = MOVED_SEAMS[seam]
    script = tmp_path / "moved.py"
    script.write_text("from deepspeed.runtime.engine import DeepSpeedEngine\n" + change + "import autowu.deepspeed\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: autowu.deepspeed cannot register AutoWU and AdamP with DeepSpeed 0.19")
    assert words in last and "autowu/deepspeed/seam.py" in last


@pytest.mark.slow
def test_plain_deepspeed_initialize_builds_autowu_and_adamp_from_the_json(tmp_path):
    launch("registration.py", ["--mode", "plain"], tmp_path, ranks=2)
    ranks = [json.loads((tmp_path / f"plain_rank{r}.json").read_text()) for r in range(2)]
    reference = ranks[0]["autowu_initialize"]
    assert reference["optimizer"] == "ZeroAdamP" and reference["hooked"] and reference["engine_scheduler_is_autowu"]
    assert reference["returned_is_engines"]
    assert reference["switch_step"] is not None and not reference["history"][-1]["at_cap"]  # switched by its test
    for rank in ranks:
        # deepspeed.initialize with the counts in the JSON, or total_num_steps: the very same run, step for step
        # (ZeroAdamP on ZeRO-1's partitions: training would raise if they had not been declared).
        assert rank["plain_epochs"] == reference and rank["plain_total_steps"] == reference
        assert rank["plain_no_counts"].startswith("ConfigError: DeepSpeed config: scheduler AutoWU needs steps_per_epoch "
                                                  "and total_epochs")
        assert "unknown key 'zero_optimisation' (did you mean 'zero_optimization'?)" in rank["plain_misspelt_key"]
        assert rank["fp16_raises_at_min_scale"] is False


@pytest.mark.slow
def test_attach_installs_the_hook_on_an_engine_built_before_the_import(tmp_path):
    launch("registration.py", ["--mode", "attach"], tmp_path, ranks=1)
    result = json.loads((tmp_path / "attach_rank0.json").read_text())
    assert "build the engine after `import autowu.deepspeed`, or call autowu.deepspeed.attach(engine)" in \
        result["unhooked_step"]
    assert result["attach_again_same_hook"]
    attached, seam = result["attached"], result["seam"]
    assert attached["hooked"] and attached["switch_step"] is not None
    assert attached == seam  # attached by hand or by the seam: the same run
    assert result["attach_without_autowu"].startswith("ValueError: autowu.deepspeed.attach: the engine's LR "
                                                      "scheduler is NoneType, not AutoWU")
    assert result["attach_not_an_engine"].startswith("TypeError: autowu.deepspeed.attach needs a DeepSpeedEngine")
    assert result["own_backward"].startswith("RuntimeError: AutoWU received no loss for optimizer step 1: the "
                                             "engine was stepped with no engine.backward(loss)")


@pytest.mark.slow
def test_accelerate_builds_autowu_from_the_json_and_resumes_exactly(tmp_path):
    """Hugging Face Accelerate builds the DeepSpeed engine itself (AutoWU and AdamP named in the JSON, the step
    count its "auto"), on 2 CPU ranks: the ranks' losses reach AutoWU all-reduced, it switches by its test, and
    a checkpoint through Accelerate's own save_state/load_state resumes exactly."""
    pytest.importorskip("accelerate")
    launch("accelerate_loop.py", ["--phase", "full"], tmp_path, ranks=2)
    launch("accelerate_loop.py", ["--phase", "resume"], tmp_path, ranks=2)
    full = [json.loads((tmp_path / f"full_rank{r}.json").read_text()) for r in range(2)]
    resumed = [json.loads((tmp_path / f"resume_rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in full] == [0, 1] and full[0]["world"] == 2
    for run in full + resumed:
        assert (run["engine_type"], run["scheduler_type"], run["optimizer_type"]) == (
            "DeepSpeedEngine", "AutoWU", "ZeroAdamP")
        assert run["hooked"]
    # The ranks see different images; AutoWU recorded the mean of their losses, the same on both ranks.
    cut = len(full[0]["scheduler_losses_at_cut"])
    assert cut == 53
    mean = [(full[0]["own_losses"][str(s)] + full[1]["own_losses"][str(s)]) / 2 for s in range(cut)]
    assert full[0]["scheduler_losses_at_cut"] == full[1]["scheduler_losses_at_cut"]
    assert full[0]["scheduler_losses_at_cut"] == pytest.approx(mean, abs=1e-6)
    assert full[0]["own_losses"]["0"] != full[1]["own_losses"]["0"]
    # It switched by its own test, inside the run (the cap is half of Accelerate's 400 steps).
    assert 53 < full[0]["switch_step"] < 200 and full[0]["history"][-1]["passed"]
    assert full[0]["last_step"] == full[0]["engine_steps"] == 400
    for whole, again in zip(full, resumed):
        assert again["start"] == 53
        assert {k: v for k, v in whole["lrs"].items() if int(k) >= 53} == again["lrs"]
        for key in ("switch_step", "peak_lr", "history", "params", "last_step"):
            assert again[key] == whole[key], key


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [4, 1])
def test_hf_trainer_with_accumulation_hands_autowu_the_loss_it_logs(accumulation, tmp_path):
    """Hugging Face's Trainer divides each micro-batch's loss by the accumulation itself and calls
    ``engine.backward(loss, scale_wrt_gas=False)``: AutoWU receives the loss the Trainer logs for the step (once
    0.25x of it with 4 micro-batches), on both ranks."""
    pytest.importorskip("transformers")
    launch("hf_trainer.py", ["--accumulation", accumulation], tmp_path, ranks=2)
    ranks = [json.loads((tmp_path / f"trainer_gas{accumulation}_rank{r}.json").read_text()) for r in range(2)]
    for run in ranks:
        assert run["optimizer"] == "ZeroAdamP" and run["autowu_steps"] == run["engine_steps"] == 6
        assert len(run["autowu"]) >= 4
        assert run["autowu"] == pytest.approx(run["logged"][:len(run["autowu"])], abs=1e-6)
    assert ranks[0]["autowu"] == ranks[1]["autowu"]
