"""ZeroAdamP's Triton path (``autowu.adamp_triton``, a GPU's) against timm's AdamP, run by Triton's interpreter on
the CPU. Not collected by the test run itself: ``tests/test_adamp_triton.py`` runs this file in a process of its
own with ``TRITON_INTERPRET=1``, which must be set before Triton is imported."""
import math
import os

import pytest
import timm.optim
import torch

from autowu.adamp import FlatLayout, ZeroAdamP
from autowu.adamp_triton import MAX_TILE, TILE_CLASSES, TritonPlan
from test_adamp import (conv_bn_linear, set_moments_that_cannot_be_taken_back, timm_view, train_pair,
                        weight_gradients)

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (tests/test_adamp_triton.py does)"


def on_triton(opt: ZeroAdamP) -> ZeroAdamP:
    """The optimizer's tensors stepped by the Triton kernels (interpreted, on the CPU) instead of numba's."""
    for group in opt.param_groups:
        for p in group["params"]:
            opt._segments_of(p)[0].kernel = "triton"
    return opt


def pair(weight, nesterov=False, lr=0.01):
    ours, theirs = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    opt = on_triton(ZeroAdamP([ours], lr=lr, weight_decay=0.1, nesterov=nesterov))
    reference = timm.optim.AdamP([theirs], lr=lr, weight_decay=0.1, nesterov=nesterov)
    return ours, theirs, opt, reference


def step_both(ours, theirs, opt, reference, g):
    ours.grad, theirs.grad = g.clone(), g.clone()
    opt.step()
    reference.step()


def assert_moments_match(opt, ours, reference, theirs):
    for name in ("exp_avg", "exp_avg_sq"):
        mine, timms = opt.state[ours][name], reference.state[theirs][name]
        assert ((mine - timms).abs().max() / timms.abs().max()).item() < 1e-6, name


@pytest.mark.parametrize("nesterov", [False, True])
def test_whole_parameters_step_like_timms_adamp(nesterov):
    errors, projected = train_pair(6, nesterov, kernel="triton")
    assert max(errors) < 1e-6, errors
    assert all(n >= 1 for n in projected)  # the conv before BatchNorm is scale-invariant: projected


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("view,breaking_row", [("channel", None), ("layer", 0), ("layer", 7), ("layer", 15),
                                               ("none", 0), ("none", 7), ("none", 15)])
def test_each_view_and_a_row_that_breaks_the_channel_view_late(view, breaking_row, nesterov):
    """Rows before ``breaking_row`` are stepped ahead in the channel view and taken back after the decision: the
    parameter, every element of it, and the moments (updated once) equal timm's AdamP in every view."""
    torch.manual_seed(0)
    ours, theirs, opt, reference = pair(torch.randn(16, 3, 3, 3), nesterov)
    plan = opt._segments_of(ours)[0].triton_plan
    for step in range(4):
        g = weight_gradients(theirs.detach(), view, breaking_row, step, seed=200)
        assert timm_view(theirs.detach(), g) == view
        step_both(ours, theirs, opt, reference, g)
        assert int(opt.last_projected) == (0 if view == "none" else 1)
        stepped = plan.stepped[:16].tolist()
        if view == "channel":
            assert stepped == [1] * 16
        else:   # the rows under the channel bound were stepped ahead, the breaking row was not
            assert stepped[breaking_row] == 0 and sum(stepped) >= 10
        assert_moments_match(opt, ours, reference, theirs)
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6), step


def test_a_parameter_whose_view_changes_from_step_to_step():
    torch.manual_seed(0)
    ours, theirs, opt, reference = pair(torch.randn(16, 3, 3, 3))
    for step, (view, breaking_row) in enumerate([("channel", None), ("none", 3), ("layer", 12), ("none", 12),
                                                 ("channel", None), ("layer", 3)], start=1):
        g = weight_gradients(theirs.detach(), view, breaking_row, step)
        step_both(ours, theirs, opt, reference, g)
        assert int(opt.last_projected) == (0 if view == "none" else 1)
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6), step


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("views", [[("channel", None)] * 3, [("layer", 3)] * 3, [("none", 12)] * 3,
                                   [("channel", None), ("none", 3), ("layer", 12), ("layer", 7), ("channel", None)]])
