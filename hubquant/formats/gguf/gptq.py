"""GPTQ on GGUF grids: each block's stored parameters (scales, mins) come from the importance-weighted search
on the original weight; the columns are then rounded one at a time onto those fixed grids, in decreasing
Hessian-diagonal order, each column's rounding error pushed onto the columns not yet rounded through the
inverse Hessian's Cholesky factor (GPTQ's update), so the codes compensate each other's error."""
from __future__ import annotations

import torch

from hubquant.formats.gguf.blocks import Grid, choose_params
from hubquant.methods.gptq import HessianPrep


@torch.no_grad()
def gptq_grid(weight: torch.Tensor, prep: HessianPrep, qtype: str, imp: torch.Tensor | None,
              *, block_size: int = 128) -> Grid:
    """GPTQ-round weight [rows, cols] onto the `qtype` grid chosen for it (see the module docstring).

    prep: `hubquant.methods.gptq.prepare_hessian` of the Linear's input Hessian (dead columns, act-order
    permutation, upper Cholesky factor of the damped inverse). imp: per-column importance for the
    parameter search (the Hessian's diagonal), or None.
    """
    w = weight.detach().float().clone()
    w[:, prep.dead] = 0.0
    grid = choose_params(w, qtype, imp)
    info = grid.info
    rows, cols = w.shape
    scale = grid.scale.repeat_interleave(info.sub, dim=1)
    offset = (grid.offset.repeat_interleave(info.sub, dim=1) if grid.offset is not None
              else torch.zeros_like(scale))
    perm, hinv = prep.perm, prep.hinv
    if perm is not None:
        w, scale, offset = w[:, perm], scale[:, perm], offset[:, perm]
    # columns as contiguous rows: [cols, rows]
    wt, st, ot = w.T.contiguous(), scale.T.contiguous(), offset.T.contiguous()
    nz = st != 0
    inv = torch.where(nz, 1.0 / torch.where(nz, st, torch.ones_like(st)), torch.zeros_like(st))
    codes = torch.empty_like(wt)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        h1 = hinv[i1:i2, i1:i2]
        err = torch.empty(i2 - i1, rows)
        for i in range(i2 - i1):
            c = i1 + i
            q = torch.round((wt[c] - ot[c]) * inv[c]).clamp_(info.qmin, info.qmax)
            q.masked_fill_(~nz[c], 0.0)
            codes[c] = q
            e = (wt[c] - (q * st[c] + ot[c])) / h1[i, i]
            err[i] = e
            if i + 1 < i2 - i1:
                wt[c + 1:i2].addr_(h1[i, i + 1:], e, alpha=-1.0)
        if i2 < cols:
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, err, alpha=-1.0)
    codes = codes.T
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    grid.codes = codes.contiguous().to(torch.int8)
    return grid
