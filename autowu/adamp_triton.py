"""ZeroAdamP's step on a GPU: Triton kernels over a flat tensor, instead of some twenty torch operations.

The torch path (``autowu.adamp``) reads and writes the flat partition some twenty times a step: Adam's moments
in five operations, each of the four channel sums as a product and a segmented reduction, the projection and
the update in four more. A fused Adam reads param, grad and the two moments once and writes three of them. This
path does what the CPU path does (``autowu.adamp_cpu``), with GPU programs in place of threads:

1. ``_rows_kernel``: one program a tile, a tile being a channel ("row") of a projected parameter, or a piece of
   at most ``MAX_TILE`` elements of a run of other elements (1-D parameters, padding). It loads the tile once,
   updates Adam's moments, and
   - for other elements, updates the parameter (Adam with plain weight decay): done;
   - for a row, computes its four sums (grad.param, grad.grad, param.param, param.perturb, float32, in a fixed
     tree order: no atomics) into the step's sums buffer, and, if the row is wholly in this tensor and its own
     cosine is under the channel bound, steps it in the channel view at once ("ahead"). The channel view holds
     when every row of a parameter passes, and then each row needs only its own sums: a parameter that takes
     it (every convolution of a real ResNet-50 step) is read and written once, as a fused Adam does.
   Rows longer than the largest tile (``MAX_TILE``; none in ResNet-50, whose longest rows hold 4,608 elements,
   or EfficientNet-B0) take ``_long_rows_kernel``, one program a row looping over it: sums and moments, then,
   where the row may step ahead, a second loop over it (from the L2 cache, where the first left it).
2. The sums of rows cut by a ZeRO partition boundary are completed by the caller's all-reduce (the rows wholly
   on this rank get zeros from the others: their sums are unchanged, bit for bit).
3. ``_decide_kernel``: one program a parameter; timm's decision (channel view, else layer view, else none) from
   its rows' sums, and each row's coefficient of ``perturb -= c * param``.
4. ``_finish_kernel``: one program a row; nothing to do for a row stepped ahead whose parameter took the channel
   view. A row not stepped is updated in the view taken (its direction recomputed from the moments already
   updated); a row stepped where its parameter did not take the channel view is first taken back
   (``p' = p (d + lr c) - lr q`` solved for p, as the CPU path does), which only a row that could be taken back
   to float32 precision was allowed to be (``|d + lr c| >= 0.5``).

Seven to twelve launches a step (``_rows_kernel`` once a tile size class and alignment), no host synchronisation, no atomics (the
sums are each program's own fixed-order reductions): the same bits on every run. Checked against timm's AdamP
and the numba path under Triton's interpreter on the CPU (``tests/interpreted/``), compiled for sm_90 here
(``tests/test_adamp_triton.py``), and on a GPU by ``tests/test_gpu.py`` (``scripts/gpu_check.sh``).
Registers (ptxas for sm_90, Triton 3.8, aligned tiles): the 8,192-element tile class on 16 warps uses 128
registers a thread and spills 60 bytes; the 4,096 class 89 registers, no spill. ``bench_adamp.py flat`` times
both layouts on a GPU.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, NamedTuple, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from .adamp_cpu import segments_of

MAX_TILE = 8192            # elements a program holds in registers (the largest tile class)
FINISH_BLOCK = 1024        # elements a program of the finish and long-row kernels takes at a time
DECIDE_BLOCK = 1024        # rows the decision takes at a time
# Tile size classes, one launch each: a tile goes to the smallest class that holds it. Fewer classes mean fewer
# launches; more mean less of each program masked off. ResNet-50's 3x3 rows (9 x 2^k elements) fill 56% of
# theirs whatever the classes; EfficientNet-B0's depthwise rows hold 9 or 25 elements (the 64 class).
TILE_CLASSES = (64, 256, 1024, 4096, MAX_TILE)

# The numbers the kernels compare with (as literals: a Triton kernel reads no Python globals but constexprs).
_OTHER, _ROW, _ROW_AHEAD = 0, 1, 2                 # what a tile holds
_NO_PROJECTION, _CHANNEL_VIEW, _LAYER_VIEW = 0, 1, 2   # a parameter's view (autowu.adamp_cpu's numbering)


@triton.jit
def _direction(g, m, v, eps, inv_bc2, nb1, ng):
    """The update direction from updated moments, ``(nb1 m + ng g) / (sqrt(v) / sqrt(bc2) + eps)``, correctly
    rounded (Triton's default ``/`` and ``sqrt`` are approximate)."""
    return tl.div_rn(nb1 * m + ng * g, tl.sqrt_rn(v) * inv_bc2 + eps)


@triton.jit
def _coefficient(param_perturb, param_param, eps):
    """AdamP's ``c`` of ``perturb -= c * param``: ``(p . q) / (||p|| + eps)^2``."""
    norm = tl.sqrt_rn(param_param) + eps
    return tl.div_rn(param_perturb, norm * norm)


@triton.jit
def _cosine(grad_param, grad_grad, param_param, eps):
    """|cosine| of gradient and parameter, as torch's cosine_similarity (timm's AdamP) computes it."""
    return tl.div_rn(tl.abs(grad_param),
                     tl.maximum(tl.sqrt_rn(grad_grad), eps) * tl.maximum(tl.sqrt_rn(param_param), eps))


@triton.jit
def _may_step_ahead(grad_param, grad_grad, param_param, c, bound, eps, step_size, decay_projected):
    """Whether a whole row is stepped in the channel view before the decision: its own cosine is under the bound,
    and the step can be taken back to float32 precision (``|d + lr c| >= 0.5``: the take-back divides by it)."""
    cosine = _cosine(grad_param, grad_grad, param_param, eps)
    return (cosine < bound) & (tl.abs(decay_projected + step_size * c) >= 0.5)


@triton.jit
def _param_and_direction(param, grad, exp_avg, exp_avg_sq, at, mask, eps, inv_bc2, nb1, ng,
                         NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    """A block's parameter and its update direction from the moments already updated (the gradient is read only
    with Nesterov: ``0 * g`` cannot be folded away, g might be inf)."""
    p = tl.load(param + at, mask=mask, other=0.0)
    m = tl.load(exp_avg + at, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq + at, mask=mask, other=0.0)
    if NESTEROV:
        g = tl.load(grad + at, mask=mask, other=0.0)
    else:
        g = tl.zeros([BLOCK], dtype=tl.float32)
    return p, _direction(g, m, v, eps, inv_bc2, nb1, ng)


@triton.jit
def _rows_kernel(param, grad, exp_avg, exp_avg_sq, tiles, tile_first, tile_length, tile_kind, tile_row,
                 tile_segment, row_bound, sums, sums_stride, stepped, ahead_coefficient,
                 b1, b2, c1, c2, eps, inv_bc2, nb1, ng, step_size, decay, decay_projected,
                 ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.load(tiles + tl.program_id(0))
    first = tl.load(tile_first + t)
    n = tl.load(tile_length + t)
    if ALIGNED:   # tiles whose first element and length are multiples of 4: 16-byte vector loads and stores
        first = tl.multiple_of(first, 4)
        n = tl.multiple_of(n, 4)
    kind = tl.load(tile_kind + t)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    p = tl.load(param + first + offsets, mask=mask, other=0.0)
    g = tl.load(grad + first + offsets, mask=mask, other=0.0)
    m = tl.load(exp_avg + first + offsets, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq + first + offsets, mask=mask, other=0.0)
    m = m * b1 + g * c1
    v = v * b2 + g * g * c2
    q = _direction(g, m, v, eps, inv_bc2, nb1, ng)
    tl.store(exp_avg + first + offsets, m, mask=mask)
    tl.store(exp_avg_sq + first + offsets, v, mask=mask)
    if kind == 0:   # other elements: Adam with plain weight decay
        tl.store(param + first + offsets, p * decay - step_size * q, mask=mask)
    else:
        r = tl.load(tile_row + t)
        grad_param = tl.sum(g * p, axis=0)
        grad_grad = tl.sum(g * g, axis=0)
        param_param = tl.sum(p * p, axis=0)
        param_perturb = tl.sum(p * q, axis=0)
        tl.store(sums + r, grad_param)
        tl.store(sums + sums_stride + r, grad_grad)
        tl.store(sums + 2 * sums_stride + r, param_param)
        tl.store(sums + 3 * sums_stride + r, param_perturb)
        s = tl.load(tile_segment + t)
        ahead = 0
        if kind == 2:   # a whole row: stepped in the channel view now if its own sums allow it
            c = _coefficient(param_perturb, param_param, eps)
            if _may_step_ahead(grad_param, grad_grad, param_param, c, tl.load(row_bound + r), eps, step_size,
                               decay_projected):
                tl.store(param + first + offsets, p * decay_projected - step_size * (q - c * p), mask=mask)
                tl.store(ahead_coefficient + s, c)   # its take-back, if any, divides by exactly this
                ahead = 1
        tl.store(stepped + s, ahead)


@triton.jit
def _long_rows_kernel(param, grad, exp_avg, exp_avg_sq, long_segments, long_whole, segment_first, segment_length,
                      segment_row, row_bound, sums, sums_stride, stepped, ahead_coefficient, b1, b2, c1, c2, eps,
                      inv_bc2, nb1, ng, step_size, decay_projected, NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    """A row longer than a tile, one program looping over it: moments and sums; then, if it is whole here and its
    own sums allow, stepped ahead in the channel view by a second loop (its elements read again, from the L2
    cache where the first loop left them)."""
    i = tl.program_id(0)
    s = tl.load(long_segments + i)
    first = tl.load(segment_first + s)
    n = tl.load(segment_length + s)
    offsets = tl.arange(0, BLOCK)
    acc_gp = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gg = tl.zeros([BLOCK], dtype=tl.float32)
    acc_pp = tl.zeros([BLOCK], dtype=tl.float32)
    acc_pq = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        mask = start + offsets < n
        at = first + start + offsets
        p = tl.load(param + at, mask=mask, other=0.0)
        g = tl.load(grad + at, mask=mask, other=0.0)
        m = tl.load(exp_avg + at, mask=mask, other=0.0) * b1 + g * c1
        v = tl.load(exp_avg_sq + at, mask=mask, other=0.0) * b2 + g * g * c2
        tl.store(exp_avg + at, m, mask=mask)
        tl.store(exp_avg_sq + at, v, mask=mask)
        acc_gp += g * p
        acc_gg += g * g
        acc_pp += p * p
        acc_pq += p * _direction(g, m, v, eps, inv_bc2, nb1, ng)
    r = tl.load(segment_row + s)
    grad_param = tl.sum(acc_gp, axis=0)
    grad_grad = tl.sum(acc_gg, axis=0)
    param_param = tl.sum(acc_pp, axis=0)
    param_perturb = tl.sum(acc_pq, axis=0)
    tl.store(sums + r, grad_param)
    tl.store(sums + sums_stride + r, grad_grad)
    tl.store(sums + 2 * sums_stride + r, param_param)
    tl.store(sums + 3 * sums_stride + r, param_perturb)
    ahead = 0
    if tl.load(long_whole + i) != 0:
        c = _coefficient(param_perturb, param_param, eps)
        if _may_step_ahead(grad_param, grad_grad, param_param, c, tl.load(row_bound + r), eps, step_size,
                           decay_projected):
            for start in range(0, n, BLOCK):
                mask = start + offsets < n
                at = first + start + offsets
                p, q = _param_and_direction(param, grad, exp_avg, exp_avg_sq, at, mask, eps, inv_bc2, nb1, ng,
                                            NESTEROV, BLOCK)
                tl.store(param + at, p * decay_projected - step_size * (q - c * p), mask=mask)
            tl.store(ahead_coefficient + s, c)
            ahead = 1
    tl.store(stepped + s, ahead)


@triton.jit
def _decide_kernel(sums, sums_stride, param_row0, param_rows, param_channel_bound, param_layer_bound, views,
                   coefficient, projected, eps, BLOCK: tl.constexpr):
    """One parameter: timm's AdamP decision from its rows' complete sums; per row its view and coefficient."""
    k = tl.program_id(0)
    row0 = tl.load(param_row0 + k)
    rows = tl.load(param_rows + k)
    offsets = tl.arange(0, BLOCK)
    max_cosine = 0.0
    grad_param = 0.0
    grad_grad = 0.0
    param_param = 0.0
    param_perturb = 0.0
    for start in range(0, rows, BLOCK):
        mask = start + offsets < rows
        at = row0 + start + offsets
        gp = tl.load(sums + at, mask=mask, other=0.0)
        gg = tl.load(sums + sums_stride + at, mask=mask, other=0.0)
        pp = tl.load(sums + 2 * sums_stride + at, mask=mask, other=0.0)
        pq = tl.load(sums + 3 * sums_stride + at, mask=mask, other=0.0)
        max_cosine = tl.maximum(max_cosine, tl.max(tl.where(mask, _cosine(gp, gg, pp, eps), 0.0), axis=0))
        grad_param += tl.sum(gp, axis=0)
        grad_grad += tl.sum(gg, axis=0)
        param_param += tl.sum(pp, axis=0)
        param_perturb += tl.sum(pq, axis=0)
    view = 0
    if max_cosine < tl.load(param_channel_bound + k):
        view = 1
    elif _cosine(grad_param, grad_grad, param_param, eps) < tl.load(param_layer_bound + k):
        view = 2
    layer_coefficient = _coefficient(param_perturb, param_param, eps)
    for start in range(0, rows, BLOCK):
        mask = start + offsets < rows
        at = row0 + start + offsets
        pp = tl.load(sums + 2 * sums_stride + at, mask=mask, other=1.0)
        pq = tl.load(sums + 3 * sums_stride + at, mask=mask, other=0.0)
        c = tl.where(view == 1, _coefficient(pq, pp, eps), tl.where(view == 2, layer_coefficient, 0.0))
        tl.store(coefficient + at, c, mask=mask)
        tl.store(views + at, tl.zeros([BLOCK], dtype=tl.int32) + view, mask=mask)
    tl.store(projected + k, (view != 0).to(tl.int32))


@triton.jit
def _finish_kernel(param, grad, exp_avg, exp_avg_sq, segment_first, segment_length, segment_row, stepped,
                   ahead_coefficient, views, coefficient, eps, inv_bc2, nb1, ng, step_size, decay, decay_projected,
                   NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    """One row: its update in the view its parameter took, unless it was stepped ahead in that view already."""
    s = tl.program_id(0)
    r = tl.load(segment_row + s)
    view = tl.load(views + r)
    was_stepped = tl.load(stepped + s)
    if (was_stepped == 0) | (view != 1):
        first = tl.load(segment_first + s)
        n = tl.load(segment_length + s)
        c = tl.load(coefficient + r)
        d = tl.where(view != 0, decay_projected, decay)
        # a row stepped in the channel view goes back first: p = (p' + lr q) / (d_channel + lr c_ahead)
        scale = tl.full([], 1.0, tl.float32)
        if was_stepped != 0:
            scale = tl.div_rn(scale, decay_projected + step_size * tl.load(ahead_coefficient + s))
        offsets = tl.arange(0, BLOCK)
        for start in range(0, n, BLOCK):
            mask = start + offsets < n
            at = first + start + offsets
            p, q = _param_and_direction(param, grad, exp_avg, exp_avg_sq, at, mask, eps, inv_bc2, nb1, ng, NESTEROV,
                                        BLOCK)
            if was_stepped != 0:
                p = (p + step_size * q) * scale
            tl.store(param + at, p * d - step_size * (q - c * p), mask=mask)


class _Tiles(NamedTuple):
    block: int
    aligned: bool           # every tile's first element and length are multiples of 4
    ids: torch.Tensor       # the tiles of this class


class TritonPlan:
    """One flat tensor's layout as the kernels read it (built once per layout and device): its tiles by size
    class, its projected segments (a row's part in this tensor), its parameters, and the step's scratch."""

    def __init__(self, shapes, offsets, start: int, numel: int, device: torch.device,
                 tile_classes: Tuple[int, ...] = TILE_CLASSES):
        first, length, row, num_rows = segments_of(shapes, offsets, start, numel)
        max_tile = max(tile_classes)
        end = start + numel
        self.num_rows = num_rows
        row_size = np.zeros(num_rows + 1, dtype=np.int64)
        params = []   # (first row, rows, channel bound, layer bound, counted here) of parameters in this tensor
        r = 0
        for shape, offset in zip(shapes, offsets):
            if len(shape) < 2:
                continue
            size = math.prod(shape)
            rows, size_of_row = shape[0], size // shape[0]
            row_size[r:r + rows] = size_of_row
            if offset < end and offset + size > start:
                params.append((r, rows, size_of_row, size, start <= offset))
            r += rows
        projected_segment = row < num_rows
        self.segments = int(projected_segment.sum())
        seg_first, seg_length, seg_row = first[projected_segment], length[projected_segment], row[projected_segment]
        # Tiles: every projected segment of at most ``max_tile`` elements is one (ahead if it is its whole row);
        # runs of other elements are cut into tiles of at most ``max_tile``; longer rows go to the long-row kernel.
        tiles = []   # (first, length, kind, row, projected segment)
        long_segments, long_whole = [], []
        s = 0
        for a, n, rr in zip(first.tolist(), length.tolist(), row.tolist()):
            if rr == num_rows:
                for piece in range(a, a + n, max_tile):
                    tiles.append((piece, min(max_tile, a + n - piece), _OTHER, num_rows, -1))
                continue
            if n <= max_tile:
                tiles.append((a, n, _ROW_AHEAD if n == row_size[rr] else _ROW, rr, s))
            else:
                long_segments.append(s)
                long_whole.append(int(n == row_size[rr]))
            s += 1
        table = np.asarray(tiles, dtype=np.int64).reshape(-1, 5)
        to = dict(device=device)
        self.tile_first = torch.from_numpy(table[:, 0].copy()).to(**to)
        self.tile_length = torch.from_numpy(table[:, 1].astype(np.int32)).to(**to)
        self.tile_kind = torch.from_numpy(table[:, 2].astype(np.int32)).to(**to)
        self.tile_row = torch.from_numpy(table[:, 3].astype(np.int32)).to(**to)
        self.tile_segment = torch.from_numpy(table[:, 4].astype(np.int32)).to(**to)
        # A launch a class and alignment: Triton loads 4 floats at once only where it knows the addresses are
        # 16-byte aligned (the tensor's base it checks itself; a tile's first element and length it is told).
        self.classes: List[_Tiles] = []
        aligned = (table[:, 0] % 4 == 0) & (table[:, 1] % 4 == 0)
        lower = 0
        for block in sorted(tile_classes):
            in_class = (table[:, 1] > lower) & (table[:, 1] <= block)
            for alignment in (True, False):
                ids = np.flatnonzero(in_class & (aligned == alignment)).astype(np.int32)
                if len(ids):
                    self.classes.append(_Tiles(block, alignment, torch.from_numpy(ids).to(**to)))
            lower = block
        self.long_segments = torch.from_numpy(np.asarray(long_segments, dtype=np.int32)).to(**to)
        self.long_whole = torch.from_numpy(np.asarray(long_whole, dtype=np.int32)).to(**to)
        self.segment_first = torch.from_numpy(seg_first.copy()).to(**to)
        self.segment_length = torch.from_numpy(seg_length.astype(np.int32)).to(**to)
        self.segment_row = torch.from_numpy(seg_row.astype(np.int32)).to(**to)
        # Sizes whose square roots divide delta: the channel and layer bounds (``bounds``).
        self.row_size = torch.from_numpy(np.maximum(row_size, 1).astype(np.float64)).to(**to)
        p = np.asarray(params, dtype=np.int64).reshape(-1, 5)
        self.parameters = len(p)
        self.param_row0 = torch.from_numpy(p[:, 0].astype(np.int32)).to(**to)
        self.param_rows = torch.from_numpy(p[:, 1].astype(np.int32)).to(**to)
        self.param_row_size = torch.from_numpy(p[:, 2].astype(np.float64)).to(**to)
        self.param_numel = torch.from_numpy(p[:, 3].astype(np.float64)).to(**to)
        self.counted_here = torch.from_numpy(p[:, 4].astype(np.int32)).to(**to)
        # The step's scratch, kept from step to step.
        self.stepped = torch.zeros(max(self.segments, 1), dtype=torch.int32, **to)
        self.ahead_coefficient = torch.zeros(max(self.segments, 1), dtype=torch.float32, **to)
        self.views = torch.zeros(num_rows + 1, dtype=torch.int32, **to)
        self.coefficient = torch.zeros(num_rows + 1, dtype=torch.float32, **to)
        self.projected = torch.zeros(max(self.parameters, 1), dtype=torch.int32, **to)
        self._bounds: Dict[float, tuple] = {}

    def bounds(self, delta: float):
        """Per row the channel bound ``delta / sqrt(row size)``, per parameter the channel and layer bounds, for
        this ``delta``: computed in float64 on the device (no copy from the host, which would synchronise it),
        rounded to float32 once and kept."""
        if delta not in self._bounds:
            self._bounds[delta] = tuple((delta / size.sqrt()).float()
                                        for size in (self.row_size, self.param_row_size, self.param_numel))
        return self._bounds[delta]

    def first_pass(self, param, grad, exp_avg, exp_avg_sq, sums: torch.Tensor, constants: "StepConstants",
                   delta: float) -> None:
        """Adam's moments of every element; other elements updated; every row's four sums into ``sums`` (4 x
        rows + 1, float32, contiguous rows); rows that can be, stepped in the channel view."""
        row_bound, _, _ = self.bounds(delta)
        with _on(param.device):
            self._launch_first_pass(param, grad, exp_avg, exp_avg_sq, sums, constants, row_bound)

    def _launch_first_pass(self, param, grad, exp_avg, exp_avg_sq, sums, k: "StepConstants", row_bound) -> None:
        for tiles in self.classes:
            _rows_kernel[(tiles.ids.numel(),)](
                param, grad, exp_avg, exp_avg_sq, tiles.ids, self.tile_first, self.tile_length, self.tile_kind,
                self.tile_row, self.tile_segment, row_bound, sums, sums.stride(0), self.stepped,
                self.ahead_coefficient, k.b1, k.b2, k.c1, k.c2, k.eps, k.inv_bc2, k.nb1, k.ng, k.step_size,
                k.decay, k.decay_projected, ALIGNED=tiles.aligned, BLOCK=tiles.block, num_warps=_warps(tiles.block))
        if self.long_segments.numel():
            _long_rows_kernel[(self.long_segments.numel(),)](
                param, grad, exp_avg, exp_avg_sq, self.long_segments, self.long_whole, self.segment_first,
                self.segment_length, self.segment_row, row_bound, sums, sums.stride(0), self.stepped,
                self.ahead_coefficient, k.b1, k.b2, k.c1, k.c2, k.eps, k.inv_bc2, k.nb1, k.ng, k.step_size,
                k.decay_projected, NESTEROV=k.nesterov, BLOCK=FINISH_BLOCK, num_warps=4)

    def second_pass(self, param, grad, exp_avg, exp_avg_sq, sums: torch.Tensor, constants: "StepConstants",
                    delta: float) -> bool:
        """The decisions from the complete sums, then every row not yet done. Returns whether this tensor holds
        any projected parameter (whose count ``projected_count`` gives)."""
        if not self.parameters:
            return False
        _, channel_bound, layer_bound = self.bounds(delta)
        k = constants
        with _on(param.device):
            _decide_kernel[(self.parameters,)](
                sums, sums.stride(0), self.param_row0, self.param_rows, channel_bound, layer_bound, self.views,
                self.coefficient, self.projected, k.eps, BLOCK=DECIDE_BLOCK, num_warps=4)
            _finish_kernel[(self.segments,)](
                param, grad, exp_avg, exp_avg_sq, self.segment_first, self.segment_length, self.segment_row,
                self.stepped, self.ahead_coefficient, self.views, self.coefficient, k.eps, k.inv_bc2, k.nb1, k.ng,
                k.step_size, k.decay, k.decay_projected, NESTEROV=k.nesterov, BLOCK=FINISH_BLOCK, num_warps=4)
        return True

    def projected_count(self) -> torch.Tensor:
        """How many of this tensor's parameters counted here took a projection in the last step (a device
        tensor; computed when read, not every step)."""
        return (self.projected[:self.parameters] * self.counted_here).sum()


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (a rank's optimizer need not be on the
    device that is current when it steps). On the CPU (Triton's interpreter), nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


class StepConstants(NamedTuple):
    """A step's scalars, as the kernels take them (Python floats: Triton passes them as float32, as the CPU path
    rounds them)."""
    b1: float
    b2: float
    c1: float
    c2: float
    eps: float
    inv_bc2: float
    nb1: float
    ng: float
    step_size: float
    decay: float
    decay_projected: float
    nesterov: bool

    @classmethod
    def of(cls, group: dict, step: int) -> "StepConstants":
        beta1, beta2 = group["betas"]
        lr_wd = group["lr"] * group["weight_decay"]
        nesterov = bool(group["nesterov"])
        return cls(beta1, beta2, 1.0 - beta1, 1.0 - beta2, group["eps"], 1.0 / math.sqrt(1 - beta2 ** step),
                   beta1 if nesterov else 1.0, 1.0 - beta1 if nesterov else 0.0, group["lr"] / (1 - beta1 ** step),
                   1.0 - lr_wd, 1.0 - lr_wd * group["wd_ratio"], nesterov)
