"""autowu's ZeRO-aware AdamP against timm's AdamP: in one process, and in real ZeRO-1/2 engines on 1-3 CPU ranks
whose partitions cut through parameters (tests/ds_scripts/zero_adamp.py)."""
import json
import math

import pytest
import timm.optim
import torch

import autowu.deepspeed as autowu_ds
from autowu.ds_config import resolve
from autowu.adamp import FlatLayout, ZeroAdamP
from conftest import REPO, run_deepspeed

SCRIPT = REPO / "tests" / "ds_scripts" / "zero_adamp.py"


def conv_bn_linear():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 7, 3, bias=False), torch.nn.BatchNorm2d(7), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(7 * 6 * 6, 5))


def train_pair(steps, nesterov=False, channels_last=False, kernel=None):
    """conv_bn_linear trained by timm's AdamP and by ZeroAdamP (its tensors stepped by ``kernel``: numba's on the
    CPU unless told): the parameters' relative errors, and the projected count at each step."""
    a, b = conv_bn_linear(), conv_bn_linear()
    if channels_last:
        b = b.to(memory_format=torch.channels_last)
    reference = timm.optim.AdamP(a.parameters(), lr=0.01, weight_decay=0.1, nesterov=nesterov)
    ours = ZeroAdamP(b.parameters(), lr=0.01, weight_decay=0.1, nesterov=nesterov)
    for p in b.parameters():
        if kernel:
            ours._segments_of(p)[0].kernel = kernel
    projected = []
    for step in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        y = torch.arange(8) % 5
        for model, opt in ((a, reference), (b, ours)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        projected.append(int(ours.last_projected))
    errors = [((p - q).norm() / q.norm()).item() for p, q in zip(b.parameters(), a.parameters())]
    return errors, projected


@pytest.mark.parametrize("nesterov,channels_last", [(False, False), (True, False), (False, True)])
def test_whole_parameters_step_like_timms_adamp(nesterov, channels_last):
    errors, projected = train_pair(8, nesterov, channels_last)
    assert max(errors) < 1e-6, errors
    assert all(n >= 1 for n in projected)  # the conv before BatchNorm is scale-invariant: projected


def timm_view(weight, grad, delta=0.1, eps=1e-8):
    """Which view timm's ``AdamP._projection`` takes for this weight and gradient."""
    import torch.nn.functional as F
    for name, flat in (("channel", lambda t: t.reshape(t.shape[0], -1)), ("layer", lambda t: t.reshape(1, -1))):
        cosine = F.cosine_similarity(flat(grad), flat(weight), dim=1, eps=eps).abs()
        if cosine.max() < delta / flat(weight).shape[1] ** 0.5:
            return name
    return "none"


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("view", ["channel", "layer", "none"])
def test_each_view_of_the_cpu_path_equals_timms_adamp(view, nesterov):
    """Gradients built to take each of AdamP's views on a (16, 3, 3, 3) weight: orthogonal to every channel
    (channel view); orthogonal to the weight as a whole but not to its channels (layer view, whose update is a
    visit of its own); along the weight (no projection). The CPU path equals timm's AdamP in each, with and
    without Nesterov, and counts the projection."""
    torch.manual_seed(0)
    weight = torch.randn(16, 3, 3, 3)
    w = weight.reshape(16, -1)
    grads = []
    for step in range(4):
        g = torch.randn(16, 27, generator=torch.Generator().manual_seed(100 + step))
        g -= w * ((g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True))   # orthogonal to each channel
        if view == "layer":  # add +-a * w_r per channel, with sum_r a_r |w_r|^2 = 0: the whole stays orthogonal
            signs = torch.tensor([1.0, -1.0] * 8).unsqueeze(1)
            g += 0.5 * signs * w / (w * w).sum(1, keepdim=True).sqrt()
            g -= w * ((g * w).sum() / (w * w).sum())
        elif view == "none":
            g += 0.5 * w
        grads.append(g.reshape(weight.shape))
    ours, theirs = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    opt = ZeroAdamP([ours], lr=0.01, weight_decay=0.1, nesterov=nesterov)
    reference = timm.optim.AdamP([theirs], lr=0.01, weight_decay=0.1, nesterov=nesterov)
    for g in grads:
        assert timm_view(theirs.detach(), g) == view   # the gradient takes the view it was built for
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
        assert int(opt.last_projected) == (0 if view == "none" else 1)
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-6


def weight_gradients(weight, view, breaking_row, step, seed=300):
    """A gradient for ``weight`` (rows x ...) that takes ``view`` in timm's AdamP, every row orthogonal to its
    weight but ``breaking_row`` (None: all)."""
    rows = weight.shape[0]
    w = weight.reshape(rows, -1)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + step))
    g -= w * ((g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True))   # orthogonal to each channel
    if breaking_row is not None:
        # along its weight: a cosine of 0.1 (0.45 without a projection), over the channel bound of 0.019
        along = 0.1 if view == "layer" else 0.5
        g[breaking_row] += along * w[breaking_row] * g[breaking_row].norm() / w[breaking_row].norm()
    if view == "layer":   # orthogonal to the weight as a whole again; the other rows' cosines stay under 0.01
        g -= w * ((g * w).sum() / (w * w).sum())
    return g.reshape(weight.shape)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("view", ["layer", "none"])
