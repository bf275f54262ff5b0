"""ZeroAdamP's step on the CPU as two fused numba passes over a flat tensor, instead of some twenty torch passes.

A flat tensor (a ZeRO partition, or a whole parameter) is cut into segments: each channel ("row") of a
projected parameter that lies in the tensor is one contiguous segment, and every run of other elements (1-D
parameters, padding) is a segment of the extra row ``num_rows``. Both passes run over the segments in parallel
(``prange``): a row is one segment in a tensor, so its sums are written by one thread, in element order, with no
atomics: the result does not depend on the number of threads.

1. ``adam_and_row_sums``: Adam's moments as timm updates them, the update direction (``perturb``), and the four
   sums of every row (grad.param, grad.grad, param.param, param.perturb), accumulated in float64.
2. ``apply_update``: ``perturb -= coefficient[row] * param``; ``param *= decay[row]``; ``param -= step * perturb``.

Between them the scheduler of the step (``autowu.adamp``) completes the sums over the ranks and decides the
projection on the small per-row tensors, as on a GPU.
"""
from __future__ import annotations

import math
from typing import Tuple

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