def test_a_parameter_cut_by_a_partition_boundary(views, nesterov):
    """ZeRO cuts a (16, 3, 3, 3) weight inside row 7; both sides' kernels run as two ranks run them, the sums added
    as the all-reduce adds them. Whole rows on either side are stepped ahead where their own sums allow, and taken
    back where the whole parameter did not take the channel view."""
    torch.manual_seed(0)
    weight = torch.randn(16, 3, 3, 3)
    shapes, offsets, boundary, numel = ((16, 3, 3, 3),), (0,), 200, 432
    theirs = torch.nn.Parameter(weight.clone())
    reference = timm.optim.AdamP([theirs], lr=0.01, weight_decay=0.1, nesterov=nesterov)
    ours = weight.clone().reshape(-1)
    exp_avg, exp_avg_sq = torch.zeros(numel), torch.zeros(numel)
    sides = [(slice(a, a + n), TritonPlan(shapes, offsets, a, n, torch.device("cpu")))
             for a, n in ((0, boundary), (boundary, numel - boundary))]
    group = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, delta=0.1, wd_ratio=0.1, nesterov=nesterov)
    from autowu.adamp_triton import StepConstants
    for step, (view, breaking_row) in enumerate(views, start=1):
        g = weight_gradients(theirs.detach(), view, breaking_row, step)
        assert timm_view(theirs.detach(), g) == view
        grad = g.reshape(-1).clone()
        constants = StepConstants.of(group, step)
        partial = []
        for where, plan in sides:
            sums = torch.zeros(4, 17)
            plan.first_pass(ours[where], grad[where], exp_avg[where], exp_avg_sq[where], sums, constants, 0.1)
            partial.append(sums)
        complete = partial[0] + partial[1]   # the all-reduce
        for where, plan in sides:
            plan.second_pass(ours[where], grad[where], exp_avg[where], exp_avg_sq[where], complete.clone(),
                             constants, 0.1)
        # rows 0-6 on one side, 8-15 on the other were whole there; row 7 is cut and never stepped ahead
        stepped = [plan.stepped[:plan.segments].tolist() for _, plan in sides]
        assert stepped[0][7] == 0 and stepped[1][0] == 0 and sum(stepped[0]) >= 5 and sum(stepped[1]) >= 6
        count = sum(int(plan.projected_count()) for _, plan in sides)
        theirs.grad = g.clone()
        reference.step()
        assert count == (0 if view == "none" else 1)   # counted by the side holding its first element
        assert torch.allclose(ours, theirs.detach().reshape(-1), rtol=1e-6, atol=1e-6), step
        for mine, name in ((exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
            timms = reference.state[theirs][name].reshape(-1)
            assert ((mine - timms).abs().max() / timms.abs().max()).item() < 1e-6, name


def test_a_row_that_could_not_be_taken_back_is_not_stepped_ahead():
    """As tests/test_adamp.py builds it for the CPU path: moments that bring ``d + lr c`` of row 3 to 0.01. The
    row is not stepped ahead (its take-back would multiply rounding errors by 100); the result is timm's."""
    torch.manual_seed(0)
    weight = torch.randn(16, 3, 3, 3)
    ours, theirs, opt, reference = pair(weight)
    step_both(ours, theirs, opt, reference, weight_gradients(weight, "channel", None, 1))
    g = weight_gradients(theirs.detach(), "none", 12, 2)
    set_moments_that_cannot_be_taken_back(g, theirs.detach().reshape(16, -1).clone(), 0.01,
                                          (opt.state[ours], reference.state[theirs]))
    step_both(ours, theirs, opt, reference, g)
    stepped = opt._segments_of(ours)[0].triton_plan.stepped[:16].tolist()
    assert stepped[3] == 0 and stepped[12] == 0 and sum(stepped) == 14
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def flat_model(model, pad=3):
    """ZeRO-1's layout on one rank: every parameter in one flat buffer, with padding between them."""
    shapes = tuple(tuple(p.shape) for p in model.parameters())
    offsets, end = [], 0
    for p in model.parameters():
        offsets.append(end)
        end += p.numel() + pad
    flat = torch.nn.Parameter(torch.zeros(end))
    for p, offset in zip(model.parameters(), offsets):
        flat.data[offset:offset + p.numel()] = p.detach().reshape(-1)
    return flat, FlatLayout(shapes, tuple(offsets), 0, end)


@pytest.mark.parametrize("tile_classes", [TILE_CLASSES, (64,)])
def test_a_flat_layout_equals_the_cpu_path_and_repeats_bit_for_bit(tile_classes):
    """ZeRO-1's layout on one rank (padding, 1-D parameters between the projected ones): the Triton path against
    the numba path to 1e-6, and the same bits on a second run (no atomics: nothing varies from run to run). With
    tiles of at most 64 elements the linear layer's rows (252) take the long-row kernel."""
    def run(kernel):
        flat, layout = flat_model(conv_bn_linear())
        opt = ZeroAdamP([flat], lr=0.01, weight_decay=0.1)
        opt.set_layout(flat, layout)
        segments = opt._segments_of(flat)[0]
        segments.kernel = kernel
        if kernel == "triton":
            segments._triton_plan = TritonPlan(layout.shapes, layout.offsets, layout.start, layout.numel,
                                                   flat.device, tile_classes=tile_classes)
            assert segments.triton_plan.long_segments.numel() == (5 if tile_classes == (64,) else 0)
        for step in range(4):
            flat.grad = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(step))
            opt.step()
        return flat.detach().clone(), int(opt.last_projected)
    (first, count), (second, _), (numba_path, numba_count) = run("triton"), run("triton"), run("numba")
    assert torch.equal(first, second)
    assert count == numba_count
    assert ((first - numba_path).abs().max() / numba_path.abs().max()).item() < 1e-6


def test_long_rows_and_long_runs_of_other_elements():
    """A row longer than a tile (its sums in a loop, never stepped ahead) and a 1-D parameter longer than a tile
    (cut into tiles), in every view of the long-row weight: timm's AdamP."""
    torch.manual_seed(0)
    n = MAX_TILE + 1000
    for view, breaking_row in (("channel", None), ("layer", 1), ("none", 2)):
        weight, bias = torch.randn(3, n), torch.randn(2 * MAX_TILE + 5)
        ours = [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())]
        theirs = [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())]
        opt = on_triton(ZeroAdamP(ours, lr=0.01, weight_decay=0.1))
        reference = timm.optim.AdamP(theirs, lr=0.01, weight_decay=0.1)
        plan = opt._segments_of(ours[0])[0].triton_plan
        assert plan.long_segments.numel() == 3
        assert opt._segments_of(ours[1])[0].triton_plan.tile_length.tolist() == [MAX_TILE, MAX_TILE, 5]
        for step in range(3):
            g = weight_gradients(theirs[0].detach(), view, breaking_row, step)
            cosines = torch.nn.functional.cosine_similarity(g, theirs[0].detach(), dim=1, eps=1e-8).abs()
            under_bound = (cosines < 0.1 / n ** 0.5).int().tolist()
            gb = torch.randn(bias.shape, generator=torch.Generator().manual_seed(step))
            for params, grads in ((ours, (g, gb)), (theirs, (g, gb))):
                for param, grad in zip(params, grads):
                    param.grad = grad.clone()
            opt.step()
            reference.step()
            assert int(opt.last_projected) == (0 if view == "none" else 1)
            # long rows under the channel bound are stepped ahead too (and taken back if another breaks the view)
            assert plan.stepped[:3].tolist() == under_bound
            assert under_bound == {"channel": [1, 1, 1], "layer": under_bound, "none": [1, 1, 0]}[view]
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), view


