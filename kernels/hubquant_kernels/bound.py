"""Launchers bound to a layer at load time: after the first call at a given M, a call is the C launches alone.

An eager call of `w4a16_matmul` checks its arguments, flattens x, looks its choice up and builds the launch
(grid, strides, workspace, ~20 arguments) before Triton's launcher runs; on a slow host that is most of the cost
of a small product. A layer's weights, strides and output width never change, so a `Bound` op records the
launches of its first call per (M, dtype) (the chooser decides then, as before) and keeps them as a plan: each
compiled kernel, its grid and its arguments with every pointer already an integer, except the two slots that
change per call (x and y). Later calls allocate y and replay the plan with the current stream.

A plan is kept only when every tensor a launch received is x, y, one of the layer's own tensors, a split-K
workspace (never freed, left zeroed by every kernel) or a scratch buffer the op handed over for the plan to
own; anything else (a copy of x made inside the op, a cuBLAS call between launches) means the op is not
replayable and every call takes the normal path. Plans are not made while a CUDA graph is being captured, under
the Triton interpreter, with HUBQUANT_FAST_LAUNCH=0, or while a Triton launch hook (profiler) is set; a hook
set after a plan was made is not called by its launches.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hubquant_kernels import _common

# the current CUDA stream as an integer (a torch without CUDA has no such call; plans then never run on a GPU)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 0)
MAX_PLANS = 64  # distinct (M, dtype) per layer (prefill lengths vary); past this, calls take the normal path


class _Plan:
    """One call's launches with x and y as the only free arguments."""

    __slots__ = ("launches", "keep", "device")

    def __init__(self, launches: list, keep: list, device: int):
        self.launches, self.keep, self.device = launches, keep, device

    def __call__(self, x_ptr: int, y_ptr: int) -> None:
        stream = _raw_stream(self.device)
        for run, g0, g1, g2, fn, meta, args, slots in self.launches:
            for i, which in slots:
                args[i] = x_ptr if which == 0 else y_ptr
            run(g0, g1, g2, stream, fn, meta, None, None, None, *args)


def make_plan(records: Sequence, x: torch.Tensor, y: torch.Tensor, consts: Sequence[torch.Tensor | None],
              scratch: Sequence[torch.Tensor] = ()) -> _Plan | None:
    """A plan from recorded launches, or None if one of them cannot be replayed with only x and y changed."""
    if not records or any(r is None for r in records):
        return None
    allowed = {id(t) for t in consts if t is not None} | {id(t) for t in scratch}
    for ws, cnt in _common._WORKSPACES.values():
        allowed |= {id(ws), id(cnt)}
    for ws, cnt in _common._RETIRED:
        allowed |= {id(ws), id(cnt)}
    launches = []
    keep = [t for t in consts if t is not None] + list(scratch)
    for compiled, tail, grid, args in records:
        flat, slots = [], []
        for i, a in enumerate(args):
            if a is x or a is y:
                slots.append((i, 0 if a is x else 1))
                flat.append(0)
            elif isinstance(a, torch.Tensor):
                if id(a) not in allowed:
                    return None
                keep.append(a)
                flat.append(a.data_ptr())  # Triton's launcher takes integers as pointers (no per-call lookup)
            else:
                flat.append(a)
        g = tuple(grid) + (1,) * (3 - len(grid))
        launches.append((compiled.run, g[0], g[1], g[2], compiled.function, compiled.packed_metadata,
                         flat + list(tail), slots))
    return _Plan(launches, keep, x.device.index or 0)


class Bound:
    """y = op(x) for one layer's fixed tensors, replaying a recorded plan per (M, dtype) once one exists.

    `run(x2, y)` computes the product through the op's normal path (checks, chooser, launches) into y [M, N] and
    returns the scratch tensors it allocated that a plan may keep (e.g. quantized activations), or None if its
    work is not only Triton launches, or the output tensor itself when the op wrote a new one instead of y.
    `consts` are the layer's tensors that launches may read.
    """

    def __init__(self, k: int, n: int, run: Callable, consts: Sequence[torch.Tensor | None]):
        self.k, self.n, self._run, self._consts = k, n, run, tuple(consts)
        self._plans: dict[tuple, _Plan] = {}
        self._seen: set[tuple] = set()  # keys decided by a first call (the chooser may time candidates then)
        self.disabled = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.k and x.is_contiguous():
            plan = self._plans.get((x.numel(), x.dtype))
            if plan is not None:
                xp = x.data_ptr()
                if xp & 15 == 0:  # the kernels were specialized for 16-byte aligned pointers
                    y = torch.empty(x.shape[:-1] + (self.n,), dtype=x.dtype, device=x.device)
                    plan(xp, y.data_ptr())
                    return y
        return self._slow(x)

    def _slow(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _common.as_2d(x, self.k)
        y = torch.empty(x2.shape[0], self.n, dtype=x.dtype, device=x.device)
        key = (x2.numel(), x.dtype)
        bindable = (not self.disabled and x.is_cuda and x2.shape[0] > 0 and x.is_contiguous()
                    and len(self._plans) < MAX_PLANS and _common._fast_launch_enabled()
                    and not torch.cuda.is_current_stream_capturing())
        if not bindable or key not in self._seen:  # the first call decides; the second is recorded
            out = self._run(x2, y)
            if bindable:
                self._seen.add(key)
            return (out if isinstance(out, torch.Tensor) else y).reshape(*lead, self.n)
        _common.RECORDING.append([])
        try:
            scratch = self._run(x2, y)
        finally:
            records = _common.RECORDING.pop()
        if isinstance(scratch, torch.Tensor):  # the op returned its own output (a cuBLAS call): nothing to replay
            return scratch.reshape(*lead, self.n)
        if scratch is not None and key not in self._plans:
            plan = make_plan(records, x2, y, self._consts, scratch)
            if plan is not None and x2.data_ptr() & 15 == 0:
                self._plans[key] = plan
        return y.reshape(*lead, self.n)

    def plans(self) -> int:
        """How many (M, dtype) plans this layer holds (benchmarks and tests)."""
        return len(self._plans)