@pytest.mark.parametrize("breaking_row", [0, 7, 15])
def test_a_parameter_that_breaks_the_channel_view_late_equals_timms_adamp(breaking_row, view, nesterov):
    """The CPU path steps each row in the channel view as it goes; a row whose cosine breaks the view makes it take
    back the rows before it. Gradients orthogonal to every channel but ``breaking_row`` (so the rows before it
    were stepped and must be taken back): the result equals timm's AdamP in the layer view and without a
    projection, and the moments of the rows taken back are not updated twice."""
    torch.manual_seed(0)
    weight = torch.randn(16, 3, 3, 3)
    ours, theirs = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    opt = ZeroAdamP([ours], lr=0.01, weight_decay=0.1, nesterov=nesterov)
    reference = timm.optim.AdamP([theirs], lr=0.01, weight_decay=0.1, nesterov=nesterov)
    for step in range(4):   # each step's gradient built on the weight as it is then
        w = theirs.detach().reshape(16, -1)
        g = weight_gradients(theirs.detach(), view, breaking_row, step, seed=200)
        rows = torch.nn.functional.cosine_similarity(g.reshape(16, -1), w, dim=1, eps=1e-8).abs()
        broken = (rows >= 0.1 / 27 ** 0.5).nonzero().flatten().tolist()
        assert broken[0] == breaking_row and timm_view(theirs.detach(), g) == view
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
        assert int(opt.last_projected) == (0 if view == "none" else 1)
        for name in ("exp_avg", "exp_avg_sq"):
            mine, timms = opt.state[ours][name], reference.state[theirs][name]
            assert ((mine - timms).abs().max() / timms.abs().max()).item() < 1e-6, name
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-6
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)   # every element, the rows taken back included