def test_tiles_of_every_size_class_cover_every_element_once():
    """A flat layout of parameters whose rows fall in every tile class, cut at both ends: every element is in
    exactly one tile or long row, and each projected segment is one row's part."""
    shapes = ((4, 100), (7,), (3, 600), (2, 3000), (5000,), (2, 5000), (1, MAX_TILE + 3), (9, 4))
    offsets, end = [], 0
    for shape in shapes:
        offsets.append(end)
        end += math.prod(shape) + 5
    for start, numel in ((0, end), (150, end - 300)):
        plan = TritonPlan(shapes, tuple(offsets), start, numel, torch.device("cpu"))
        covered = torch.zeros(numel, dtype=torch.int64)
        for first, length in zip(plan.tile_first.tolist(), plan.tile_length.tolist()):
            covered[first:first + length] += 1
        for s in plan.long_segments.tolist():
            a, n = plan.segment_first[s].item(), plan.segment_length[s].item()
            covered[a:a + n] += 1
        assert covered.eq(1).all()
        assert sorted({t.block for t in plan.classes}) == sorted(TILE_CLASSES)
        assert {t.aligned for t in plan.classes} == {True, False}
        lower = {}
        for tiles in plan.classes:   # each tile in the smallest class that holds it
            lengths = plan.tile_length[tiles.ids.long()]
            firsts = plan.tile_first[tiles.ids.long()]
            assert (lengths <= tiles.block).all() and (lengths > lower.get(tiles.aligned, 0)).all()
            lower[tiles.aligned] = tiles.block
            # a tile launched as aligned really is: a wrong promise reads the wrong elements on a GPU
            on_boundaries = (firsts % 4 == 0) & (lengths % 4 == 0)
            assert on_boundaries.all() if tiles.aligned else not on_boundaries.any()
