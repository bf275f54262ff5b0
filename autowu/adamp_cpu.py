"""ZeroAdamP's step on the CPU: fused numba passes over a flat tensor, instead of some twenty torch passes.

A flat tensor (a ZeRO partition, or a whole parameter) holds whole parameters and, at its ends, parts of
parameters that a partition boundary cuts. A whole parameter's AdamP decision needs only its own elements and
only grad.param, grad.grad and param.param of each channel ("row"). The channel view, the one a real network's
convolutions take, holds when every row's cosine is under a bound, and then each row's update needs only that
row's sums; so ``WholeParameters`` steps each row in the channel view as it reaches it (sums, cosine, Adam's
moments, update direction, update, all while the row is in the L1 cache), reading and writing the parameter
once, as a fused Adam does. A row over the bound ends that: the rows before it are taken back and the parameter
takes the view its sums give (the layer view, whose coefficient is the whole parameter's, visits it once more).
The parameters run on torch's own OpenMP threads, largest first, each done by one thread in one fixed order: the
result does not depend on the number of threads. A rank's whole parameters need nothing from the other ranks, so
they run while the cut rows' sums are all-reduced.

The rows of cut parameters (``Segments``: at most one parameter at each end of a ZeRO partition) take two
passes around the all-reduce that completes their sums over the ranks (``CutRows``):

1. ``cut_rows_first_pass``: the four sums of every row (grad.param, grad.grad, param.param, param.perturb) and
   Adam's moments as timm updates them, in one visit. A row wholly on this rank whose own cosine is
   under the channel bound is stepped in the channel view at once; the others keep their update direction.
2. ``cut_rows_second_pass``, after ``decide_cut_parameters`` has taken the decisions from the completed sums:
   ``param = param * decay[row] - step * (perturb - coefficient[row] * param)`` for the rows not stepped; a row
   stepped where its parameter did not take the channel view is taken back and stepped in the view taken.

Elements of 1-D parameters and padding form runs of their own ("other" rows: Adam and plain weight decay).
"""
from __future__ import annotations

import ctypes
import functools
import glob
import math
import os
from typing import NamedTuple, Tuple

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, prange, types
from numba.extending import intrinsic