def step_a_cut_weight_like_timm(views, nesterov):
    """ZeRO cuts a (16, 3, 3, 3) weight at element 200, inside row 7, and both sides' passes run here as two ranks
    run them, the sums added as the all-reduce adds them; step ``k`` takes gradients built for ``views[k]`` (a
    view and the row that breaks the channel view). Asserts timm's AdamP's parameters and moments to 1e-6;
    returns the rows stepped before the all-reduce."""
    import math

    import numpy as np

    from autowu.adamp_cpu import CutRows, cut_parameters, segments_of, whole_parameter_units
    torch.manual_seed(0)
    weight = torch.randn(16, 3, 3, 3)
    shapes, offsets, boundary, numel = ((16, 3, 3, 3),), (0,), 200, 432
    theirs = torch.nn.Parameter(weight.clone())
    reference = timm.optim.AdamP([theirs], lr=0.01, weight_decay=0.1, nesterov=nesterov)
    ours = weight.clone().reshape(-1).numpy()
    exp_avg, exp_avg_sq = np.zeros(numel, np.float32), np.zeros(numel, np.float32)
    sides = []
    for start, size in ((0, boundary), (boundary, numel - boundary)):
        units, shared = whole_parameter_units(shapes, offsets, start, size)
        assert len(units.first) == 0 and shared.length.sum() == size   # every row of this side is a cut one
        num_rows = segments_of(shapes, offsets, start, size)[3]
        sides.append((slice(start, start + size), CutRows(shared, cut_parameters(shapes, offsets, start, size),
                                                          num_rows, threads=2)))
    stepped_rows = set()
    for step, (view, breaking_row) in enumerate(views, start=1):
        g = weight_gradients(theirs.detach(), view, breaking_row, step)
        assert timm_view(theirs.detach(), g) == view
        grad = g.reshape(-1).numpy().copy()
        constants = dict(eps=1e-8, sqrt_bias_correction2=math.sqrt(1 - 0.999 ** step), nesterov=nesterov,
                         delta=0.1, step_size=0.01 / (1 - 0.9 ** step), decay_projected=1 - 0.01 * 0.1 * 0.1)
        partial = []
        for where, plan in sides:
            sums = np.zeros((4, 17), np.float32)
            plan.first_pass(ours[where], grad[where], exp_avg[where], exp_avg_sq[where], sums, 0.9, 0.999,
                            **constants)
            partial.append(sums)
            stepped_rows.update(plan.segments.row[plan.stepped.astype(bool)].tolist())
        complete = partial[0] + partial[1]   # the all-reduce
        count = sum(plan.second_pass(ours[where], grad[where], exp_avg[where], exp_avg_sq[where], complete.copy(),
                                     0.9, decay=1 - 0.01 * 0.1, **constants) for where, plan in sides)
        theirs.grad = g.clone()
        reference.step()
        assert count == (0 if view == "none" else 1)
        expected = theirs.detach().reshape(-1)
        assert torch.allclose(torch.from_numpy(ours), expected, rtol=1e-6, atol=1e-6), step
        for mine, name in ((exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):   # updated once a step, never twice
            timms = reference.state[theirs][name].reshape(-1)
            assert ((torch.from_numpy(mine) - timms).abs().max() / timms.abs().max()).item() < 1e-6, name
    return stepped_rows


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("view,breaking_row", [("channel", None), ("layer", 3), ("layer", 7), ("layer", 12),
                                               ("none", 3), ("none", 12)])
def test_a_parameter_cut_by_a_partition_boundary_equals_timms_adamp(view, breaking_row, nesterov):
    """Each side's rows are stepped in the channel view before the all-reduce where their own sums allow, and
    taken back after it where the whole parameter did not take that view: the result equals timm's AdamP in
    every view, wherever the row that breaks the channel view lies."""
    stepped_rows = step_a_cut_weight_like_timm([(view, breaking_row)] * 4, nesterov)
    # rows on both sides were stepped before the all-reduce (and, in the layer view or none, taken back)
    assert any(r < 7 for r in stepped_rows) and any(r > 7 for r in stepped_rows) and 7 not in stepped_rows


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_cut_parameter_whose_view_changes_from_step_to_step_equals_timms_adamp(nesterov):
    """The cut rows' plan keeps its per-row coefficients from step to step: a parameter projected at one step and
    not at the next must not take the old coefficient."""
    step_a_cut_weight_like_timm([("channel", None), ("none", 3), ("layer", 12), ("none", 12), ("channel", None),
                                 ("layer", 3)], nesterov)


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_whole_parameter_whose_view_changes_from_step_to_step_equals_timms_adamp(nesterov):
    torch.manual_seed(0)
    weight = torch.randn(16, 3, 3, 3)
    ours, theirs = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    opt = ZeroAdamP([ours], lr=0.01, weight_decay=0.1, nesterov=nesterov)
    reference = timm.optim.AdamP([theirs], lr=0.01, weight_decay=0.1, nesterov=nesterov)
    views = [("channel", None), ("none", 3), ("layer", 12), ("none", 12), ("channel", None), ("layer", 3)]
    for step, (view, breaking_row) in enumerate(views, start=1):
        g = weight_gradients(theirs.detach(), view, breaking_row, step)
        assert timm_view(theirs.detach(), g) == view
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
        assert int(opt.last_projected) == (0 if view == "none" else 1)
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6), step


