"""ZeroAdamP's step on the CPU: fused numba passes over a flat tensor, instead of some twenty torch passes.

A flat tensor (a ZeRO partition, or a whole parameter) holds whole parameters and, at its ends, parts of
parameters that a partition boundary cuts. A whole parameter's AdamP decision needs only its own elements and
only grad.param, grad.grad and param.param of each channel ("row"), so ``adamp_whole_parameters`` reads param
and grad once to decide, then gives each row Adam's moments, its update direction and its param.perturb sum
and updates it while it is in the L1 cache (a layer-view projection, whose coefficient is the whole
parameter's, visits it once more). Parameters are dealt to threads by size (``balanced_bins``), each done by one
thread in one fixed order: the result does not depend on the number of threads.

The rows of cut parameters (``Segments``: at most one parameter at each end of a ZeRO partition) take two
passes around the all-reduce that completes their sums over the ranks:

1. ``adam_and_row_sums``: Adam's moments as timm updates them, the update direction (``perturb``), and the four
   sums of every row (grad.param, grad.grad, param.param, param.perturb), accumulated in float64.
2. ``apply_update``: ``perturb -= coefficient[row] * param``; ``param *= decay[row]``; ``param -= step * perturb``.

Between them ``autowu.adamp`` decides the projection on the small per-row tensors, as on a GPU. Elements of 1-D
parameters and padding form runs of their own ("other" rows: Adam and plain weight decay).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import numpy as np
from numba import njit, prange


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


# The inner loops run over slices from 0: so written, LLVM vectorises them (an inner loop over ``range(a, b)`` of
# the whole arrays ran 3-6x slower). Reassociation (restricted fastmath) lets it vectorise the sums; each row
# is still summed by one thread in one fixed order, so the result does not depend on the number of threads.
@njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
def adam_and_row_sums(param, grad, exp_avg, exp_avg_sq, perturb, first, length, row, sums,
                      beta1, beta2, eps, sqrt_bias_correction2, nesterov, num_rows):
    # float32 constants and arithmetic, as torch computes on float32 tensors; the sums in float64.
    b1, b2 = np.float32(beta1), np.float32(beta2)
    c1, c2 = np.float32(1.0 - beta1), np.float32(1.0 - beta2)
    e, bc2 = np.float32(eps), np.float32(sqrt_bias_correction2)
    nb1 = np.float32(beta1) if nesterov else np.float32(1.0)   # perturb = (nb1 * m + ng * g) / denom
    ng = np.float32(1.0 - beta1) if nesterov else np.float32(0.0)
    for s in prange(first.shape[0]):
        a, n, r = first[s], length[s], row[s]
        gs, ps, ms = grad[a:a + n], param[a:a + n], exp_avg[a:a + n]
        vs, qs = exp_avg_sq[a:a + n], perturb[a:a + n]
        grad_param = grad_grad = param_param = param_perturb = 0.0
        for i in range(n):
            g, p = gs[i], ps[i]
            m = ms[i] * b1 + g * c1
            v = vs[i] * b2 + g * g * c2
            ms[i] = m
            vs[i] = v
            q = (nb1 * m + ng * g) / (np.sqrt(v) / bc2 + e)
            qs[i] = q
            grad_param += np.float64(g * p)
            grad_grad += np.float64(g * g)
            param_param += np.float64(p * p)
            param_perturb += np.float64(p * q)
        if r < num_rows:
            sums[0, r] = grad_param
            sums[1, r] = grad_grad
            sums[2, r] = param_param
            sums[3, r] = param_perturb


@njit(parallel=True, cache=True, fastmath={"contract"})
def apply_update(param, perturb, first, length, row, coefficient, decay, step_size):
    for s in prange(first.shape[0]):
        a, n, r = first[s], length[s], row[s]
        c, d, lr = np.float32(coefficient[r]), np.float32(decay[r]), np.float32(step_size)
        ps, qs = param[a:a + n], perturb[a:a + n]
        for i in range(n):
            p = ps[i]
            ps[i] = p * d - lr * (qs[i] - c * p)


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
            Segments(first[shared].copy(), length[shared].copy(), row[shared].copy()))


def balanced_bins(unit_sizes: np.ndarray, num_threads: int) -> Tuple[np.ndarray, np.ndarray]:
    """Units dealt to ``num_threads`` bins of nearly equal elements (largest first, each to the emptiest bin):
    (the units in bin order, each bin's first index into it, plus the end). numba's ``prange`` would hand each
    thread an equal count of units, and ResNet-50's last stage alone holds most of its elements."""
    load = np.zeros(num_threads)
    bins = [[] for _ in range(num_threads)]
    for u in np.argsort(-unit_sizes, kind="stable"):
        t = int(np.argmin(load))
        bins[t].append(u)
        load[t] += unit_sizes[u]
    order = np.asarray([u for b in bins for u in sorted(b)], dtype=np.int64)
    bin_start = np.cumsum([0] + [len(b) for b in bins]).astype(np.int64)
    return order, bin_start


# A whole parameter's step, with as little memory traffic as AdamP allows: its decision (channel view, else layer
# view) depends only on grad.param, grad.grad and param.param, so a first read of the parameter and its gradient
# decides it; then each channel ("row") in turn gets Adam's moments, its update direction and its param.perturb
# sum, and is updated while it is still in the L1 cache. Only a layer-view projection, whose coefficient needs
# the whole parameter's param.perturb, visits the parameter a third time. A fused Adam reads four arrays and
# writes three; this reads six and writes three (two more reads: the deciding pass).
# Each parameter is done by one thread in one fixed order: the result does not depend on the number of threads.
@njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
def adamp_whole_parameters(param, grad, exp_avg, exp_avg_sq, unit_first, unit_rows, unit_row_size, unit_projects,
                           unit_row0, order, bin_start, sums, beta1, beta2, eps, sqrt_bias_correction2, nesterov,
                           delta, step_size, decay, decay_projected, projected):
    """``sums`` (4 x rows + 1, the step's reduced buffer) gets each whole parameter's channel sums too, so that
    the count of projected parameters over the ranks stays one all-reduce; ``projected[u]``: 1 if unit u was."""
    for t in prange(bin_start.shape[0] - 1):
        for k in range(bin_start[t], bin_start[t + 1]):
            u = order[k]
            projected[u] = _one_parameter(
                param, grad, exp_avg, exp_avg_sq, unit_first[u], unit_rows[u], unit_row_size[u], unit_projects[u],
                unit_row0[u], sums, beta1, beta2, eps, sqrt_bias_correction2, nesterov, delta, step_size, decay,
                decay_projected)


_NO_PROJECTION, _CHANNEL_VIEW, _LAYER_VIEW = 0, 1, 2


@njit(inline="always", fastmath={"reassoc", "contract", "nsz"})
def _one_parameter(param, grad, exp_avg, exp_avg_sq, a0, rows, n, projects, row0, reduced, beta1, beta2, eps,
                   sqrt_bias_correction2, nesterov, delta, step_size, decay, decay_projected):
    sums = np.zeros((4, rows))
    view = _NO_PROJECTION
    if projects:
        for r in range(rows):
            a = a0 + r * n
            gs, ps = grad[a:a + n], param[a:a + n]
            grad_param = grad_grad = param_param = 0.0
            for i in range(n):
                g, p = gs[i], ps[i]
                grad_param += np.float64(g * p)
                grad_grad += np.float64(g * g)
                param_param += np.float64(p * p)
            sums[0, r], sums[1, r], sums[2, r] = grad_param, grad_grad, param_param
        view = _decide(sums, rows, n, eps, delta)
    d = np.float32(decay_projected if view != _NO_PROJECTION else decay)
    layer_param_perturb = 0.0
    q_row = np.empty(n if view == _CHANNEL_VIEW else 0, dtype=np.float32)
    for r in range(rows):
        sums[3, r] = _adam_row(param, grad, exp_avg, exp_avg_sq, a0 + r * n, n, view, sums[2, r], q_row, beta1,
                               beta2, eps, sqrt_bias_correction2, nesterov, step_size, d)
        layer_param_perturb += sums[3, r]
    if view == _LAYER_VIEW:  # the coefficient is the whole parameter's: a second visit applies it
        param_param = 0.0
        for r in range(rows):
            param_param += sums[2, r]
        coefficient = np.float32(layer_param_perturb / (np.sqrt(param_param) + eps) ** 2)
        _apply_rows(param, grad, exp_avg, exp_avg_sq, a0, rows * n, coefficient, beta1, eps,
                    sqrt_bias_correction2, nesterov, step_size, d)
    if projects:
        for r in range(rows):
            for j in range(4):
                reduced[j, row0 + r] = sums[j, r]
    return 1 if view != _NO_PROJECTION else 0


@njit(inline="always")
def _decide(sums, rows, n, eps, delta):
    """timm's AdamP: the channel view, else the layer view (|cosine| as torch's cosine_similarity computes it)."""
    max_cosine = 0.0
    for r in range(rows):
        cosine = abs(sums[0, r]) / (max(np.sqrt(sums[1, r]), eps) * max(np.sqrt(sums[2, r]), eps))
        max_cosine = max(max_cosine, cosine)
    if max_cosine < delta / np.sqrt(n):
        return _CHANNEL_VIEW
    layer = np.zeros(3)
    for r in range(rows):
        for j in range(3):
            layer[j] += sums[j, r]
    cosine = abs(layer[0]) / (max(np.sqrt(layer[1]), eps) * max(np.sqrt(layer[2]), eps))
    return _LAYER_VIEW if cosine < delta / np.sqrt(n * rows) else _NO_PROJECTION


@njit(inline="always", fastmath={"reassoc", "contract", "nsz"})
def _adam_row(param, grad, exp_avg, exp_avg_sq, a, n, view, param_param, q_row, beta1, beta2, eps,
              sqrt_bias_correction2, nesterov, step_size, d):
    """One row's Adam moments and update direction; returns its param.perturb. Without a projection (or with the
    layer view, applied afterwards) the row is updated in the same loop; with the channel view after it, from
    the row's update direction kept in ``q_row`` (in the L1 cache)."""
    b1, b2 = np.float32(beta1), np.float32(beta2)
    c1, c2 = np.float32(1.0 - beta1), np.float32(1.0 - beta2)
    e, bc2 = np.float32(eps), np.float32(sqrt_bias_correction2)
    nb1 = np.float32(beta1) if nesterov else np.float32(1.0)
    ng = np.float32(1.0 - beta1) if nesterov else np.float32(0.0)
    lr = np.float32(step_size)
    gs, ps, ms, vs = grad[a:a + n], param[a:a + n], exp_avg[a:a + n], exp_avg_sq[a:a + n]
    param_perturb = 0.0
    if view == _NO_PROJECTION:
        for i in range(n):
            g, p = gs[i], ps[i]
            m = ms[i] * b1 + g * c1
            v = vs[i] * b2 + g * g * c2
            ms[i] = m
            vs[i] = v
            q = (nb1 * m + ng * g) / (np.sqrt(v) / bc2 + e)
            param_perturb += np.float64(p * q)
            ps[i] = p * d - lr * q
        return param_perturb
    for i in range(n):
        g, p = gs[i], ps[i]
        m = ms[i] * b1 + g * c1
        v = vs[i] * b2 + g * g * c2
        ms[i] = m
        vs[i] = v
        q = (nb1 * m + ng * g) / (np.sqrt(v) / bc2 + e)
        param_perturb += np.float64(p * q)
        if view == _CHANNEL_VIEW:
            q_row[i] = q
    if view == _CHANNEL_VIEW:
        c = np.float32(param_perturb / (np.sqrt(param_param) + eps) ** 2)
        for i in range(n):
            p = ps[i]
            ps[i] = p * d - lr * (q_row[i] - c * p)
    return param_perturb


@njit(inline="always", fastmath={"contract"})
def _apply_rows(param, grad, exp_avg, exp_avg_sq, a, n, c, beta1, eps, sqrt_bias_correction2, nesterov,
                step_size, d):
    """The layer view's update: the direction recomputed from the moments already updated."""
    e, bc2 = np.float32(eps), np.float32(sqrt_bias_correction2)
    nb1 = np.float32(beta1) if nesterov else np.float32(1.0)
    ng = np.float32(1.0 - beta1) if nesterov else np.float32(0.0)
    lr = np.float32(step_size)
    gs, ps, ms, vs = grad[a:a + n], param[a:a + n], exp_avg[a:a + n], exp_avg_sq[a:a + n]
    for i in range(n):
        p = ps[i]
        q = (nb1 * ms[i] + ng * gs[i]) / (np.sqrt(vs[i]) / bc2 + e)
        ps[i] = p * d - lr * (q - c * p)