def segments_of(shapes, offsets, start: int, numel: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(first element, length, row) of every segment of ``[start, start + numel)`` of a flat buffer, in order,
    and the number of rows; elements outside the rows of projected (2+ dim) parameters belong to row
    ``num_rows``."""
    first, length, row = [], [], []
    num_rows, covered = 0, start
    end = start + numel

    def other(a, b):  # a run of elements that no projected row holds
        if a < b:
            first.append(a - start)
            length.append(b - a)
            row.append(-1)

    for shape, offset in zip(shapes, offsets):
        size = math.prod(shape)
        if len(shape) < 2:
            continue
        rows, row_size = shape[0], size // shape[0]
        lo, hi = max(offset, start), min(offset + size, end)
        if lo < hi:
            other(covered, lo)
            first_row, last_row = (lo - offset) // row_size, (hi - 1 - offset) // row_size
            bounds = np.arange(first_row, last_row + 2, dtype=np.int64) * row_size + offset
            bounds[0], bounds[-1] = lo, hi
            first.extend((bounds[:-1] - start).tolist())
            length.extend(np.diff(bounds).tolist())
            row.extend(range(num_rows + first_row, num_rows + last_row + 1))
            covered = hi
        num_rows += rows
    other(covered, end)
    row = np.asarray(row, dtype=np.int64)
    row[row < 0] = num_rows
    return np.asarray(first, dtype=np.int64), np.asarray(length, dtype=np.int64), row, num_rows


@njit(inline="always")
def _adam_constants(beta1, beta2, eps, sqrt_bias_correction2, nesterov):
    """float32 constants, as torch computes on float32 tensors: (b1, b2, 1 - b1, 1 - b2, eps, the reciprocal of the
    second bias correction's square root, and nb1, ng of ``perturb = (nb1 * m + ng * g) / denom``)."""
    return (np.float32(beta1), np.float32(beta2), np.float32(1.0 - beta1), np.float32(1.0 - beta2),
            np.float32(eps), np.float32(1.0) / np.float32(sqrt_bias_correction2),
            np.float32(beta1) if nesterov else np.float32(1.0),
            np.float32(1.0 - beta1) if nesterov else np.float32(0.0))


@njit(inline="always")
def _adam_element(g, m, v, constants):
    """One element's moments as timm updates them and its update direction: (m, v, perturb). The square root is
    multiplied by the bias correction's reciprocal, as torch's CUDA kernels divide by a scalar (its CPU kernel
    divides): one division an element instead of two, which bound the loop on one core."""
    b1, b2, c1, c2, e, inv_bc2, nb1, ng = constants
    m = m * b1 + g * c1
    v = v * b2 + g * g * c2
    return m, v, (nb1 * m + ng * g) / (np.sqrt(v) * inv_bc2 + e)


# The inner loops run over slices from 0: so written, LLVM vectorises them (an inner loop over ``range(a, b)`` of
# the whole arrays ran 3-6x slower). Reassociation (restricted fastmath) lets it vectorise the sums; each row
# is still summed by one thread in one fixed order, so the result does not depend on the number of threads.
@njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz"}, error_model="numpy")
def cut_rows_first_pass(param, grad, exp_avg, exp_avg_sq, perturb, first, length, row, row_size, scratch_first,
                        sums, q_rows, stepped, beta1, beta2, eps, sqrt_bias_correction2, nesterov, delta, step_size,
                        decay_projected):
    """The cut parameters' rows before the all-reduce: Adam's moments and the four sums of every piece (grad.param,
    grad.grad, param.param, param.perturb) in one visit. A row wholly in this tensor whose own cosine is under the
    channel bound is then stepped in the channel view at once (``stepped``); the view is taken for the whole
    parameter after the all-reduce, and the second pass takes the row back if it was not. Every other piece keeps
    its update direction (in ``perturb``, at ``scratch_first``). Segment ``s`` is done by thread
    ``s % threads``, each in one fixed order: no result depends on the number of threads."""
    constants = _adam_constants(beta1, beta2, eps, sqrt_bias_correction2, nesterov)
    lr, d = np.float32(step_size), np.float32(decay_projected)
    threads, segments = q_rows.shape[0], first.shape[0]
    for t in prange(threads):
        q_row = q_rows[t]
        for s in range(t, segments, threads):
            a, n, r = first[s], length[s], row[s]
            sums[0, r], sums[1, r], sums[2, r], sums[3, r] = _adam_and_sums(param, grad, exp_avg, exp_avg_sq, a, n,
                                                                            q_row, constants)
            ps, qs = param[a:a + n], q_row[:n]
            # the coefficient from the stored sums: as the second pass and the decision see them
            c = projection_coefficient(sums[3, r], sums[2, r], eps)
            stepped[s] = (n == row_size[s] and _cosine(sums[0, r], sums[1, r], sums[2, r], eps) < delta / np.sqrt(n)
                          and _can_take_back(d, lr, c))
            if stepped[s]:
                for i in range(n):
                    p = ps[i]
                    ps[i] = p * d - lr * (qs[i] - c * p)
            else:
                perturb[scratch_first[s]:scratch_first[s] + n] = qs


@njit(parallel=True, cache=True, fastmath={"contract"}, error_model="numpy")
def cut_rows_second_pass(param, grad, exp_avg, exp_avg_sq, perturb, first, length, row, scratch_first, sums, stepped,
                         views, coefficient, beta1, eps, sqrt_bias_correction2, nesterov, step_size, decay,
                         decay_projected):
    """The cut parameters' rows after the decision (``views`` and ``coefficient`` per row, from the sums completed
    over the ranks): ``param = param * decay - step * (perturb - coefficient * param)``, ``decay_projected`` where
    projected. A row stepped in the channel view where the parameter took it is done; where it did not, it is taken
    back (its direction from the moments, as ``_undo_channel_row``) and stepped in the view taken."""
    constants = _adam_constants(beta1, 0.0, eps, sqrt_bias_correction2, nesterov)
    lr, d_channel = np.float32(step_size), np.float32(decay_projected)
    for s in prange(first.shape[0]):
        a, n, r = first[s], length[s], row[s]
        c = np.float32(coefficient[r])
        d = d_channel if views[r] != _NO_PROJECTION else np.float32(decay)
        ps = param[a:a + n]
        if not stepped[s]:
            qs = perturb[scratch_first[s]:scratch_first[s] + n]
            for i in range(n):
                p = ps[i]
                ps[i] = p * d - lr * (qs[i] - c * p)
        elif views[r] != _CHANNEL_VIEW:
            gs, ms, vs = grad[a:a + n], exp_avg[a:a + n], exp_avg_sq[a:a + n]
            scale = np.float32(1.0) / (d_channel + lr * projection_coefficient(sums[3, r], sums[2, r], eps))
            for i in range(n):
                q = _direction(gs[i], ms[i], vs[i], constants)
                p = (ps[i] + lr * q) * scale
                ps[i] = p * d - lr * (q - c * p)


@njit(inline="always")
def _projection_coefficient(param_perturb, param_param, eps):
    """AdamP's ``c`` of ``perturb -= c * param``: a row's (channel view) or, from the sums of its rows, a whole
    parameter's (layer view). Inlined into the whole parameters' kernel (a call a row cost it 1.5%)."""
    return np.float32(param_perturb / (np.sqrt(param_param) + eps) ** 2)


@njit(cache=True, error_model="numpy")
def projection_coefficient(param_perturb, param_param, eps):
    """``_projection_coefficient`` compiled once, with flags of its own: the cut rows' first pass (fastmath) and
    the decision (not) call it, so that a row stepped ahead of the decision, its take-back and the decision
    compute the same float32 number."""
    return _projection_coefficient(param_perturb, param_param, eps)


class Units(NamedTuple):
    first: np.ndarray      # first element in the tensor
    rows: np.ndarray       # channels (1 for a run of other elements)
    row_size: np.ndarray   # elements a channel
    projects: np.ndarray   # False for other elements
    row0: np.ndarray       # the first channel's number among the buffer's (num_rows for other elements)


class Segments(NamedTuple):
    first: np.ndarray
    length: np.ndarray
    row: np.ndarray
    row_size: np.ndarray   # elements of the segment's whole row (a segment shorter than it: a row a boundary cuts)


def whole_parameter_units(shapes, offsets, start: int, numel: int):
    """Split ``[start, start + numel)`` of a flat buffer into what one rank can finish alone and what it cannot.

    ``Units``: every projected parameter wholly inside the tensor (its AdamP decision needs only its own sums)
    and every run of other elements (1-D parameters, padding: one row, never projected). ``Segments``: the rest,
    rows of parameters cut by the tensor's ends (a ZeRO partition boundary), whose sums must be completed over
    the ranks before the decision.
    """
    first, length, row, num_rows = segments_of(shapes, offsets, start, numel)
    end = start + numel
    whole_row = np.zeros(num_rows + 1, dtype=np.bool_)
    row_size = np.zeros(num_rows + 1, dtype=np.int64)
    row_start = np.full(num_rows + 1, -1, dtype=np.int64)  # the row's parameter's first row
    whole_row[num_rows] = True  # other elements: never shared
    r = 0
    for shape, offset in zip(shapes, offsets):
        if len(shape) < 2:
            continue
        size = math.prod(shape)
        whole_row[r:r + shape[0]] = offset >= start and offset + size <= end
        row_size[r:r + shape[0]] = size // shape[0]
        row_start[r:r + shape[0]] = r
        r += shape[0]
    units = []
    for s in range(len(first)):
        rr = row[s]
        if rr == num_rows:
            units.append((first[s], 1, length[s], False, num_rows))
        elif whole_row[rr] and rr == row_start[rr]:  # a whole parameter, from its first row
            units.append((first[s], int(np.sum(row_start == rr)), row_size[rr], True, rr))
    table = np.asarray(units, dtype=np.int64).reshape(-1, 5)
    shared = ~whole_row[row]
    return (Units(table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy(), table[:, 3].astype(np.bool_),
                  table[:, 4].copy()),
            Segments(first[shared].copy(), length[shared].copy(), row[shared].copy(), row_size[row[shared]]))


class CutParameters(NamedTuple):
    row0: np.ndarray       # the parameter's first channel among the buffer's
    rows: np.ndarray
    row_size: np.ndarray
    counted_here: np.ndarray   # its first element is in this tensor: counted here among the projected


def cut_parameters(shapes, offsets, start: int, numel: int) -> CutParameters:
    """The projected (2+ dim) parameters that ``[start, start + numel)`` holds only part of."""
    table, r, end = [], 0, start + numel
    for shape, offset in zip(shapes, offsets):
        if len(shape) < 2:
            continue
        size = math.prod(shape)
        if offset < end and offset + size > start and not (offset >= start and offset + size <= end):
            table.append((r, shape[0], size // shape[0], offset >= start))
        r += shape[0]
    table = np.asarray(table, dtype=np.int64).reshape(-1, 4)
    return CutParameters(table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy(), table[:, 3].astype(np.bool_))


@njit(cache=True, error_model="numpy")
def decide_cut_parameters(sums, row0, rows, row_size, counted_here, eps, delta, coefficient, views):
    """The cut parameters' AdamP decisions from their complete sums (all-reduced over the ranks): per row the
    coefficient of ``perturb -= c * param`` and the view (``views``: none, channel or layer; weight decay takes
    ``wd_ratio`` where projected). Returns how many of those counted here were projected."""
    count = 0
    for k in range(row0.shape[0]):
        a, n_rows = row0[k], rows[k]
        block = sums[:, a:a + n_rows]
        view = _decide(block, n_rows, row_size[k], eps, delta)
        if view == _CHANNEL_VIEW:
            for r in range(n_rows):
                coefficient[a + r] = projection_coefficient(block[3, r], block[2, r], eps)
        elif view == _LAYER_VIEW:
            param_param = param_perturb = 0.0
            for r in range(n_rows):
                param_param += block[2, r]
                param_perturb += block[3, r]
            for r in range(n_rows):
                coefficient[a + r] = projection_coefficient(param_perturb, param_param, eps)
        else:   # ``coefficient`` is kept from step to step: a parameter not projected now may have been before
            for r in range(n_rows):
                coefficient[a + r] = 0.0
        for r in range(n_rows):
            views[a + r] = view
        if view != _NO_PROJECTION and counted_here[k]:
            count += 1
    return count


class CutRows:
    """The rows of the parameters cut by one tensor's ends (a ZeRO partition boundary), on ``threads`` threads: the
    two passes around the all-reduce that completes their sums, with their tables and scratch (built once per
    layout and thread count: a step allocates nothing)."""

    def __init__(self, segments: Segments, cut: CutParameters, num_rows: int, threads: int):
        self.segments, self.cut, self.threads = segments, cut, max(1, int(threads))
        self.scratch_first = np.concatenate([[0], np.cumsum(segments.length)[:-1]]).astype(np.int64)
        self.perturb = np.empty(int(segments.length.sum()), dtype=np.float32)   # directions of rows not stepped
        self.q_rows = np.empty((self.threads, int(segments.length.max())), dtype=np.float32)
        self.stepped = np.zeros(len(segments.first), dtype=np.uint8)
        self.coefficient = np.zeros(num_rows + 1, dtype=np.float32)
        self.views = np.zeros(num_rows + 1, dtype=np.uint8)

    def first_pass(self, param, grad, exp_avg, exp_avg_sq, sums, beta1, beta2, eps, sqrt_bias_correction2,
                   nesterov, delta, step_size, decay_projected) -> None:
        """Adam's moments and the four partial sums of every row into ``sums`` (4 x rows + 1, float32, zeroed);
        rows that can be are stepped in the channel view already."""
        s = self.segments
        cut_rows_first_pass(param, grad, exp_avg, exp_avg_sq, self.perturb, s.first, s.length, s.row, s.row_size,
                            self.scratch_first, sums, self.q_rows, self.stepped, beta1, beta2, eps,
                            sqrt_bias_correction2, nesterov, delta, step_size, decay_projected)

    def second_pass(self, param, grad, exp_avg, exp_avg_sq, sums, beta1, eps, sqrt_bias_correction2, nesterov,
                    delta, step_size, decay, decay_projected) -> int:
        """The decisions from the complete sums, then the update; returns how many of the cut parameters counted
        here (those whose first element this tensor holds) were projected."""
        s, cut = self.segments, self.cut
        count = decide_cut_parameters(sums, cut.row0, cut.rows, cut.row_size, cut.counted_here, eps, delta,
                                      self.coefficient, self.views)
        cut_rows_second_pass(param, grad, exp_avg, exp_avg_sq, self.perturb, s.first, s.length, s.row,
                             self.scratch_first, sums, self.stepped, self.views, self.coefficient, beta1, eps,
                             sqrt_bias_correction2, nesterov, step_size, decay, decay_projected)
        return count


def largest_first(units: Units) -> np.ndarray:
    """The units in the order threads take them: largest first (ResNet-50's last stage alone holds most of its
    elements), so that the small ones fill the gaps at the end."""
    return np.argsort(-(units.rows * units.row_size), kind="stable").astype(np.int64)


_NO_PROJECTION, _CHANNEL_VIEW, _LAYER_VIEW = 0, 1, 2


@njit(inline="always", fastmath={"reassoc", "contract", "nsz"})
def _one_parameter(param, grad, exp_avg, exp_avg_sq, a0, rows, n, projects, sums, q_row, beta1, beta2, eps,
                   sqrt_bias_correction2, nesterov, delta, step_size, decay, decay_projected):
    """``sums`` (4 x at least ``rows``, float64) and ``q_row`` (at least ``n``, float32): the calling thread's
    scratch. Nothing is allocated here: in a thread of torch's team, malloc's per-thread arena gives memory back
    to the system and faults it in again at every parameter, which more than doubles a step.

    A projected parameter is first stepped as if it took the channel view, each row in one visit: its sums, its
    cosine, Adam's moments, its update direction and its update while the row is in the L1 cache. The channel view
    holds if every row's cosine is under the bound, and each row's own cosine and coefficient are all it needs,
    so a parameter that takes it (every convolution of a real ResNet-50 step) is read and written once, as a fused
    Adam does: no pass to decide first. The first row over the bound shows that the guess was wrong; the rows
    already updated are taken back (``_undo_channel_row``), the rest of the rows summed, and the parameter
    stepped in the view ``_decide`` gives (the layer view, or none). The guess depends only on this step's
    parameter and gradient, so a run (and a run resumed from a checkpoint) repeats bit for bit."""
    if not projects:
        _adam_row(param, grad, exp_avg, exp_avg_sq, a0, rows * n, _NO_PROJECTION, 0.0, q_row, beta1, beta2, eps,
                  sqrt_bias_correction2, nesterov, step_size, np.float32(decay), False)
        return 0
    bound = delta / np.sqrt(n)
    constants = _adam_constants(beta1, beta2, eps, sqrt_bias_correction2, nesterov)
    lr, d_channel = np.float32(step_size), np.float32(decay_projected)
    done = 0   # rows stepped in the channel view
    while done < rows:
        a = a0 + done * n
        sums[0, done], sums[1, done], sums[2, done], sums[3, done] = _adam_and_sums(param, grad, exp_avg, exp_avg_sq,
                                                                                    a, n, q_row, constants)
        if not _cosine(sums[0, done], sums[1, done], sums[2, done], eps) < bound:
            break
        c = _projection_coefficient(sums[3, done], sums[2, done], eps)
        if not _can_take_back(d_channel, lr, c):
            break
        ps = param[a:a + n]
        for i in range(n):   # the row is in the L1 cache
            p = ps[i]
            ps[i] = p * d_channel - lr * (q_row[i] - c * p)
        done += 1
    if done == rows:
        return 1
    # A row broke the channel view (or could not be stepped ahead: ``_can_take_back``): the rows stepped in it go
    # back to their values; their moments, and that row's, stay updated. The other rows are summed, and the
    # parameter takes the view its sums give (the channel view too, where only the second reason stopped it).
    for r in range(done):
        coefficient = _projection_coefficient(sums[3, r], sums[2, r], eps)
        _undo_channel_row(param, grad, exp_avg, exp_avg_sq, a0 + r * n, n, coefficient, beta1, eps,
                          sqrt_bias_correction2, nesterov, step_size, d_channel)
    for r in range(done + 1, rows):
        sums[0, r], sums[1, r], sums[2, r] = _row_sums(grad, param, a0 + r * n, n)
    view = _decide(sums, rows, n, eps, delta)
    d = np.float32(decay_projected if view != _NO_PROJECTION else decay)
    layer_param_perturb = 0.0
    for r in range(rows):
        sums[3, r] = _adam_row(param, grad, exp_avg, exp_avg_sq, a0 + r * n, n, view, sums[2, r], q_row, beta1,
                               beta2, eps, sqrt_bias_correction2, nesterov, step_size, d, r <= done)
        layer_param_perturb += sums[3, r]
    if view == _LAYER_VIEW:  # the coefficient is the whole parameter's: a second visit applies it
        param_param = 0.0
        for r in range(rows):
            param_param += sums[2, r]
        coefficient = _projection_coefficient(layer_param_perturb, param_param, eps)
        _apply_rows(param, grad, exp_avg, exp_avg_sq, a0, rows * n, coefficient, beta1, eps,
                    sqrt_bias_correction2, nesterov, step_size, d)
    return 1 if view != _NO_PROJECTION else 0


@njit(inline="always", fastmath={"reassoc", "contract", "nsz"})
def _adam_and_sums(param, grad, exp_avg, exp_avg_sq, a, n, q_row, constants):
    """One row's Adam moments and update direction (into ``q_row``) and its four sums: grad.param, grad.grad,
    param.param and param.perturb, in one visit of the four arrays (streamed together, as a fused Adam streams
    them; a loop over param and grad first, then one over the moments, is slower). The sums are float32, as
    torch sums float32 tensors (timm's AdamP): float64 sums take 8 floats a vector instead of 16."""
    gs, ps, ms, vs = grad[a:a + n], param[a:a + n], exp_avg[a:a + n], exp_avg_sq[a:a + n]
    grad_param = grad_grad = param_param = param_perturb = np.float32(0.0)
    for i in range(n):
        g, p = gs[i], ps[i]
        ms[i], vs[i], q = _adam_element(g, ms[i], vs[i], constants)
        q_row[i] = q
        grad_param += g * p
        grad_grad += g * g
        param_param += p * p
        param_perturb += p * q
    return grad_param, grad_grad, param_param, param_perturb


@njit(inline="always", fastmath={"reassoc", "contract", "nsz"})
def _row_sums(grad, param, a, n):
    """A row's grad.param, grad.grad and param.param (float32 sums, as ``_adam_and_sums``)."""
    gs, ps = grad[a:a + n], param[a:a + n]
    grad_param = grad_grad = param_param = np.float32(0.0)
    for i in range(n):
        g, p = gs[i], ps[i]
        grad_param += g * p
        grad_grad += g * g
        param_param += p * p
    return grad_param, grad_grad, param_param


@njit(inline="always")
def _can_take_back(d, lr, c):
    """Whether a row stepped in the channel view, ``p' = p (d + lr c) - lr q``, can be taken back to float32
    precision: ``d + lr c`` (at most 1 - lr wd wd_ratio, and below it where the update direction points back along
    the row) far from 0. Where it is near 0, the row is not stepped ahead of the decision, and the parameter takes
    the deciding path: the take-back would divide rounding errors by it."""
    return abs(d + lr * c) >= np.float32(0.5)


@njit(inline="always")
def _cosine(grad_param, grad_grad, param_param, eps):
    """|cosine| of a row's gradient and parameter, as torch's cosine_similarity (timm's AdamP) computes it."""
    return abs(grad_param) / (max(np.sqrt(grad_grad), eps) * max(np.sqrt(param_param), eps))


@njit(inline="always")
def _decide(sums, rows, n, eps, delta):
    """timm's AdamP: the channel view, else the layer view (|cosine| as torch's cosine_similarity computes it)."""
    max_cosine = 0.0
    for r in range(rows):
        max_cosine = max(max_cosine, _cosine(sums[0, r], sums[1, r], sums[2, r], eps))
    if max_cosine < delta / np.sqrt(n):
        return _CHANNEL_VIEW
    grad_param = grad_grad = param_param = 0.0
    for r in range(rows):
        grad_param += sums[0, r]
        grad_grad += sums[1, r]
        param_param += sums[2, r]
    layer = _cosine(grad_param, grad_grad, param_param, eps) < delta / np.sqrt(n * rows)
    return _LAYER_VIEW if layer else _NO_PROJECTION


@njit(inline="always", fastmath={"reassoc", "contract", "nsz"})
def _adam_row(param, grad, exp_avg, exp_avg_sq, a, n, view, param_param, q_row, beta1, beta2, eps,
              sqrt_bias_correction2, nesterov, step_size, d, moments_done):
    """One row's Adam moments and update direction; returns its param.perturb (0 without a projection, where
    nothing uses it). Without a projection the row is updated in the same loop; with the channel view right
    after it, from the row's update direction kept in ``q_row`` (in the L1 cache); with the layer view later, by
    ``_apply_rows``, once the whole parameter's coefficient is known. ``moments_done``: the moments were updated
    this step already (a row stepped in the channel view, then taken back): the direction comes from them."""
    constants = _adam_constants(beta1, beta2, eps, sqrt_bias_correction2, nesterov)
    lr = np.float32(step_size)
    gs, ps, ms, vs = grad[a:a + n], param[a:a + n], exp_avg[a:a + n], exp_avg_sq[a:a + n]
    if view == _NO_PROJECTION:  # updated in the same loop (its own loop: no store of q, no branch in it)
        if moments_done:
            for i in range(n):
                p = ps[i]
                ps[i] = p * d - lr * _direction(gs[i], ms[i], vs[i], constants)
        else:
            for i in range(n):
                p = ps[i]
                ms[i], vs[i], q = _adam_element(gs[i], ms[i], vs[i], constants)
                ps[i] = p * d - lr * q
        return 0.0
    if moments_done:
        for i in range(n):
            q_row[i] = _direction(gs[i], ms[i], vs[i], constants)
    else:
        for i in range(n):
            ms[i], vs[i], q_row[i] = _adam_element(gs[i], ms[i], vs[i], constants)
    param_perturb = np.float32(0.0)
    for i in range(n):
        param_perturb += ps[i] * q_row[i]
    if view == _CHANNEL_VIEW:
        c = _projection_coefficient(param_perturb, param_param, eps)
        for i in range(n):
            p = ps[i]
            ps[i] = p * d - lr * (q_row[i] - c * p)
    return param_perturb


@njit(inline="always")
def _direction(g, m, v, constants):
    """The update direction from moments already updated (as ``_adam_element`` computes it)."""
    _, _, _, _, e, inv_bc2, nb1, ng = constants
    return (nb1 * m + ng * g) / (np.sqrt(v) * inv_bc2 + e)


@njit(inline="always", fastmath={"contract"})
def _undo_channel_row(param, grad, exp_avg, exp_avg_sq, a, n, c, beta1, eps, sqrt_bias_correction2, nesterov,
                      step_size, d):
    """A row stepped in the channel view back to its value before the step: ``p' = p * (d + lr c) - lr q``
    solved for p, with q from the moments. Exact to float32 rounding (a few units in the last place, against
    timm's AdamP to 1e-6 in the tests), and taken only by a parameter whose row after this one broke the channel
    view: in the benchmark's ResNet-50 step, none (every convolution takes the channel view; the classifier
    breaks it at its first row, 913 of its 1,000 rows being over the bound)."""
    constants = _adam_constants(beta1, 0.0, eps, sqrt_bias_correction2, nesterov)
    lr = np.float32(step_size)
    scale = np.float32(1.0) / (d + lr * c)
    gs, ps, ms, vs = grad[a:a + n], param[a:a + n], exp_avg[a:a + n], exp_avg_sq[a:a + n]
    for i in range(n):
        ps[i] = (ps[i] + lr * _direction(gs[i], ms[i], vs[i], constants)) * scale


@njit(inline="always", fastmath={"contract"})
def _apply_rows(param, grad, exp_avg, exp_avg_sq, a, n, c, beta1, eps, sqrt_bias_correction2, nesterov,
                step_size, d):
    """The layer view's update: the direction recomputed from the moments already updated. Without Nesterov the
    direction is ``exp_avg / denom`` and the gradient is not read: ``0 * g`` cannot be folded away (g might be
    inf), so the loop read a fourth array for nothing (a quarter of this visit's traffic)."""
    _, _, _, _, e, inv_bc2, nb1, ng = _adam_constants(beta1, 0.0, eps, sqrt_bias_correction2, nesterov)
    lr = np.float32(step_size)
    ps, ms, vs = param[a:a + n], exp_avg[a:a + n], exp_avg_sq[a:a + n]
    if nesterov:
        gs = grad[a:a + n]
        for i in range(n):
            p = ps[i]
            q = (nb1 * ms[i] + ng * gs[i]) / (np.sqrt(vs[i]) * inv_bc2 + e)
            ps[i] = p * d - lr * (q - c * p)
    else:
        for i in range(n):
            p = ps[i]
            q = ms[i] / (np.sqrt(vs[i]) * inv_bc2 + e)
            ps[i] = p * d - lr * (q - c * p)


# A whole parameter's step, with as little memory traffic as AdamP allows (``_one_parameter``): in the channel
# view each row is read and written once, as a fused Adam reads four arrays and writes three. Deciding first, in
# a pass of its own over param and grad, would read six arrays.
#
# The parameters run on torch's own threads. numba's thread pool (TBB, or OpenMP from another copy of the
# runtime than torch's) would share the cores with torch's OpenMP workers, which spin for milliseconds after
# every torch operation, and the same work takes about twice as long inside a DeepSpeed step. So the worker
# is a C callback (numba ``cfunc``) that ``GOMP_parallel`` of the OpenMP runtime torch loaded runs on every
# thread of torch's team, as DeepSpeed's fused CPU Adam runs; the threads take parameters one at a time from an
# atomic counter. Each parameter is done by one thread in one fixed order: the result does not depend on the
# number of threads. ``error_model="numpy"``: with Python's, every division checks for zero and the loops do not
# vectorise (4x slower).
_FASTMATH = {"reassoc", "contract", "nsz"}
_BLOCK = 20   # the worker's argument block: addresses and sizes, in the order ``WholeParameters`` packs


@intrinsic
def _pointer(typingctx, address, dtype):
    pointer = types.CPointer(dtype.instance_type)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))
    return pointer(types.int64, dtype), codegen


@intrinsic
def _address(typingctx, pointer):
    def codegen(context, builder, signature, args):
        return builder.ptrtoint(args[0], ir.IntType(64))
    return types.int64(types.voidptr), codegen


@intrinsic
def _atomic_add(typingctx, address, value):
    """Atomically: ``counter += value``, returning the value before (with 1: each thread's next unit)."""
    def codegen(context, builder, signature, args):
        counter = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", counter, args[1], "monotonic")
    return types.int64(types.int64, types.int64), codegen


def _whole_parameters_worker(data):
    """The C callback each thread runs (compiled by ``_worker_address`` on first use, not at import)."""
    block = carray(_pointer(_address(data), np.int64), _BLOCK)
    n, units = block[1], block[6]
    param = carray(_pointer(block[2], np.float32), n)
    grad = carray(_pointer(block[3], np.float32), n)
    exp_avg = carray(_pointer(block[4], np.float32), n)
    exp_avg_sq = carray(_pointer(block[5], np.float32), n)
    first = carray(_pointer(block[7], np.int64), units)
    rows = carray(_pointer(block[8], np.int64), units)
    row_size = carray(_pointer(block[9], np.int64), units)
    projects = carray(_pointer(block[10], np.uint8), units)
    order = carray(_pointer(block[11], np.int64), units)
    s = carray(_pointer(block[13], np.float64), 9)
    threads, max_rows, max_row_size = block[15], block[16], block[17]
    slot = _atomic_add(block[14], 1)  # this thread's scratch
    if slot >= threads:
        return
    sums = carray(_pointer(block[18], np.float64), (threads, 4, max_rows))[slot]
    q_row = carray(_pointer(block[19], np.float32), (threads, max_row_size))[slot]
    while True:
        k = _atomic_add(block[0], 1)
        if k >= units:
            break
        u = order[k]
        if _one_parameter(param, grad, exp_avg, exp_avg_sq, first[u], rows[u], row_size[u], projects[u] != 0, sums,
                          q_row, s[0], s[1], s[2], s[3], s[4] != 0.0, s[5], s[6], np.float32(s[7]),
                          np.float32(s[8])):
            _atomic_add(block[12], 1)  # the projected count (read once the team is done)


class WholeParameters:
    """The step of every whole parameter of one tensor's layout (``units``) on ``threads`` of torch's threads.

    Built once per layout and thread count: the tables, the per-thread scratch and the worker's argument block
    live here, so that a step allocates nothing (a new 128 KiB scratch a step would come from ``mmap`` and be
    faulted in again by the threads)."""

    def __init__(self, units: Units, threads: int):
        self.threads = max(1, int(threads))
        self.order = largest_first(units)
        self.tables = [np.ascontiguousarray(a, dtype=np.int64) for a in (units.first, units.rows, units.row_size)]
        self.projects = np.ascontiguousarray(units.projects, dtype=np.uint8)
        self.scalars = np.zeros(9, dtype=np.float64)
        self.counters = np.zeros(3, dtype=np.int64)   # the next unit to take; the next scratch slot; projected
        max_rows, max_row_size = int(max(units.rows.max(initial=1), 1)), int(max(units.row_size.max(initial=1), 1))
        self.sums = np.empty((self.threads, 4, max_rows), dtype=np.float64)
        self.q_row = np.empty((self.threads, max_row_size), dtype=np.float32)
        self.block = np.array([self.counters.ctypes.data, 0, 0, 0, 0, 0, len(self.order)] +
                              [t.ctypes.data for t in self.tables] +
                              [self.projects.ctypes.data, self.order.ctypes.data, self.counters.ctypes.data + 16,
                               self.scalars.ctypes.data, self.counters.ctypes.data + 8, self.threads, max_rows,
                               max_row_size, self.sums.ctypes.data, self.q_row.ctypes.data], dtype=np.int64)
        assert self.block.size == _BLOCK

    def step(self, numel, param, grad, exp_avg, exp_avg_sq, beta1, beta2, eps, sqrt_bias_correction2, nesterov,
             delta, step_size, decay, decay_projected) -> int:
        """One step of every unit on four contiguous float32 buffers of ``numel`` elements, given by their addresses
        (the caller checks them); returns how many units were projected. Addresses, not numpy views: in a
        DeepSpeed step this Python runs right after ZeRO's passes over hundreds of MB, with the caches cold, and
        every array made and call taken costs microseconds (``benchmarks/RESULTS.md``)."""
        block = self.block
        block[1], block[2], block[3], block[4], block[5] = numel, param, grad, exp_avg, exp_avg_sq
        self.scalars[:] = (beta1, beta2, eps, sqrt_bias_correction2, float(nesterov), delta, step_size, decay,
                           decay_projected)
        self.counters[:] = 0
        run_on_torch_threads(_worker_address(), block.ctypes.data, self.threads)
        return int(self.counters[2])


_COMPILED = {}   # the worker's compiled code lives as long as this module


def _worker_address() -> int:
    if "worker" not in _COMPILED:
        _COMPILED["worker"] = cfunc(types.void(types.voidptr), cache=True, error_model="numpy",
                                    fastmath=_FASTMATH)(_whole_parameters_worker)
    return _COMPILED["worker"].address


def run_on_torch_threads(worker_address: int, data_address: int, threads: int) -> None:
    """Call the C function ``worker(data)`` once on each of ``threads`` threads of torch's OpenMP team and
    return when all are done. Where torch's runtime cannot be found (a build without OpenMP), Python threads
    call it instead (ctypes releases the GIL)."""
    parallel = _openmp_parallel()
    if threads <= 1:
        _as_ctypes(worker_address)(data_address)
    elif parallel is not None:
        parallel(worker_address, data_address, threads, 0)
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(threads - 1) as pool:
            helpers = [pool.submit(_as_ctypes(worker_address), data_address) for _ in range(threads - 1)]
            _as_ctypes(worker_address)(data_address)
            for helper in helpers:
                helper.result()


@functools.lru_cache(maxsize=None)
def _as_ctypes(address: int):
    return ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address)


@functools.lru_cache(maxsize=1)
def _openmp_parallel():
    """``GOMP_parallel`` of the OpenMP runtime torch's own operations run on (torch's bundled libgomp in pip
    wheels; Intel's runtime exports it too), or None."""
    import torch
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    candidates = sorted(glob.glob(os.path.join(torch_lib, "libgomp*.so*")) +
                        glob.glob(os.path.join(torch_lib, "libiomp*.so*")))
    for library in [*candidates, None]:  # None: the global scope, where torch loaded its runtime
        try:
            function = ctypes.CDLL(library).GOMP_parallel
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        function.restype = None
        return function
    return None