@pytest.mark.parametrize("view,breaking_row", [("channel", None), ("none", 12)])
def test_a_row_that_could_not_be_taken_back_is_not_stepped_ahead(view, breaking_row):
    """A row stepped in the channel view is taken back by dividing by ``d + lr c``. Moments that point the update
    direction back along row 3, at an LR that brings ``d + lr c`` to 0.01 there, would make that division multiply
    rounding errors by 100: the row is not stepped ahead, and the result still equals timm's AdamP (in the channel
    view, and where row 12 breaks it)."""
    torch.manual_seed(0)
    weight = torch.randn(16, 3, 3, 3)
    lr = 0.01
    ours, theirs = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    opt = ZeroAdamP([ours], lr=lr, weight_decay=0.1)
    reference = timm.optim.AdamP([theirs], lr=lr, weight_decay=0.1)
    g = weight_gradients(weight, "channel", None, 1)   # a first step, to have the state
    ours.grad, theirs.grad = g.clone(), g.clone()
    opt.step()
    reference.step()
    p = theirs.detach().reshape(16, -1).clone()
    g = weight_gradients(theirs.detach(), view, breaking_row, 2)
    set_moments_that_cannot_be_taken_back(g, p, lr, (opt.state[ours], reference.state[theirs]))
    ours.grad, theirs.grad = g.clone(), g.clone()
    opt.step()
    reference.step()
    step_size, d = lr / (1 - 0.9 ** 2), 1 - lr * 0.1 * 0.1
    denom = (opt.state[ours]["exp_avg_sq"].reshape(16, -1).sqrt() / math.sqrt(1 - 0.999 ** 2) + 1e-8)
    q3 = opt.state[ours]["exp_avg"].reshape(16, -1)[3] / denom[3]
    assert abs(d + step_size * (q3 * p[3]).sum().item() / (p[3] * p[3]).sum().item() - 0.01) < 1e-3   # as built
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def set_moments_that_cannot_be_taken_back(g, p, lr, states):
    """Moments (in every state of ``states``) for a (16, 27) weight ``p`` after one step, such that with gradient
    ``g`` at step 2 row 3's ``d + lr c`` is 0.01. This step's direction of row 3 is q = m / (sqrt(v) / sqrt(bc2) +
    eps) with m = 0.9 m0 + 0.1 g, v = 0.999 v0 + ..: m0 along -p[3] with v0 = 1, so that
    lr c = lr (p . q) / |p|^2 = 0.01 - d."""
    g = g.reshape(16, -1)
    step_size, d = lr / (1 - 0.9 ** 2), 1 - lr * 0.1 * 0.1
    v0 = torch.ones(16, 27)
    denom = (0.999 * v0 + 0.001 * g ** 2).sqrt() / math.sqrt(1 - 0.999 ** 2) + 1e-8
    # (0.9 alpha (-p3) + 0.1 g3) / denom . p3 / |p3|^2 = (0.01 - d) / step_size, solved for alpha
    target = (0.01 - d) / step_size * (p[3] * p[3]).sum()
    along, other = (-0.9 * p[3] / denom[3] * p[3]).sum(), (0.1 * g[3] / denom[3] * p[3]).sum()
    m0 = torch.zeros(16, 27)
    m0[3] = -p[3] * (target - other) / along
    for state in states:
        state["exp_avg"].copy_(m0.reshape(state["exp_avg"].shape))
        state["exp_avg_sq"].copy_(v0.reshape(state["exp_avg_sq"].shape))


