"""The split-K epilogue the W4A16 kernels share: store a tile, or reduce it through a workspace.

With SPLIT_K > 1 every program adds its partial tile into an fp32 workspace and bumps the tile's arrival
counter; the last program to arrive writes the tile (plus bias) to the output and clears the workspace and
counter for the next call.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def store_or_reduce(acc, y_ptrs, ws_ptrs, mask, cnt_ptr, tile, bias,
                        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Write acc (+bias) to y, or add it into the workspace and let the tile's last program write y."""
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc = acc + bias
            tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(ws_ptrs, acc, mask=mask)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + tile, 1)
            if arrived == SPLIT_K - 1:
                total = tl.atomic_add(ws_ptrs, tl.zeros_like(acc), mask=mask)  # read through L2
                tl.store(ws_ptrs, tl.zeros_like(acc), mask=mask)
                if HAS_BIAS:
                    total = total + bias
                tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)
                tl.store(cnt_ptr + tile, 0)
