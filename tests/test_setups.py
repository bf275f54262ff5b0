"""Every DeepSpeed set-up a user can write (``tests/setup_matrix.py``), on real engines on 1-4 CPU ranks: AutoWU
receives, once per optimizer step, the mean over ranks and micro-batches of the loss as the model computed it, or
one line refuses the set-up before the first step. ``docs/setups.md`` shows the same matrix."""
import json

import pytest

from conftest import REPO, run_deepspeed
from setup_matrix import BY_NAME, CELLS, markdown_table

SCRIPT = REPO / "tests" / "ds_scripts" / "setups.py"
STEPS = 6


def run_cells(ranks, tmp_path):
    proc = run_deepspeed([SCRIPT, "--out", tmp_path], num_ranks=ranks, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return [json.loads((tmp_path / f"setups_{ranks}ranks_rank{r}.json").read_text()) for r in range(ranks)]


def expected_losses(own_losses, gas):
    """Per optimizer step, the mean over the ranks and the step's micro-batches of each rank's own losses."""
    steps = len(own_losses[0]) // gas
    return [sum(rank[k * gas + j] for rank in own_losses for j in range(gas)) / (gas * len(own_losses))
            for k in range(steps)]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_each_set_up_trains_on_the_right_loss_or_is_refused_in_one_line(ranks, tmp_path):
    results = run_cells(ranks, tmp_path)
    names = [cell.name for cell in CELLS if ranks in cell.ranks]
    assert all(sorted(r) == sorted(names) for r in results)
    for name in names:
        cell, outcome = BY_NAME[name], results[0][name]
        if not cell.trains:
            assert outcome.get("refused") == "ConfigError", (name, outcome)
            assert cell.refused in outcome["message"] and "\n" not in outcome["message"], (name, outcome)
            continue
        assert "refused" not in outcome, (name, outcome)
        assert outcome["engine_steps"] == STEPS, (name, outcome)
        if not cell.autowu:
            assert not outcome["hooked"] and outcome["scheduler"] != "AutoWU"
            continue
        # Once per optimizer step (overflow-skipped steps included), the ranks' mean of the model's own loss.
        assert outcome["autowu_steps"] == STEPS, name
        wanted = expected_losses(outcome["own_losses"], cell.gas)
        assert outcome["autowu_losses"] == pytest.approx(wanted, abs=1e-6), name
        assert all(r[name]["autowu_losses"] == outcome["autowu_losses"] for r in results), name
    if ranks == 2:
        first = results[0]
        # The caller scaling the loss (scale_wrt_gas=False) and DeepSpeed scaling it: the same losses reach AutoWU.
        assert first["accumulation4_caller_scales"]["autowu_losses"] == \
            pytest.approx(first["accumulation4"]["autowu_losses"], abs=1e-6)
        assert first["accumulation4_unmanaged"]["autowu_losses"] == \
            pytest.approx(first["accumulation4"]["autowu_losses"], abs=1e-6)
        # What actually runs: the bf16 optimizer with fp32 accumulation, AdamP mapped onto it; the engine's rollback.
        assert first["bf16_fp32_accumulation_zero1_adamp"]["wrapper"] == "BF16_Optimizer"
        assert first["bf16_fp32_accumulation_zero1_adamp"]["rollback"] == "EngineRollback"
        for name in ("fp16_no_zero_adamw", "zero3_adamw"):  # the default mode's rollback: off, said once
            assert first[name]["rollback"] == "NoneType"
            assert any("rollback at the switch is off" in w for w in first[name]["warnings"]), first[name]


def test_the_docs_show_the_matrix_the_tests_run():
    assert markdown_table() in (REPO / "docs" / "setups.md").read_text()