def test_the_cpu_path_refuses_a_moment_it_cannot_step_in_place():
    """The CPU path hands the kernel addresses, not views: a moment that is not contiguous float32 of its
    tensor's size (a hand-edited or foreign state) is refused, never read past its end or as another type."""
    model = conv_bn_linear()
    opt = ZeroAdamP(model.parameters(), lr=0.01, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    weight = model[0].weight
    opt.state[weight]["exp_avg"] = opt.state[weight]["exp_avg"].double()
    with pytest.raises(RuntimeError, match="not contiguous float32"):
        opt.step()
    assert opt.state[weight]["step"] == 1   # refused before anything moved
    opt.state[weight]["exp_avg"] = torch.zeros(weight.numel() - 1)
    with pytest.raises(RuntimeError, match="not contiguous float32"):
        opt.step()


def test_a_flat_tensor_without_a_layout_is_refused_not_stepped_as_adam():
    weight = torch.nn.Parameter(torch.randn(4, 3))
    opt = ZeroAdamP([weight], lr=0.1)
    flat = torch.nn.Parameter(weight.detach().reshape(-1).clone())
    opt.param_groups[0]["params"] = [flat]  # what ZeRO does to the param group
    flat.grad = torch.ones_like(flat)
    with pytest.raises(RuntimeError, match="layout it was not told"):
        opt.step()
    opt.set_layout(flat, FlatLayout(((4, 3),), (0,), 0, 12))
    opt.step()
    with pytest.raises(ValueError, match="1-D tensor of 13 elements"):
        opt.set_layout(flat, FlatLayout(((13,),), (0,), 0, 13))


@pytest.mark.slow
@pytest.mark.parametrize("ranks,stages", [(1, "1"), (2, "1,2"), (3, "1")])
def test_zero_partitions_step_like_timms_adamp_on_the_whole_model(tmp_path, ranks, stages):
    proc = run_deepspeed([SCRIPT, "--out", tmp_path, "--stages", stages], num_ranks=ranks)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    for r, result in enumerate(results):
        for stage, run in result["stages"].items():
            # Partitions of the 1806 parameters (aligned up to a multiple of 2 x ranks) cover them all.
            assert run["partition"][0] == r * run["partition"][1]
            if ranks > 1:
                assert run["straddling"] >= 1  # a boundary cuts through a convolution's channels
            if r == 0:   # each rank counts the parameters whose first element it holds: summed, the model's
                assert sum(res["stages"][stage]["projected"] for res in results) >= 2   # both convolutions
            # Gradient accumulation 2, fp32: the same parameters as timm's AdamP on the whole model.
            assert max(run["full_vs_reference"]) < 1e-6, (stage, run["full_vs_reference"])
            # Resumed from the step-3 checkpoint: exactly the unbroken run.
            assert max(run["resumed_vs_full"]) == 0.0
            # BatchNorm statistics: one set on every rank, the mean of the ranks' own.
            assert run["bn_after_vs_mean"] < 1e-6
            assert run["bn_after"] == results[0]["stages"][stage]["bn_after"]
            if ranks > 1:
                assert run["bn_values_averaged"] == 2 * (13 + 11)
                assert run["bn_before"] != results[1 - r if ranks == 2 else (r + 1) % ranks]["stages"][stage]["bn_before"]
        # For contrast, timm's AdamP handed to ZeRO directly sees one flat tensor and is far off.
        assert result["timm_under_zero_saw"] == [[results[0]["stages"]["1"]["partition"][1]]]
        assert max(result["timm_under_zero_vs_reference"]) > 1e-3


def test_set_ups_where_adamp_cannot_be_adamp_are_refused():
    model = torch.nn.Linear(3, 2)
    base = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamP", "params": {"weight_decay": 0.1}}}
    with pytest.raises(ValueError, match="ZeRO stage 3: not supported"):
        autowu_ds.initialize(model=model, config={**base, "zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="AdamP with fp16 needs ZeRO stage 1 or 2"):
        autowu_ds.initialize(model=model, config={**base, "fp16": {"enabled": True}})
    with pytest.raises(ValueError, match="optimizer AdamP params: unknown key 'wd'"):
        resolve({"optimizer": {"type": "AdamP", "params": {"wd": 0.1}}})
    with pytest.raises(ValueError, match="choose one"):
        autowu_ds.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=base)
    timm_adamp = timm.optim.AdamP(model.parameters())
    with pytest.raises(ValueError, match="timm's AdamP under DeepSpeed's ZeRO"):
        autowu_ds.initialize(model=model, optimizer=timm_adamp,
                             config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}})
    with pytest.raises(ValueError, match="Lamb with ZeRO stage 1: its trust ratio is per parameter"):
        autowu_ds.initialize(model=model, config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {
            "stage": 1}, "optimizer": {"type": "Lamb", "params": {"lr": 0.1}}})
    assert resolve({"optimizer": {"type": "Adam", "params": {}}}).adamp is None
    params = resolve({"optimizer": {"type": "adamp", "params": {"betas": [0.9, 0.99]}},
                      "zero_optimization": {"stage": 2}}).adamp
    assert params == {"betas": (0.9, 0.99)}


