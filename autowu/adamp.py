"""AdamP (Heo et al., 2021; timm's ``AdamP``) that stays AdamP when ZeRO hands it flat shards.

ZeRO stage 1/2 gives the client optimizer one flat 1-D partition per param group, and partitions cut through
parameters. timm's AdamP projects only tensors with ``len(p.shape) > 1``, so on a flat shard it silently runs
Adam with full weight decay (DeepSpeed #88, #490). This optimizer is told once how each tensor it steps maps to
parameters (``set_layout``; ``autowu.deepspeed`` does it from the ZeRO optimizer's own bookkeeping). Each step
it then

1. runs Adam's moment updates on the whole shard (elementwise, as timm does);
2. computes, for every output channel of every parameter with two or more dimensions, four partial sums over
   the elements it owns: grad.param, grad.grad, param.param and param.perturb (a channel's elements are one
   contiguous run of the shard, so each sum is one segmented reduction over the whole shard, not one kernel per
   parameter, and not an index scatter);
3. completes them with one all-reduce of that small vector (4 x the number of channels), so that a parameter
   that straddles a partition boundary gets exactly the sums of the whole parameter;
4. takes AdamP's decision on the device (channel view, else layer view: max |cosine| below
   ``delta / sqrt(view size)``), with no host synchronisation, and applies the projection and ``wd_ratio`` to
   the elements it owns.

The layer view's sums are the sums of the channel sums, so the same four numbers a channel serve both views.
Without a layout (no ZeRO), every tensor is taken as a whole parameter of its own shape: the same code path.

On the CPU the parameters a tensor holds whole take all four steps in one numba visit each, in cache, on torch's
own OpenMP threads and while the all-reduce runs; the rows of the (at most two) parameters cut by its ends take
two numba passes around it (``autowu.adamp_cpu``): no index scatter, no atomics, the same result on any number
of threads (its cost against DeepSpeed's fused Adam: ``benchmarks/RESULTS.md``). On a GPU Triton kernels do
the same (``autowu.adamp_triton``): each row read once, stepped in the channel view ahead of the decision
where its own sums allow, no atomics. Where Triton is missing, or a tensor is not contiguous float32, torch
operations do it; their sums are ``torch.segment_reduce`` (CUB's segmented reduction: no atomics, so their
rounding does not vary from run to run, as ``index_add_``'s did).
Checked against ``timm.optim.AdamP`` in ``tests/test_adamp.py`` (1-3 ranks, boundaries through parameters).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numba
import numpy as np
import torch
import torch.distributed as dist
from torch.optim.optimizer import Optimizer

from .adamp_cpu import CutRows, WholeParameters, cut_parameters, segments_of, whole_parameter_units
from .errors import ConfigError

# The four per-channel sums, in this order, in the reduced buffer.
_GRAD_PARAM, _GRAD_GRAD, _PARAM_PARAM, _PARAM_PERTURB = range(4)


@dataclass(frozen=True)
class FlatLayout:
    """Where a 1-D tensor sits among the parameters of a flat buffer.

    ``shapes[j]`` and ``offsets[j]``: parameter ``j``'s shape and its first element in the flat buffer (gaps
    between parameters are padding). The tensor holds elements ``[start, start + numel)`` of that buffer.
    ``partition_starts``: where each tensor of the process group that covers the buffer begins (its ranks' ZeRO
    partitions, in rank order, each of ``numel`` elements), or empty for a tensor stepped alone.
    """
    shapes: Tuple[Tuple[int, ...], ...]
    offsets: Tuple[int, ...]
    start: int
    numel: int
    partition_starts: Tuple[int, ...] = ()

    @property
    def cuts_here(self) -> bool:
        """Whether this tensor holds part of a projected parameter (cut by its ends)."""
        return len(cut_parameters(self.shapes, self.offsets, self.start, self.numel).row0) > 0

    def group_reduces(self, in_group: bool) -> bool:
        """Whether the step all-reduces the sums over the process group: where any tensor of the group holds part
        of a projected parameter, every rank enters the all-reduce at every step, whether its own tensor holds such
        a part or not (a rank that skipped a collective its peers enter would hang them); in a group whose
        partitions this layout does not list, always."""
        if not in_group:
            return False
        if not self.partition_starts:
            return True
        return any(len(cut_parameters(self.shapes, self.offsets, start, self.numel).row0)
                   for start in self.partition_starts)

    @classmethod
    def whole(cls, shape: Sequence[int]) -> "FlatLayout":
        """A tensor that is one whole parameter."""
        return cls((tuple(shape),), (0,), 0, math.prod(shape))

    def __post_init__(self):
        if len(self.shapes) != len(self.offsets):
            raise ValueError("FlatLayout: one offset per shape")
        end = 0
        for shape, offset in zip(self.shapes, self.offsets):
            if offset < end:
                raise ValueError(f"FlatLayout: parameters overlap at offset {offset}")
            end = offset + math.prod(shape)


class _Segments:
    """The device-side tables of one tensor's layout: which channel each element belongs to."""

    def __init__(self, layout: FlatLayout, device: torch.device, in_group: bool = False):
        # Channels ("rows") of every projected parameter (2+ dims), over the whole flat buffer, numbered in
        # parameter order; a shard holds a contiguous range of elements, hence of rows.
        row_param, param_numels, param_rows, counted_here = [], [], [], []
        for shape, offset in zip(layout.shapes, layout.offsets):
            if len(shape) >= 2:
                row_param.extend([len(param_numels)] * shape[0])
                param_numels.append(math.prod(shape))
                param_rows.append(shape[0])
                # counted by the rank that holds its first element (``last_projected``)
                counted_here.append(layout.start <= offset < layout.start + layout.numel)
        self.num_rows = len(row_param)
        # Elements of 1-D parameters and padding belong to one extra row whose coefficient is 0 and ratio 1.
        # Contiguous segments of one row each: autowu.adamp_cpu's two passes on a contiguous CPU tensor.
        self.first, self.length, self.row, _ = segments_of(layout.shapes, layout.offsets, layout.start, layout.numel)
        self.projects = bool((self.row < self.num_rows).any())
        # Which kernels step it: numba passes on the CPU, Triton kernels on a GPU, torch operations where neither
        # can (no Triton, a tensor that is not contiguous float32). Tests set it to compare the paths.
        self.kernel = "numba" if device.type == "cpu" else device_kernel()
        self.layout = layout
        self._triton_plan = None
        # The CPU path: parameters wholly in this tensor in one pass each; the rows of parameters cut by its ends
        # (``shared``) in two, around the all-reduce that completes their sums.
        self.units, self.shared = whole_parameter_units(layout.shapes, layout.offsets, layout.start, layout.numel)
        self.cut = cut_parameters(layout.shapes, layout.offsets, layout.start, layout.numel)
        self.shares = len(self.shared.first) > 0
        # Whether the step needs the sums buffer: for this tensor's own cut rows, or for the all-reduce every rank
        # of its process group enters alike (``FlatLayout.group_reduces``).
        self.needs_sums = self.shares or layout.group_reduces(in_group)
        self._whole_parameters: Optional[WholeParameters] = None
        self.cut_rows: Optional[CutRows] = None   # built by the first pass, used by the second
        self.device = device
        self._element_row: Optional[torch.Tensor] = None
        if device.type != "cpu":
            # Built with the layout: built at the first step, their host-to-device copies would synchronise the
            # host inside the training loop (tests/test_gpu.py checks). The torch path's table holds
            # an int32 a element (100 MB for ResNet-50): only where that path runs.
            if self.kernel == "triton":
                self._triton_plan = self.triton_plan
            else:
                self._element_row = self._build_element_row()
        # The torch path's sums: the segments tile the tensor, a channel is one segment of it (its part in this
        # tensor), so a segmented reduction gives every channel's sum; then each channel's is put in its place.
        self.segment_offsets = torch.from_numpy(np.append(self.first, layout.numel)).to(device)
        projected = np.flatnonzero(self.row < self.num_rows)
        if len(np.unique(self.row[projected])) != len(projected):
            raise AssertionError("ZeroAdamP: a channel in two segments of one tensor")  # segments_of never does
        self.projected_segments = torch.from_numpy(projected).to(device)
        self.projected_segment_rows = torch.from_numpy(self.row[projected]).to(device)
        self.param_rows = torch.tensor(param_rows, dtype=torch.int64, device=device)  # a parameter's rows: a run
        self.row_param = torch.tensor(row_param, dtype=torch.int64, device=device)
        self.inv_sqrt_row_size = torch.tensor([1 / math.sqrt(n // r) for n, r in zip(param_numels, param_rows)],
                                              device=device)
        self.inv_sqrt_param_numel = torch.tensor([1 / math.sqrt(n) for n in param_numels], device=device)
        self.counted_here = torch.tensor(counted_here, dtype=torch.bool, device=device)

    def whole_parameters(self, threads: int) -> WholeParameters:
        """The CPU path's plan for the whole parameters on ``threads`` threads (built once)."""
        if self._whole_parameters is None or self._whole_parameters.threads != max(1, threads):
            self._whole_parameters = WholeParameters(self.units, threads)
        return self._whole_parameters

    def cut_rows_plan(self, threads: int) -> CutRows:
        """The CPU path's plan for the rows of cut parameters on ``threads`` threads (built once)."""
        if self.cut_rows is None or self.cut_rows.threads != max(1, threads):
            self.cut_rows = CutRows(self.shared, self.cut, self.num_rows, threads)
        return self.cut_rows

    @property
    def triton_plan(self):
        """The Triton path's tables and scratch (``autowu.adamp_triton``), built once."""
        if self._triton_plan is None:
            from .adamp_triton import TritonPlan
            layout = self.layout
            self._triton_plan = TritonPlan(layout.shapes, layout.offsets, layout.start, layout.numel, self.device)
        return self._triton_plan

    @property
    def element_row(self) -> torch.Tensor:
        """Every element's row, for index_select on a GPU (or a non-contiguous CPU tensor)."""
        if self._element_row is None:
            self._element_row = self._build_element_row()
        return self._element_row

    def _build_element_row(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.from_numpy(self.row).int(), torch.from_numpy(self.length)).to(self.device)


class ZeroAdamP(Optimizer):
    """timm's AdamP, step for step, on whole parameters or on ZeRO's flat partitions.

    Args are timm's (``caution`` is not supported). Call ``set_layout(tensor, layout, process_group)`` for
    every tensor that is not a whole parameter before the first step; ``autowu.deepspeed`` does this for ZeRO
    stage 1 and 2. A flat tensor without a layout is refused, never stepped as plain Adam.
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False):
        check_arguments(lr, betas, eps, weight_decay, delta, wd_ratio)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, delta=delta,
                        wd_ratio=wd_ratio, nesterov=nesterov)
        super().__init__(params, defaults)
        # Tensors given at construction are whole parameters; anything else needs a layout.
        self._layouts: Dict[torch.Tensor, Tuple[FlatLayout, Optional[object]]] = {
            p: (FlatLayout.whole(p.shape), None) for group in self.param_groups for p in group["params"]}
        self._segments: Dict[torch.Tensor, _Segments] = {}
        self._projected_counts: Tuple[Optional[torch.Tensor], ...] = ()  # the last step's (``last_projected``)
        self._sums: Optional[torch.Tensor] = None   # the step's partial sums, reused

    # ------------------------------------------------------------------ layout
    def set_layout(self, tensor: torch.Tensor, layout: FlatLayout, process_group=None) -> None:
        """Declare that ``tensor`` (a param of this optimizer) holds ``layout``'s slice of a flat buffer.

        ``process_group``: the ranks whose tensors together cover that buffer (their partial sums are
        all-reduced), or None when this tensor covers every element it needs.
        """
        if tensor.dim() != 1 or tensor.numel() != layout.numel:
            raise ValueError(f"ZeroAdamP.set_layout: a 1-D tensor of {layout.numel} elements expected, "
                             f"got shape {tuple(tensor.shape)}")
        self._layouts[tensor] = (layout, process_group)
        self._segments.pop(tensor, None)

    def check_layouts(self) -> None:
        """Raise now, not at the first step, if a tensor to be stepped has no known layout."""
        for group in self.param_groups:
            for p in group["params"]:
                self._segments_of(p)

    def _segments_of(self, p: torch.Tensor) -> Tuple[_Segments, Optional[object]]:
        if p not in self._layouts:
            raise RuntimeError(
                f"ZeroAdamP was handed a tensor of shape {tuple(p.shape)} whose layout it was not told: a "
                "flattened or partitioned parameter (ZeRO, an fp16 optimizer) would lose AdamP's projection. "
                "Build the engine after `import autowu.deepspeed` (or call autowu.deepspeed.attach(engine)), "
                "which declares ZeRO's partitions.")
        layout, group = self._layouts[p]
        if p not in self._segments:
            self._segments[p] = _Segments(layout, p.device, in_group=group is not None)
        return self._segments[p], group

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # (p, group, what the first pass returned, segments, slice of the reduced buffer); the first pass returns
        # the update direction (the torch path) or None (the CPU path, whose whole parameters come later)
        work = []
        process_groups = set()
        size = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                segments, process_group = self._segments_of(p)
                rows = segments.num_rows + 1
                work.append([p, group, None, segments, slice(size, size + 4 * rows)])
                size += 4 * rows
                if process_group is not None:
                    process_groups.add(process_group)
        if not work:
            return loss
        if len(process_groups) > 1:
            raise RuntimeError("ZeroAdamP: tensors of one step belong to different process groups")
        process_group = next(iter(process_groups)) if process_groups else None

        # Adam's moments and the partial channel sums of every tensor (on the CPU path: of the rows of cut
        # parameters only), into one buffer: one all-reduce a step. None where nothing needs sums (the CPU path
        # on one rank).
        sums = self._sums_buffer(size, work)
        for item in work:
            p, group, _, segments, where = item
            item[2] = self._adam_and_sums(p, group, segments, sums[where].view(4, -1) if sums is not None else None)
        reduction = (dist.all_reduce(sums, group=process_group, async_op=True)
                     if process_group and sums is not None else None)
        # The CPU path's whole parameters need nothing from the other ranks: done while the sums travel.
        projected_here = [self._whole_parameters(p, group, segments) for p, group, _, segments, _ in work
                          if self._path(p, segments) == "numba"]
        if reduction is not None:
            reduction.wait()

        projected = []
        for p, group, first_pass, segments, where in work:
            path = self._path(p, segments)
            if path == "numba":
                if segments.shares:  # the second pass of the cut parameters' rows, with their completed sums
                    projected_here.append(self._cut_rows_second_pass(p, group, segments, sums[where].view(4, -1)))
                continue
            if path == "triton":
                plan = segments.triton_plan
                state = self.state[p]
                if plan.second_pass(p, p.grad, state["exp_avg"], state["exp_avg_sq"], sums[where].view(4, -1),
                                    _triton_constants(group, state["step"]), group["delta"]):
                    projected.append(plan)
                continue
            step_size = group["lr"] / (1 - group["betas"][0] ** self.state[p]["step"])
            projection = _project(sums[where].view(4, -1), segments, group) if segments.projects else None
            coefficient, decay = _row_update(projection, segments, group, p.device)
            if projection is not None:
                projected.append(projection[2])
            perturb = first_pass
            if projection is not None:
                index = segments.element_row
                perturb.sub_(p * coefficient.index_select(0, index).view(p.shape).to(p.dtype))
                if group["weight_decay"] > 0:
                    p.mul_(decay.index_select(0, index).view(p.shape).to(p.dtype))
            elif group["weight_decay"] > 0:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(perturb, alpha=-step_size)
        self._count_projected(projected, projected_here)
        return loss

    def _sums_buffer(self, size: int, work) -> Optional[torch.Tensor]:
        """The step's partial-sums buffer, zeroed; kept from step to step (a new one a step would come from ``mmap``
        and be faulted in again). None when every tensor takes the CPU path and no tensor of its process group
        holds part of a parameter (no rank then all-reduces): whole parameters keep their sums in the kernel's own
        scratch."""
        if all(self._path(p, segments) == "numba" and not segments.needs_sums for p, _, _, segments, _ in work):
            return None
        device = work[0][0].device
        if self._sums is None or self._sums.numel() != size or self._sums.device != device:
            self._sums = torch.zeros(size, dtype=torch.float32, device=device)
        else:
            self._sums.zero_()
        return self._sums

    @property
    def last_projected(self) -> Optional[torch.Tensor]:
        """How many parameters took AdamP's projection in the last step, among those whose first element this
        rank holds: the sum over the ranks is the model's count (on one rank, or without ZeRO, it is). Per rank,
        so that reading it is never a collective, and the step pays no all-reduce for a number only tests and
        logs read. For tests and logs."""
        if not self._projected_counts:
            return None
        on_device, here = self._projected_counts
        counts = [c if isinstance(c, torch.Tensor) else c.projected_count() for c in on_device]
        if here is not None:
            counts.append(torch.as_tensor(here))
        return sum(counts[1:], counts[0]) if counts else None

    def _count_projected(self, projected: list, projected_here: List[int]) -> None:
        """The device paths' counts (tensors on the device, or Triton plans that count when read: no host
        synchronisation, no kernel a step) and the CPU path's (ints), each over the parameters whose first element
        this rank holds."""
        self._projected_counts = (projected, sum(projected_here) if projected_here else None)

    @staticmethod
    def _path(p: torch.Tensor, segments: "_Segments") -> str:
        """The kernels that step ``p``: its segments' (numba on the CPU, Triton on a GPU) where ``p`` and its
        gradient are contiguous float32, which they read as flat memory; else torch operations."""
        flat = (p.dtype == torch.float32 and p.is_contiguous() and p.grad is not None and p.grad.is_contiguous()
                and p.grad.dtype == torch.float32)
        return segments.kernel if flat else "torch"

    def _adam_and_sums(self, p: torch.Tensor, group: dict, segments: "_Segments",
                       partial: torch.Tensor) -> torch.Tensor:
        """Adam's moments; the four partial sums of every row into ``partial`` (4 x rows + 1); returns the
        update direction (``perturb``)."""
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        path = self._path(p, segments)
        if path != "torch":
            for moment in (state["exp_avg"], state["exp_avg_sq"]):  # the kernels take their addresses
                if moment.dtype != torch.float32 or not moment.is_contiguous() or moment.numel() != p.numel():
                    raise RuntimeError(f"ZeroAdamP: a moment of a {p.numel()}-element tensor is not contiguous "
                                       f"float32 of its size ({moment.dtype}, {tuple(moment.shape)})")
            state["step"] += 1
            if path == "triton":
                segments.triton_plan.first_pass(p, p.grad, state["exp_avg"], state["exp_avg_sq"], partial,
                                                _triton_constants(group, state["step"]), group["delta"])
            else:
                self._cut_rows_first_pass(p, group, segments, partial)
            return None
        perturb = self._adam(p, group, beta1, beta2)
        if segments.projects:
            for k, (a, b) in enumerate(((p.grad, p), (p.grad, p.grad), (p, p), (p, perturb))):
                # reshape: elements in the logical (row-major) order of the segments, whatever the layout.
                # unsafe: the offsets were checked when built; checking them here would wait for the GPU.
                per_segment = torch.segment_reduce((a * b).reshape(-1).float(), "sum",
                                                   offsets=segments.segment_offsets, unsafe=True)
                partial[k].index_copy_(0, segments.projected_segment_rows,
                                       per_segment.index_select(0, segments.projected_segments))
        return perturb

    def _cut_rows_first_pass(self, p: torch.Tensor, group: dict, segments: "_Segments",
                             partial: torch.Tensor) -> None:
        """The CPU path, rows of parameters cut by the tensor's ends: Adam's moments and the four partial sums
        (into ``partial``); rows whose own sums allow it are stepped in the channel view already, the others'
        update direction is kept for the second pass, after the all-reduce."""
        if not segments.shares:
            return
        # As many threads as torch's (the launcher's share of the node's cores): not numba's default, all.
        threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(threads)
        beta1, beta2 = group["betas"]
        state = self.state[p]
        lr_wd = group["lr"] * group["weight_decay"]
        segments.cut_rows_plan(threads).first_pass(
            _flat(p), _flat(p.grad), _flat(state["exp_avg"]), _flat(state["exp_avg_sq"]), partial.numpy(), beta1,
            beta2, group["eps"], math.sqrt(1 - beta2 ** state["step"]), bool(group["nesterov"]), group["delta"],
            group["lr"] / (1 - beta1 ** state["step"]), 1.0 - lr_wd * group["wd_ratio"])

    def _cut_rows_second_pass(self, p: torch.Tensor, group: dict, segments: "_Segments", sums: torch.Tensor) -> int:
        """The cut parameters' decisions from their completed sums and the update of their rows; returns how many
        of those counted on this rank were projected."""
        beta1, beta2 = group["betas"]
        state = self.state[p]
        lr_wd = group["lr"] * group["weight_decay"]
        return segments.cut_rows.second_pass(
            _flat(p), _flat(p.grad), _flat(state["exp_avg"]), _flat(state["exp_avg_sq"]), sums.numpy(), beta1,
            group["eps"], math.sqrt(1 - beta2 ** state["step"]), bool(group["nesterov"]), group["delta"],
            group["lr"] / (1 - beta1 ** state["step"]), 1.0 - lr_wd, 1.0 - lr_wd * group["wd_ratio"])

    def _whole_parameters(self, p: torch.Tensor, group: dict, segments: "_Segments") -> int:
        """The CPU path, parameters wholly in the tensor: each done in one visit (Adam, sums, decision, update),
        on torch's threads. Returns how many were projected."""
        beta1, beta2 = group["betas"]
        state = self.state[p]
        lr_wd = group["lr"] * group["weight_decay"]
        grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
        # Addresses, not numpy views (each view is three torch calls, paid cold after ZeRO's passes); p and its
        # gradient were checked by ``_path``, the moments by ``_adam_and_sums``.
        return segments.whole_parameters(torch.get_num_threads()).step(
            p.numel(), p.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), beta1, beta2,
            group["eps"], math.sqrt(1 - beta2 ** state["step"]), bool(group["nesterov"]), group["delta"],
            group["lr"] / (1 - beta1 ** state["step"]), 1.0 - lr_wd, 1.0 - lr_wd * group["wd_ratio"])

    def _adam(self, p: torch.Tensor, group: dict, beta1: float, beta2: float) -> torch.Tensor:
        """Adam's moments as timm updates them; returns the update direction (``perturb``)."""
        grad = p.grad
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        bias_correction2 = 1 - beta2 ** state["step"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
        if group["nesterov"]:
            return (beta1 * exp_avg + (1 - beta1) * grad) / denom
        return exp_avg / denom


def check_arguments(lr: float, betas: Tuple[float, float], eps: float, weight_decay: float, delta: float,
                    wd_ratio: float) -> None:
    """AdamP's values in range, or one ``ConfigError`` naming the first that is not."""
    for name, value, valid, allowed in (
            ("lr", lr, lr >= 0, ">= 0"),
            ("betas", betas, len(betas) == 2 and all(0 <= b < 1 for b in betas), "two numbers in [0, 1)"),
            ("eps", eps, eps > 0, "> 0"), ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            ("delta", delta, delta > 0, "> 0"), ("wd_ratio", wd_ratio, 0 <= wd_ratio <= 1, "in [0, 1]")):
        if not valid:
            raise ConfigError(f"AdamP: {name} must be {allowed}, got {value!r}")


KERNEL_ENV = "AUTOWU_ADAMP_KERNEL"


def device_kernel() -> str:
    """The kernels a GPU's tensors take: ``"triton"`` (``autowu.adamp_triton``) where Triton can be imported (it
    comes with PyTorch's CUDA wheels), else ``"torch"``. ``AUTOWU_ADAMP_KERNEL=torch`` chooses torch's
    operations (the same AdamP, some twenty passes over memory instead of one or two); ``=triton`` insists."""
    import importlib.util
    choice = os.environ.get(KERNEL_ENV, "")
    if choice not in ("", "triton", "torch"):
        raise ConfigError(f"{KERNEL_ENV}={choice!r}: 'triton', 'torch' or unset")
    have_triton = importlib.util.find_spec("triton") is not None
    if choice == "triton" and not have_triton:
        raise RuntimeError(f"{KERNEL_ENV}=triton, but Triton cannot be imported here")
    return "torch" if choice == "torch" or not have_triton else "triton"


def _triton_constants(group: dict, step: int):
    from .adamp_triton import StepConstants
    return StepConstants.of(group, step)


def _flat(tensor: torch.Tensor):
    """A contiguous CPU tensor's elements as a 1-D numpy array sharing its memory."""
    return tensor.detach().view(-1).numpy()


def _row_update(projection, segments: _Segments, group: dict, device: torch.device):
    """Per row (and the extra row): the coefficient of ``perturb -= c * param`` and the weight-decay factor."""
    lr_wd = group["lr"] * group["weight_decay"]
    if projection is None:
        coefficient = torch.zeros(segments.num_rows + 1, device=device)
        decay = torch.full((segments.num_rows + 1,), 1.0 - lr_wd, device=device)
        return coefficient, decay
    coefficient, uses_wd_ratio, _ = projection
    decay = torch.where(uses_wd_ratio, 1.0 - lr_wd * group["wd_ratio"], 1.0 - lr_wd)
    return coefficient, decay


def _project(sums: torch.Tensor, segments: _Segments, group: dict):
    """AdamP's projection decision from complete channel sums, on the device (no host synchronisation).

    Returns per row (one extra 0 row for elements of 1-D parameters and padding) the coefficient c of
    ``perturb -= c * param`` and whether weight decay is scaled by ``wd_ratio``; and how many parameters whose
    first element this tensor holds were projected.
    """
    eps, delta = group["eps"], group["delta"]
    rows = segments.num_rows
    row_param = segments.row_param
    grad_param, grad_grad, param_param, param_perturb = sums[:, :rows]

    # A parameter's rows are a run of the rows: its max and its sums over them are segmented reductions.
    # Channel view. torch's cosine_similarity normalises each vector by max(its norm, eps), as here.
    cosine = grad_param.abs() / (grad_grad.sqrt().clamp_min(eps) * param_param.sqrt().clamp_min(eps))
    max_cosine = torch.segment_reduce(cosine, "max", lengths=segments.param_rows, unsafe=True)
    channel = max_cosine < delta * segments.inv_sqrt_row_size

    # Layer view, tried only where the channel view did not pass: a parameter's sums are its channels' sums.
    layer_sums = torch.segment_reduce(sums[:, :rows].t().contiguous(), "sum", lengths=segments.param_rows,
                                      unsafe=True).t()
    layer_cosine = layer_sums[0].abs() / (layer_sums[1].sqrt().clamp_min(eps) * layer_sums[2].sqrt().clamp_min(eps))
    layer = ~channel & (layer_cosine < delta * segments.inv_sqrt_param_numel)

    # perturb -= p_n * sum(p_n * perturb) with p_n = p / (||p|| + eps): a coefficient on p, per row.
    channel_coefficient = param_perturb / (param_param.sqrt() + eps) ** 2
    layer_coefficient = layer_sums[3] / (layer_sums[2].sqrt() + eps) ** 2
    row_channel, row_layer = channel[row_param], layer[row_param]
    coefficient = torch.where(row_channel, channel_coefficient,
                              torch.where(row_layer, layer_coefficient[row_param], 0.0))
    coefficient = torch.cat([coefficient, coefficient.new_zeros(1)])
    uses_wd_ratio = torch.cat([row_channel | row_layer, row_channel.new_zeros(1)])
    return coefficient, uses_wd_ratio, ((channel | layer) & segments.counted_here).sum()


def maps_partitions(zero_optimizer) -> bool:
    """Whether ``zero_partition_layouts`` knows how this DeepSpeed optimizer wrapper partitions the parameters."""
    return (hasattr(zero_optimizer, "single_partition_of_fp32_groups")      # ZeRO-1/2 (DeepSpeedZeroOptimizer)
            or hasattr(zero_optimizer, "fp32_groups_flat_partition"))       # bf16 + fp32 accumulation (BF16_Optimizer)


def zero_partition_layouts(zero_optimizer) -> List[Tuple[torch.Tensor, FlatLayout, object]]:
    """(flat fp32 partition, its layout, its process group) for every group of a DeepSpeed ZeRO-1/2 optimizer, or
    of its ``BF16_Optimizer`` (bf16 with fp32 gradient accumulation on ZeRO-1).

    Read from the wrapper's own bookkeeping: each group's parameters in flat order (``round_robin_bit16_groups``,
    or ``bf16_groups``), their offsets (``round_robin_bit16_offsets``, padding included; back to back in the
    BF16_Optimizer), the equal-sized partitions of the aligned flat buffer and this rank's partition id.
    """
    layouts = []
    bf16 = not hasattr(zero_optimizer, "single_partition_of_fp32_groups")
    flats = zero_optimizer.bf16_groups_flat if bf16 else zero_optimizer.bit16_groups_flat
    for i, flat in enumerate(flats):
        group = zero_optimizer.real_dp_process_group[i]
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        if bf16:
            metas = zero_optimizer.bf16_groups[i]
            offsets = None
        else:
            params = zero_optimizer.round_robin_bit16_groups[i]
            metas = getattr(zero_optimizer, "round_robin_bit16_meta", [params] * (i + 1))[i]
            offsets = getattr(zero_optimizer, "round_robin_bit16_offsets", None)
        shapes = tuple(tuple(m.shape) for m in metas)
        if offsets is not None:
            offsets = tuple(offsets[i])
        else:  # parameters back to back
            offsets = tuple(int(sum(math.prod(s) for s in shapes[:j])) for j in range(len(shapes)))
        partition = (zero_optimizer.fp32_groups_flat_partition if bf16
                     else zero_optimizer.single_partition_of_fp32_groups)[i]
        size = flat.numel() // world
        if partition.numel() != size or size * world != flat.numel():
            raise RuntimeError(f"ZeroAdamP: ZeRO group {i}: partition of {partition.numel()} elements, expected "
                               f"{flat.numel()} / {world}; this DeepSpeed partitions differently")
        starts = tuple(r * size for r in range(world)) if world > 1 else ()
        layouts.append((partition, FlatLayout(shapes, offsets, rank * size, size, starts),
                        group if world > 1 else None))
    return layouts
