"""Bad values found by search, not by hand: every shipped config mutated (each value swapped for a wrong type, null,
zero, a negative, an out-of-range number, a string; each key misspelt or dropped) and run through the launcher's
config check (``autowu.launcher.run_config.check_config``). Each mutation is either accepted, and then builds and
steps what it configures (AutoWU, AdamP), or refused by one ``UserError`` of one line that names the key: never a
traceback, never an IndexError, ZeroDivisionError, TypeError or AttributeError."""
import copy
import json
import math
from collections import Counter

import pytest
import torch

from autowu import AutoWU
from autowu.adamp import ZeroAdamP
from autowu.data.config import DataConfig
from autowu.errors import UserError
from autowu.launcher.run_config import check_config
from conftest import REPO

DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
DATA_CONFIGS = sorted((REPO / "ffcv_configs").glob("*.json"))


def leaves(value, path=()):
    """(path, value) of every key of a JSON object, nested ones included (a list is one value)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield path + (key,), inner
            yield from leaves(inner, path + (key,))


def replaced(config, path, value=None, drop=False, rename=None):
    config = copy.deepcopy(config)
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    if drop:
        del parent[path[-1]]
    elif rename:
        parent[rename] = parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return config


def wrong_values(value):
    """What a user can write by mistake in place of ``value``."""
    yield "null", None
    yield "a string", "x"
    yield "zero", 0
    yield "a negative", -1 if not isinstance(value, (int, float)) or isinstance(value, bool) else -abs(value) - 1
    yield "out of range", 1e9
    if isinstance(value, bool):
        yield "a number for a flag", 1
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        yield "a list", [value]
        yield "an object", {"value": value}
    if isinstance(value, (dict, list)):
        yield "a flag", True


def misspelt(key):
    return key[:-1] if len(key) > 3 else key + "x"


def mutations(config):
    for path, value in leaves(config):
        for kind, wrong in wrong_values(value):
            if wrong != value:
                yield f"{'.'.join(path)} = {kind}", path, replaced(config, path, wrong)
        yield f"{'.'.join(path)} dropped", path, replaced(config, path, drop=True)
        yield f"{'.'.join(path)} misspelt", path[:-1] + (misspelt(path[-1]),), replaced(
            config, path, rename=misspelt(path[-1]))


def exercise(resolved, run):
    """An accepted config builds and steps what it configures: AutoWU through three GP tests, AdamP one step."""
    steps_per_epoch = 10
    weight = torch.nn.Parameter(torch.randn(4, 3))
    if resolved.adamp is not None:
        optimizer = ZeroAdamP([weight], **{"lr": 1e-3, **resolved.adamp})
    else:
        optimizer = torch.optim.SGD([weight], lr=0.1)
    weight.grad = torch.randn(4, 3)
    optimizer.step()
    if resolved.autowu is not None:
        resolved = resolved.with_steps_per_epoch(steps_per_epoch)
        scheduler = AutoWU(optimizer, **resolved.autowu_arguments())
        for step in range(min(scheduler.total_steps, 3 * scheduler.test_every + 1)):
            scheduler.step(2.3 - 0.001 * step + 0.01 * math.sin(step))
        assert scheduler.last_step > 0


def check(path, config, world_size, tmp_path):
    candidate = tmp_path / path.name
    candidate.write_text(json.dumps(config))
    resolved, run, _ = check_config(str(candidate), world_size)
    exercise(resolved, run)


def outcome(check_one, name, key_path):
    """("accepted" | "refused", the line) for one mutation; fails the test on anything else."""
    try:
        check_one()
        return "accepted", ""
    except UserError as err:
        message = str(err)
        assert "\n" not in message.strip(), f"{name}: more than one line: {message!r}"
        names = [k for k in key_path if isinstance(k, str)]
        assert any(k in message for k in names), f"{name}: the message names none of {names}: {message}"
        return "refused", message
    except Exception as err:  # noqa: BLE001  (the test's point: nothing else may come out)
        pytest.fail(f"{name}: {type(err).__name__}: {err}")


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_mutation_of_a_deepspeed_config_is_accepted_and_runs_or_refused_in_one_line_naming_the_key(
        path, tmp_path):
    world_size = 2 if "cpu" in path.name else 16
    original = json.loads(path.read_text())
    check(path, original, world_size, tmp_path)  # the shipped config itself
    counts = Counter()
    for name, key_path, config in mutations(original):
        result, _ = outcome(lambda: check(path, config, world_size, tmp_path), name, key_path)
        counts[result] += 1
    assert counts["refused"] > 0 and sum(counts.values()) > 200, counts


@pytest.mark.parametrize("path", DATA_CONFIGS, ids=lambda p: p.name)
def test_every_mutation_of_a_data_config_is_accepted_or_refused_in_one_line_naming_the_key(path):
    original = json.loads(path.read_text())
    counts = Counter()
    for name, key_path, config in mutations(original):
        result, _ = outcome(lambda: DataConfig.from_dict(config, path.name), name, key_path)
        counts[result] += 1
    assert counts["refused"] > 0 and sum(counts.values()) > 100, counts
