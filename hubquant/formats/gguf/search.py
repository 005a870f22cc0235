"""Scale (and min) searches for GGUF blocks, vectorised over many blocks at once (torch, float32).

Every function takes `x` [N, n] (N blocks of n values) and per-value weights `w` [N, n] and returns the
float parameters that minimise the weighted squared (or absolute) rounding error over a small candidate
grid, as ggml's `make_qx_quants` (symmetric) and `make_qkx2_quants` (scale + min) do for one block.
"""
from __future__ import annotations

import torch


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude per row, with its sign ([N])."""
    idx = x.abs().argmax(-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1)


def search_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int, *, steps: int = 9) -> torch.Tensor:
    """Scale s per row minimising sum w (x - s q)^2 with q = clamp(round(x / s), -nmax, nmax - 1).

    Candidates: the max-magnitude value mapped to -(nmax + 0.1 k) for k in [-steps, steps]; each candidate's
    codes get their least-squares scale sum(w x q) / sum(w q^2). The best candidate maximises
    sum(w x q)^2 / sum(w q^2) (equivalently minimises the error). Rows of zeros get scale 0.
    """
    mx = signed_absmax(x)
    zero = mx == 0
    mx = torch.where(zero, torch.ones_like(mx), mx)
    best_score = torch.full_like(mx, -1.0)
    best_scale = torch.zeros_like(mx)
    for k in [0] + [k for k in range(-steps, steps + 1) if k]:
        iscale = -(nmax + 0.1 * k) / mx
        q = torch.round(x * iscale[:, None]).clamp_(-nmax, nmax - 1)
        wq = w * q
        sumlx = (wq * x).sum(-1)
        suml2 = (wq * q).sum(-1)
        ok = suml2 > 0
        safe = torch.where(ok, suml2, torch.ones_like(suml2))
        score = torch.where(ok, sumlx * sumlx / safe, torch.full_like(suml2, -1.0))
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_scale = torch.where(better, sumlx / safe, best_scale)
    return torch.where(zero, torch.zeros_like(best_scale), best_scale)


def search_asymmetric(x: torch.Tensor, w: torch.Tensor, nmax: int, *, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale s >= 0 and min m >= 0 per row minimising sum w |x - (s q - m)|^p with q in [0, nmax].

    Starts from the min-max grid (the min clamped to <= 0, as ggml does), then tries nstep + 1 stretched
    grids (nmax + rmin + rdelta k levels over the range); for each it fits (s, -m) by weighted least squares
    on the candidate's codes and keeps the fit with the smallest weighted error (p = 1 with use_mad).
    Returns (scale [N], min [N]) where a value dequantizes as scale * q - min.
    """
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1)
    rng = hi - lo
    flat = rng <= 0
    rng = torch.where(flat, torch.ones_like(rng), rng)
    sum_w = w.sum(-1)
    sum_x = (w * x).sum(-1)

    def err_of(scale, mn, q):
        d = scale[:, None] * q + mn[:, None] - x
        return (w * (d.abs() if use_mad else d * d)).sum(-1)

    iscale = nmax / rng
    q = torch.round((x - lo[:, None]) * iscale[:, None]).clamp_(0, nmax)
    best_scale, best_min = 1.0 / iscale, lo.clone()
    best_err = err_of(best_scale, best_min, q)
    for k in range(nstep + 1):
        iscale = (rmin + rdelta * k + nmax) / rng
        q = torch.round((x - lo[:, None]) * iscale[:, None]).clamp_(0, nmax)
        wq = w * q
        sum_l = wq.sum(-1)
        sum_l2 = (wq * q).sum(-1)
        sum_xl = (wq * x).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        mn = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        pos = mn > 0  # the min is a subtracted offset: keep it <= 0 and refit the scale alone
        mn = torch.where(pos, torch.zeros_like(mn), mn)
        scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), scale)
        err = err_of(scale, mn, q)
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, mn, best_min)
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    return best_scale.clamp(min=0), -best_min.clamp(max=0)


def quantize_superscale(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative sub-block values [..., k] as (d fp16 [...], integer codes [..., k] in [0, levels]) with
    value ~ d * code, d = max / levels rounded to fp16 (ggml's K-quant scale and min quantization)."""
    mx = values.amax(-1)
    d16 = (mx / levels).to(torch.float16)
    d = d16.float()
    inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
    codes = torch.round(values * inv[..., None]).clamp_(0, levels)
    return d16, codes.to(torch.uint8)


def quantize_signed_superscale(values: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed sub-block scales [..., k] as (d fp16 [...], int codes in [-nmax, nmax - 1]) with the largest
    magnitude mapped to -nmax (ggml's Q6_K / Q3_K scale quantization)."""
    shape = values.shape
    flat = values.reshape(-1, shape[-1])
    mx = signed_absmax(flat)
    zero = mx == 0
    iscale = -nmax / torch.where(zero, torch.ones_like(mx), mx)
    d16 = torch.where(zero, torch.zeros_like(mx), 1.0 / iscale).to(torch.float16)
    d = d16.float()
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    codes = torch.round(flat * inv[:, None]).clamp_(-nmax, nmax - 1)
    return d16.reshape(shape[:-1]), codes.to(torch.int8).reshape(shape)
