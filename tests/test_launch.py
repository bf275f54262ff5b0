"""The launcher's configs and its checks of bad input, without starting a run."""
import json
import subprocess
import sys

import pytest
import torch

from autowu.ds_config import resolve
from autowu.launcher.run_config import RunSettings, split_config
from autowu.launcher.training import build_model
from conftest import REPO

PAPER_CONFIGS = ["resnet50_4k", "resnet50_16k", "efficientnet_b0_4k", "efficientnet_b0_16k"]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_the_papers_settings(name):
    ds_config, run = split_config(str(REPO / "ds_configs" / f"{name}.json"))
    global_batch = 4096 if name.endswith("4k") else 16384
    assert ds_config["train_batch_size"] == global_batch and ds_config["train_micro_batch_size_per_gpu"] == 256
    assert ds_config["fp16"]["enabled"] and ds_config["zero_optimization"]["stage"] == 1
    # The paper's four settings run the paper's procedure: the default has never run at ImageNet scale.
    assert ds_config["scheduler"]["type"] == "AutoWU" and ds_config["scheduler"]["params"]["mode"] == "paper"
    adamp = ds_config["optimizer"]
    assert adamp["type"] == "AdamP" and "lr" not in adamp["params"]  # AutoWU sets the LR
    assert {k: adamp["params"][k] for k in ("weight_decay", "delta", "wd_ratio", "betas", "nesterov")} == {
        "weight_decay": 0.1, "delta": 0.1, "wd_ratio": 0.1, "betas": [0.9, 0.999], "nesterov": False}
    effnet = name.startswith("efficientnet")
    assert run.model == ("efficientnet_b0" if effnet else "resnet50")
    assert (run.label_smoothing > 0) == effnet and run.sync_bn == effnet
    # 16 GPUs x 256 = 4K: no accumulation at 4K, 4 steps of it at 16K; 8 GPUs accumulate twice as much.
    assert resolve(ds_config, world_size=16).accumulation == global_batch // 4096
    assert resolve(ds_config, world_size=8).accumulation == 2 * global_batch // 4096


def test_batch_sizes_that_cannot_be_reached_are_one_clear_error():
    ds_config, _ = split_config(str(REPO / "ds_configs" / "resnet50_4k.json"))
    with pytest.raises(ValueError, match="train_batch_size 4096 is not a multiple of .* 256 x 3 ranks"):
        resolve(ds_config, world_size=3)
    with pytest.raises(ValueError, match="gradient_accumulation_steps 3 disagrees"):
        resolve({**ds_config, "gradient_accumulation_steps": 3}, world_size=16)


def test_unknown_keys_and_models_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "train": {"modle": "resnet50"}}))
    with pytest.raises(ValueError, match="train: unknown key 'modle' \\(did you mean 'model'\\?\\)"):
        split_config(str(bad))
    with pytest.raises(ValueError, match="\"train.optimizer\" has moved to the config's top-level"):
        RunSettings.from_dict({"optimizer": {"lr": 0.1}}, "x.json")
    no_optimizer = tmp_path / "no_optimizer.json"
    no_optimizer.write_text(json.dumps({"train_batch_size": 64, "train": {"model": "resnet50"}}))
    with pytest.raises(ValueError, match="needs an \"optimizer\" block"):
        split_config(str(no_optimizer))
    with pytest.raises(ValueError, match="unknown model 'resnet5O'"):
        build_model(RunSettings(model="resnet5O"), 10, torch.device("cpu"), False)
    model = build_model(RunSettings(model="test_efficientnet"), 7, torch.device("cpu"), False)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.slow
def test_an_fp16_config_without_cuda_is_one_clear_error(tmp_path):
    """A CUDA build of torch on a too-old driver sees no GPU: the job must stop, not train on the CPU."""
    from conftest import run_deepspeed
    proc = run_deepspeed([REPO / "launch" / "train.py", "--deepspeed_config", REPO / "ds_configs" /
                          "resnet50_4k.json", "--out_dir", tmp_path / "run"], num_ranks=1)
    assert proc.returncode == 2
    assert "[train] error: " in proc.stderr and "asks for fp16 but CUDA is not available" in proc.stderr
    assert "--allow_cpu" in proc.stdout + proc.stderr