def test_cpu_segments_are_the_rows_of_a_partition_cut_through_parameters():
    from autowu.adamp_cpu import segments_of
    shapes, offsets = ((4, 3), (5,), (2, 2, 2), (3, 4)), (0, 12, 20, 28)   # gaps at 17-19 and 40+: padding
    for start, numel in ((0, 44), (5, 20), (13, 9), (29, 15)):
        first, length, row, num_rows = segments_of(shapes, offsets, start, numel)
        assert num_rows == 4 + 2 + 3
        assert first[0] == 0 and (first[1:] == first[:-1] + length[:-1]).all() and length.sum() == numel
        expected = []   # every element's row, element by element
        for k in range(start, start + numel):
            r, base = num_rows, 0
            for shape, offset in zip(shapes, offsets):
                size = int(torch.tensor(shape).prod())
                if len(shape) >= 2 and offset <= k < offset + size:
                    r = base + (k - offset) // (size // shape[0])
                base += shape[0] if len(shape) >= 2 else 0
            expected.append(r)
        assert torch.repeat_interleave(torch.tensor(row), torch.tensor(length)).tolist() == expected


def test_cpu_units_are_whole_parameters_and_the_shared_rows_the_cut_ones():
    """The one-pass CPU path takes the parameters wholly inside a tensor; the rows of parameters its ends cut
    go to the two-pass path (their sums need the other ranks'). Together: every element once."""
    from autowu.adamp_cpu import cut_parameters, largest_first, whole_parameter_units
    shapes, offsets = ((4, 3), (5,), (2, 2, 2), (3, 4)), (0, 12, 20, 28)
    # by start: (first row, rows, counted on this rank: it holds the first element) of each cut parameter
    expected_cut = {0: ([], [], []), 5: ([0, 4], [4, 2], [False, True]), 13: ([4], [2], [True]), 20: ([], [], [])}
    for start, numel, whole, cut_rows in (((0, 44, [0, 2, 3], [])), (5, 20, [], [1, 2, 3, 4, 5]),
                                          (13, 9, [], [4]), (20, 24, [2, 3], [])):
        units, shared = whole_parameter_units(shapes, offsets, start, numel)
        covered = torch.zeros(numel, dtype=torch.int64)
        for first, rows, size in zip(units.first, units.rows, units.row_size):
            covered[first:first + rows * size] += 1
        for first, length in zip(shared.first, shared.length):
            covered[first:first + length] += 1
        assert covered.eq(1).all()
        whole_found = [j for j, (shape, offset) in enumerate(zip(shapes, offsets))
                       if len(shape) > 1 and offset - start in units.first.tolist()]
        assert whole_found == whole and sorted(set(shared.row.tolist())) == cut_rows
        assert not units.projects[units.row0 == 9].any() and units.projects[units.row0 < 9].all()
        sizes = units.rows * units.row_size
        assert sorted(sizes[largest_first(units)].tolist(), reverse=True) == sizes[largest_first(units)].tolist()
        cut = cut_parameters(shapes, offsets, start, numel)  # their decisions wait for the other ranks' sums
        assert (cut.row0.tolist(), cut.rows.tolist(), cut.counted_here.tolist()) == expected_cut[start]


