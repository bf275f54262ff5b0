"""The scheduler benchmark's batch axis: the MNIST tasks on their real data, the grid's windows and extension, the
goals computed from the stored runs, and the picture drawn from them."""
import importlib.util
import json
import math
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _script(name):
    """A benchmark script as a module, under its own name (so that the scripts' imports of each other resolve),
    without putting benchmarks/ on the path."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


bench = _script("bench_schedules")

STORED = os.path.join(BENCHMARKS, "results", "schedules_batches.json")


def test_mnist5k_is_mlxtends_real_digits_split_fixed():
    x_train, y_train, x_test, y_test = bench.load("mnist5k")
    assert x_train.shape == (3500, 1, 14, 14) and x_test.shape == (1500, 1, 14, 14)
    assert sorted(set(y_test.bincount().tolist())) == [150]  # stratified: 150 test images a class
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    again = bench.load("mnist5k")
    assert all(bool((a == b).all()) for a, b in zip((x_train, y_train, x_test, y_test), again))


def test_batch_axis_runs_the_same_epochs_with_16x_fewer_steps():
    small = bench.run("mnist_mlp_adamw", 0, "grid", peak_lr=0.008, batch_scale=16)
    assert (small["batch_size"], small["steps_per_epoch"], small["epochs"]) == (256, 13, 20)
    assert small["top1"] > 90.0  # it learns: chance is 10%
    at_b = bench.TASKS["mnist_mlp_adamw"]
    assert 3500 // at_b.batch_size == 218


def test_the_quick_start_keeps_sgd_at_16x_its_batch_off_the_cap():
    """shifted_mlp_sgd at 576 (12 steps an epoch, a ramp of 48 steps): without the quick start the ramp reached
    the cap at LR 1.0 with the loss still falling, and diverged; with it, it switches below the LRs that diverge
    (the grid: 0.256 best, 1.024 diverges)."""
    quick = bench.run("shifted_mlp_sgd", 0, "default", batch_scale=16)
    plain = bench.run("shifted_mlp_sgd", 0, "default", batch_scale=16, autowu_kwargs={"flat_ramp_speedup": 1.0})
    assert plain["peak_lr"] == pytest.approx(1.0) and plain["top1"] < 50.0
    assert 0.1 < quick["peak_lr"] < 0.8 and quick["top1"] > 85.0
    assert [t["ramp_pace"] for t in quick["tests"] if t.get("ramp_pace")][0] == 2.0


def test_grid_windows_are_a_factor_2_apart_and_move_up_with_the_batch():
    task = bench.TASKS["mnist_cnn_adamp"]
    assert task.grid() == bench.ADAM_GRID  # the stored runs' coarse grid, unchanged
    windows = {scale: task.grid(fine=True, batch_scale=scale) for scale in bench.BATCH_SCALES}
    for window in windows.values():
        assert len(window) == bench.FINE_WINDOW
        assert all(math.isclose(b / a, 2.0) for a, b in zip(window, window[1:]))
    assert math.isclose(windows[4][0], 2 * windows[1][0]) and math.isclose(windows[16][0], 4 * windows[1][0])
    assert bench.TASKS["shifted_mlp_sgd"].grid(fine=True)[0] == bench.SGD_FINE_GRID[2]


def _grid_runs(means, scale=1):
    return [{"task": "mnist_mlp_adamw", "method": "grid", "batch_scale": scale, "seed": s, "peak_lr": lr,
             "top1": top1 + 0.1 * s} for lr, top1 in means.items() for s in (0, 1)]


def test_extend_grids_adds_the_next_point_beyond_an_end_best_only():
    top = _grid_runs({0.01: 90.0, 0.02: 91.0, 0.04: 92.0})
    jobs = bench.extend_grids(top, ["mnist_mlp_adamw"], [1], [0, 1], fine=True)
    assert [(j["peak_lr"], j["seed"], j["batch_scale"]) for j in jobs] == [(0.08, 0, 1), (0.08, 1, 1)]
    bottom = _grid_runs({0.01: 93.0, 0.02: 91.0, 0.04: 90.0}, scale=4)
    assert [j["peak_lr"] for j in bench.extend_grids(bottom, ["mnist_mlp_adamw"], [4], [0], True)] == [0.005]
    inside = _grid_runs({0.01: 90.0, 0.02: 93.0, 0.04: 90.0})
    assert bench.extend_grids(inside, ["mnist_mlp_adamw"], [1], [0, 1], True) == []


@pytest.fixture(scope="module")
def stored():
    if not os.path.exists(STORED):
        pytest.fail(f"{STORED} is missing: the batch axis's stored runs (bench_schedules.py --batches 1,4,16)")
    with open(STORED) as f:
        return json.load(f)


def test_stored_batch_axis_has_every_task_batch_and_seed(stored):
    runs = stored["results"]
    for task in bench.BATCH_AXIS_TASKS:
        for scale in bench.BATCH_SCALES:
            mine = [r for r in runs if r["task"] == task and r.get("batch_scale", 1) == scale]
            for method in ("default", "paper", "schedulefree", "prodigy"):
                assert sorted(r["seed"] for r in mine if r["method"] == method) == list(range(10)), (task, scale)
            grid = {r["peak_lr"] for r in mine if r["method"] == "grid"}
            assert len(grid) >= bench.FINE_WINDOW
    summary = bench.summarise(runs)
    for task in bench.BATCH_AXIS_TASKS:
        for scale in bench.BATCH_SCALES:
            assert summary[bench.label(task, scale)]["best_grid_inside"], (task, scale)  # the grid resolves it


def test_stored_goals_are_recomputed_from_the_runs(stored):
    goals = bench.batch_goals(bench.summarise(stored["results"]))
    assert set(goals) == set(stored["bars"]["batch_goals"])
    for key, g in goals.items():
        kept = stored["bars"]["batch_goals"][key]
        assert g["met"] == kept["met"] and math.isclose(g["gap_to_best_grid"], kept["gap_to_best_grid"]), key


def test_picture_is_drawn_from_the_stored_runs(stored, tmp_path):
    plot = _script("plot_batches")
    out = plot.draw(bench.summarise(stored["results"]), str(tmp_path / "batches.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 20_000