def test_the_gpu_extra_matches_the_pinned_torchs_cuda_major():
    """FFCV's GPU normalisation compiles with cupy's NVRTC, which must be the CUDA major torch was built for."""
    import re
    setup = (REPO / "setup.py").read_text()
    cupy = re.search(r'"gpu": \["cupy-cuda(\d+)x', setup).group(1)
    pinned = re.search(r"^cuda-toolkit==(\d+)\.", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert cupy == pinned == torch.version.cuda.split(".")[0]


def test_each_setting_has_one_owner(tmp_path):
    """The four settings that used to fall through: each is now set in one place and refused elsewhere."""
    import argparse

    from autowu.gp import GPTestSettings

    def autowu_params(config, **given):
        resolved = resolve(config, **given)
        return {"steps_per_epoch": resolved.steps_per_epoch, "total_epochs": resolved.total_epochs,
                **resolved.autowu.as_dict(), "gp_settings": resolved.autowu.gp_settings}

    from autowu.settings import add_cli_overrides, cli_overrides
    block = {"scheduler": {"type": "AutoWU", "params": {"steps_per_epoch": 30, "total_epochs": 5}}}
    # A step count in the scheduler block that disagrees with the data is refused, not silently overridden.
    with pytest.raises(ValueError, match="params.steps_per_epoch 30 disagrees with 22 from the data"):
        autowu_params(block, steps_per_epoch=22, total_epochs=5)
    assert autowu_params(block, steps_per_epoch=30, total_epochs=5)["steps_per_epoch"] == 30
    # The run's seed reaches AutoWU; a different one in the scheduler block is refused.
    params = autowu_params({"scheduler": {"type": "AutoWU", "params": {}}}, steps_per_epoch=2, total_epochs=3, seed=7)
    assert params["seed"] == 7
    with pytest.raises(ValueError, match="params.seed 1 disagrees with 7 from the run"):
        autowu_params({"scheduler": {"type": "AutoWU", "params": {"seed": 1}}}, steps_per_epoch=2,
                      total_epochs=3, seed=7)
    # gp_settings from JSON: an object of GPTestSettings' fields works; a misspelt field is refused.
    params = autowu_params({"scheduler": {"type": "AutoWU", "params": {"gp_settings": {"num_fits": 3}}}},
                           steps_per_epoch=2, total_epochs=3)
    assert params["gp_settings"] == GPTestSettings(num_fits=3)
    with pytest.raises(ValueError, match="gp_settings: unknown key 'confidense' \\(did you mean 'confidence'\\?\\)"):
        autowu_params({"scheduler": {"type": "AutoWU", "params": {"gp_settings": {"confidense": 0.9}}}},
                      steps_per_epoch=2, total_epochs=3)
    # The per-rank batch is DeepSpeed's train_micro_batch_size_per_gpu only.
    from autowu.data import DataConfig
    with pytest.raises(ValueError, match="batch_size is not a data setting.*train_micro_batch_size_per_gpu"):
        DataConfig.from_dict({"train": {"batch_size": 32}}, "d.json")
    # Command-line options come from the "train" settings' own declarations, and win over the JSON.
    parser = argparse.ArgumentParser()
    add_cli_overrides(parser, RunSettings)
    args = parser.parse_args(["--seed", "3", "--epochs", "2"])
    assert cli_overrides(args, RunSettings) == {"seed": 3, "epochs": 2}
    assert "AutoWU's subsampling" in parser.format_help()


def test_misspelt_and_mistyped_settings_are_refused_with_the_nearest_name(tmp_path):
    config = json.loads((REPO / "ds_configs" / "cpu_digits.json").read_text())
    config["zero_optimisation"] = config.pop("zero_optimization")  # DeepSpeed alone would train without ZeRO
    misspelt = tmp_path / "misspelt.json"
    misspelt.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown key 'zero_optimisation' \\(did you mean 'zero_optimization'\\?\\) "
                                         "\\(DeepSpeed .* would ignore it without a word\\)"):
        resolve(split_config(str(misspelt))[0])
    with pytest.raises(ValueError, match="train.epochs: expected an integer, got '30'"):
        RunSettings.from_dict({"epochs": "30"}, "x.json")
    with pytest.raises(ValueError, match="train.scale: expected a list of 2 numbers"):
        from autowu.data import DataConfig
        DataConfig.from_dict({"train": {"scale": [0.1]}}, "d.json")
    # Every shipped config passes the same checks.
    for path in (REPO / "ds_configs").glob("*.json"):
        ds_config, run = split_config(str(path))
        resolve(ds_config, total_epochs=run.epochs, seed=run.seed, world_size=2 if "cpu" in path.name else 16)


@pytest.mark.parametrize("name", ["cpu_digits.json", "resnet50_4k.json", "efficientnet_b0_16k.json"])
def test_the_rerun_config_is_the_same_recipe_at_autowus_peak_with_a_fixed_warmup(tmp_path, name):
    """What the launcher writes after AutoWU switched (warmup_cosine.json): every key of the run's config as it
    was except the scheduler (DeepSpeed's WarmupCosineLR, linear warmup over the "auto" 5%, cosine to 0) and the
    optimizer's LR (the peak); the launcher's own config checks accept it and fill in its step counts."""
    from autowu.launcher.run_config import warmup_cosine_rerun
    original = json.loads((REPO / "ds_configs" / name).read_text())
    rerun = warmup_cosine_rerun(original, 0.0123)
    assert original == json.loads((REPO / "ds_configs" / name).read_text())  # not changed in place
    assert {k: v for k, v in rerun.items() if k not in ("scheduler", "optimizer")} == \
        {k: v for k, v in original.items() if k not in ("scheduler", "optimizer")}
    assert rerun["optimizer"]["type"] == original["optimizer"]["type"]
    assert rerun["optimizer"]["params"] == {**original["optimizer"].get("params", {}), "lr": 0.0123}
    assert rerun["scheduler"]["type"] == "WarmupCosineLR"
    path = tmp_path / "warmup_cosine.json"
    path.write_text(json.dumps(rerun))
    ds_config, run = split_config(str(path))
    assert run == RunSettings.from_dict(original["train"], source=name)
    ds_config = resolve(ds_config, total_epochs=10).with_steps_per_epoch(100).deepspeed
    assert ds_config["scheduler"]["params"] == {"total_num_steps": 1000, "warmup_num_steps": 50,
                                                "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0, "warmup_type": "linear"}
    with pytest.raises(ValueError, match="peak LR > 0"):
        warmup_cosine_rerun(original, float("nan"))


@pytest.mark.parametrize("raised,code,shows", [("UserError", 2, "[train] error: the user's mistake"),
                                               ("ValueError", 1, "Traceback")])
def test_the_launcher_shows_a_users_error_in_one_line_and_its_own_bugs_with_their_traceback(raised, code, shows):
    """Only the package's own error class for what the user can fix is one line; any other error, a ValueError
    from a bug inside the package included, keeps its traceback."""
    script = (f"import autowu.launcher.train as train\nfrom autowu.errors import UserError\n"
              f"def main(argv=None):\n    raise {raised}(\"the user's mistake\")\n"
              "train.main = main\ntrain.cli([])\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert shows in proc.stderr
    assert ("Traceback" in proc.stderr) == (raised != "UserError")