def test_the_fused_cpu_step_equals_the_device_path_and_any_thread_count():
    """ZeRO-1's layout on one rank (a flat buffer of every parameter with padding between them): the fused numba
    passes against the torch path a GPU runs (segmented reductions), and on 1 thread against 2 (torch's OpenMP team, or
    Python threads where torch has none): bit for bit."""
    import numba

    from autowu import adamp_cpu

    def run(fused, threads):
        model = conv_bn_linear()
        shapes = tuple(tuple(p.shape) for p in model.parameters())
        offsets, end = [], 0
        for p in model.parameters():
            offsets.append(end)
            end += p.numel() + 3   # padding, as ZeRO aligns parameters
        flat = torch.nn.Parameter(torch.zeros(end))
        for p, offset in zip(model.parameters(), offsets):
            flat.data[offset:offset + p.numel()] = p.detach().reshape(-1)
        opt = ZeroAdamP([flat], lr=0.01, weight_decay=0.1)
        opt.set_layout(flat, FlatLayout(shapes, tuple(offsets), 0, end))
        torch.set_num_threads(threads)
        for step in range(4):
            flat.grad = torch.randn(end, generator=torch.Generator().manual_seed(step))
            segments, _ = opt._segments_of(flat)
            segments.kernel = "numba" if fused else "torch"
            opt.step()
        return flat.detach().clone()

    threads = torch.get_num_threads()
    try:
        fused_two, fused_one, device_path = run(True, 2), run(True, 1), run(False, 2)
        assert adamp_cpu._openmp_parallel() is not None  # pip's torch: the parameters run on its OpenMP team
        original = adamp_cpu._openmp_parallel
        adamp_cpu._openmp_parallel = lambda: None  # a torch without OpenMP: Python threads run them
        try:
            fused_python_threads = run(True, 2)
        finally:
            adamp_cpu._openmp_parallel = original
    finally:
        torch.set_num_threads(threads)
    assert numba.config.NUMBA_NUM_THREADS >= 1
    assert torch.equal(fused_one, fused_two) and torch.equal(fused_one, fused_python_threads)
    assert ((fused_two - device_path).abs().max() / device_path.abs().max()).item() < 1e-6


def test_the_device_paths_channel_sums_are_each_channels_own():
    """The torch path (a GPU's) sums each channel's elements by a segmented reduction over the tensor: on a
    partition that cuts through parameters (at both ends), every channel's four sums equal its elements' sums
    in float64, padding and 1-D parameters in no channel."""
    from autowu.adamp import _Segments
    shapes, offsets = ((5, 3, 3, 3), (7,), (4, 11), (6, 2)), (0, 140, 150, 200)
    start, numel = 20, 190   # from row 0 of the first parameter (elements 20-26 of it) to part of the last
    layout = FlatLayout(shapes, offsets, start, numel)
    opt = ZeroAdamP([torch.nn.Parameter(torch.zeros(numel))], lr=0.01, weight_decay=0.1)
    flat = opt.param_groups[0]["params"][0]
    opt.set_layout(flat, layout)
    flat.data = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    flat.grad = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    segments = _Segments(layout, flat.device)
    partial = torch.zeros(4, segments.num_rows + 1)
    perturb = opt._adam(flat, opt.param_groups[0], 0.9, 0.999)
    opt.state[flat].clear()
    segments.kernel = "torch"
    assert opt._adam_and_sums(flat, opt.param_groups[0], segments, partial) is not None
    expected = torch.zeros(4, segments.num_rows + 1, dtype=torch.float64)
    row0 = 0
    for shape, offset in zip(shapes, offsets):
        if len(shape) < 2:
            continue
        row_size = shape[1] if len(shape) == 2 else 27
        for r in range(shape[0]):
            lo, hi = max(offset + r * row_size, start), min(offset + (r + 1) * row_size, start + numel)
            if lo < hi:
                p, g, q = (t[lo - start:hi - start].double() for t in (flat.detach(), flat.grad, perturb))
                expected[:, row0 + r] = torch.stack([(g * p).sum(), (g * g).sum(), (p * p).sum(), (p * q).sum()])
        row0 += shape[0]
    torch.testing.assert_close(partial.double(), expected, rtol=1e-5, atol=1e-6)
    assert (partial[:, -1] == 0).all() and (partial[:, :5] != 0).all()
