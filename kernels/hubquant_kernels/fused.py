"""Small fused kernels for batch-1 decoding: one launch where the transformers modules issue 5-12.

- `add_rmsnorm`: (optional residual add) + RMSNorm, Llama/Qwen2 rounding (normalize in fp32, round to the
  activation dtype, multiply by the weight);
- `silu_mul`: SiLU(gate) * up on the fused [.., 2I] gate/up output;
- `rope_to_cache`: rotary embedding of q and k from a fused [T, (H + 2 KV) D] q/k/v output, q written as
  [1, H, T, D] and k, v written straight into the static KV cache at their positions;
- `add_rmsnorm_quant` / `silu_mul_quant`: the same norm / activation followed by W8A8 per-token quantization
  (int8 or FP8 codes + fp32 scales), so a W8A8/FP8 layer runs no separate quantization pass before q/k/v,
  gate/up and down_proj.

Each rounds where the torch code it replaces rounds (every bf16 op result), so outputs match it closely (bit for
bit on the CPU interpreter in the tests). Each has a torch reference beside it, used on CPU.
"""
from __future__ import annotations

import torch

from hubquant_kernels._common import interpreting, use_triton
from hubquant_kernels.w8a8 import quantize_act, quantize_act_reference

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None


# ---------------------------------------------------------------- torch references
def add_rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                          residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(h), h) with h = x + residual (or x), as LlamaRMSNorm computes it."""
    h = x if residual is None else x + residual
    h32 = h.to(torch.float32)
    n = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * n.to(h.dtype), h


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    g, u = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def add_rmsnorm_quant_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                                residual: torch.Tensor | None = None, *, fp8: bool = False
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, per-token scales, h): `add_rmsnorm_reference`'s output quantized by `quantize_act_reference`."""
    y, h = add_rmsnorm_reference(x, weight, eps, residual)
    q, s = quantize_act_reference(y.reshape(-1, y.shape[-1]), fp8=fp8)
    return q.reshape(y.shape), s.reshape(y.shape[:-1]), h


def silu_mul_quant_reference(gate_up: torch.Tensor, *, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, per-token scales) of SiLU(gate) * up, rounded to gate_up's dtype first."""
    a = silu_mul_reference(gate_up)
    q, s = quantize_act_reference(a.reshape(-1, a.shape[-1]), fp8=fp8)
    return q.reshape(a.shape), s.reshape(a.shape[:-1])


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_to_cache_reference(qkv, cos, sin, positions, k_cache, v_cache, n_heads: int, n_kv: int) -> torch.Tensor:
    """q [B, H, T, D] rotated; k (rotated) and v written into the caches [B, KV, L, D] at `positions` (qkv holds
    B sequences of T rows each, all at the same positions)."""
    b, t, d = k_cache.shape[0], positions.shape[0], k_cache.shape[-1]
    q, k, v = qkv.view(b, t, n_heads + 2 * n_kv, d).split((n_heads, n_kv, n_kv), dim=2)
    c, s = cos[:, None, :], sin[:, None, :]
    q = _rotate(q, c, s).transpose(1, 2)
    k_cache.index_copy_(2, positions, _rotate(k, c, s).transpose(1, 2))
    v_cache.index_copy_(2, positions, v.transpose(1, 2))
    return q


# ---------------------------------------------------------------- Triton kernels
if triton is not None:

    from hubquant_kernels.pack import _round_to_bf16
    from hubquant_kernels.w8_tiles import _quant_tile, _row_scale

    @triton.jit
    def _round_to(v, ROUND: tl.constexpr):
        # fp32 -> the activation dtype's nearest value, kept in fp32 (0: fp32, 1: bf16, 2: fp16); exact in the
        # CPU interpreter too, so the quantized codes see the values the unfused torch code rounds to
        if ROUND == 1:
            r = _round_to_bf16(v)
        elif ROUND == 2:
            r = v.to(tl.float16).to(tl.float32)
        else:
            r = v
        return r

    @triton.jit
    def _norm_rows(h, w, inv_h, eps, ROUND: tl.constexpr):
        """weight * rmsnorm(h) for fp32 rows h [BM, BLOCK], as LlamaRMSNorm computes it on a CUDA tensor: the
        squares rounded (no FMA: the kernels are compiled without fp fusion), their sum times the fp32 1/H (torch's
        mean), rsqrt (CUDA's rsqrtf), the product rounded to the activation dtype, then times the weight, rounded.
        Only the order of the sum differs from torch's."""
        var = tl.sum(h * h, axis=1) * inv_h
        n = _round_to(h * tl.math.rsqrt(var + eps)[:, None], ROUND)
        return _round_to(w[None, :] * n, ROUND)

    @triton.jit
    def _silu_mul(g, u, ROUND: tl.constexpr, PRECISE: tl.constexpr):
        """SiLU(g) * u as torch computes it (F.silu = g / (1 + expf(-g)) with IEEE division, rounded to the
        activation dtype, then the product, rounded). PRECISE: CUDA's expf (libdevice); the CPU interpreter, which
        has no libdevice, uses numpy's exp."""
        g = g.to(tl.float32)
        if PRECISE:
            e = libdevice.exp(-g)
        else:
            e = tl.exp(-g)
        return _round_to(_round_to(tl.math.div_rn(g, 1.0 + e), ROUND) * u.to(tl.float32), ROUND)

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, H, inv_h, eps,
                            HAS_RES: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        h = tl.load(x_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h = _round_to(h + tl.load(r_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32), ROUND)
            tl.store(h_ptr + row * H + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * H + offs, _norm_rows(h[None, :], w, inv_h, eps, ROUND).reshape(BLOCK)
                 .to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, y_ptr, inter, ROUND: tl.constexpr, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < inter
        g = tl.load(gu_ptr + row * 2 * inter + offs, mask=mask, other=0.0)
        u = tl.load(gu_ptr + row * 2 * inter + inter + offs, mask=mask, other=0.0)
        tl.store(y_ptr + row * inter + offs, _silu_mul(g, u, ROUND, PRECISE).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, T, L,
                           NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, ROUND: tl.constexpr):
        bt = tl.program_id(0)  # sequence b, token t: row b * T + t of qkv (every sequence at the same positions)
        b = bt // T
        t = bt % T
        hd = tl.program_id(1)
        half: tl.constexpr = D // 2
        offs = tl.arange(0, half)
        src = qkv_ptr + (bt * (NH + 2 * NKV) + hd) * D
        x1 = tl.load(src + offs)
        x2 = tl.load(src + half + offs)
        dt = x1.dtype
        pos = tl.load(pos_ptr + t)
        if hd < NH + NKV:
            c1 = tl.load(cos_ptr + t * D + offs).to(tl.float32)
            c2 = tl.load(cos_ptr + t * D + half + offs).to(tl.float32)
            s1 = tl.load(sin_ptr + t * D + offs).to(tl.float32)
            s2 = tl.load(sin_ptr + t * D + half + offs).to(tl.float32)
            a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
            # (x * cos) + (rotate_half(x) * sin), each product rounded like the torch ops
            o1 = _round_to(_round_to(a1 * c1, ROUND) + _round_to(-(a2 * s1), ROUND), ROUND).to(dt)
            o2 = _round_to(_round_to(a2 * c2, ROUND) + _round_to(a1 * s2, ROUND), ROUND).to(dt)
            if hd < NH:
                dst = q_ptr + ((b * NH + hd) * T + t) * D
            else:
                dst = kc_ptr + ((b * NKV + hd - NH) * L + pos) * D
            tl.store(dst + offs, o1)
            tl.store(dst + half + offs, o2)
        else:
            dst = vc_ptr + ((b * NKV + hd - NH - NKV) * L + pos) * D
            tl.store(dst + offs, x1)
            tl.store(dst + half + offs, x2)


    @triton.jit
    def _add_rmsnorm_quant_kernel(x_ptr, r_ptr, w_ptr, q_ptr, s_ptr, h_ptr, M, H, inv_h, eps,
                                  HAS_RES: tl.constexpr, ROUND: tl.constexpr, FP8: tl.constexpr,
                                  BM: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, BLOCK)
        rmask = rows < M
        cmask = cols < H
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h = _round_to(h + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32), ROUND)
            tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = _norm_rows(h, w, inv_h, eps, ROUND)
        s = _row_scale(tl.max(tl.abs(y), axis=1), FP8)
        tl.store(q_ptr + offs, _quant_tile(y, s, FP8, 1), mask=mask)
        tl.store(s_ptr + rows, s, mask=rmask)

    @triton.jit
    def _silu_mul_quant_kernel(gu_ptr, q_ptr, s_ptr, M, inter, ROUND: tl.constexpr, FP8: tl.constexpr,
                               PRECISE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
        # two passes over the row in BK chunks: the row maximum of SiLU(g) * u, then the codes (the second pass
        # recomputes the product from gate/up, which the first pass left in L2)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        cols = tl.arange(0, BK)
        g_rows = gu_ptr + rows.to(tl.int64)[:, None] * (2 * inter)
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * inter
        amax = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, inter, BK):
            mask = rmask[:, None] & (k0 + cols < inter)[None, :]
            g = tl.load(g_rows + k0 + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_last")
            u = tl.load(g_rows + inter + k0 + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_last")
            amax = tl.maximum(amax, tl.max(tl.abs(_silu_mul(g, u, ROUND, PRECISE)), axis=1))
        s = _row_scale(amax, FP8)
        for k0 in range(0, inter, BK):
            mask = rmask[:, None] & (k0 + cols < inter)[None, :]
            g = tl.load(g_rows + k0 + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
            u = tl.load(g_rows + inter + k0 + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
            tl.store(q_rows + k0 + cols[None, :], _quant_tile(_silu_mul(g, u, ROUND, PRECISE), s, FP8, 1), mask=mask)
        tl.store(s_ptr + rows, s, mask=rmask)


def _round_code(dtype: torch.dtype) -> int:
    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]


def _inv(n: int) -> float:
    """1/n rounded once to fp32 (torch's mean multiplies by this factor); exact as a Python float argument."""
    return float(torch.tensor(1.0, dtype=torch.float32) / n)


# compiled without FMA contraction: the squares are rounded before they are summed, as torch's pow(2) rounds them
_NO_FMA = {"enable_fp_fusion": False}


# ---------------------------------------------------------------- wrappers
def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual) in one launch; the second is x itself without residual.

    Args:
        x: [..., H] activations (contiguous).
        weight: [H] norm weight in x's dtype.
        eps: the norm's epsilon.
        residual: optional [..., H] added to x first.

    Returns:
        The normalized activations and the (new) residual stream.
    """
    if not use_triton(x) or weight.dtype != x.dtype:
        return add_rmsnorm_reference(x, weight, eps, residual)
    hsz = x.shape[-1]
    x = x.contiguous()
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x
    _add_rmsnorm_kernel[(x.numel() // hsz,)](x, residual.contiguous() if residual is not None else x, weight, y, h,
                                            hsz, _inv(hsz), eps, HAS_RES=residual is not None,
                                            ROUND=_round_code(x.dtype), BLOCK=triton.next_power_of_2(hsz),
                                            num_warps=4, **_NO_FMA)
    return y, h


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up = [..., 2I] (gate first), in one launch."""
    if not use_triton(gate_up):
        return silu_mul_reference(gate_up)
    two_i = gate_up.shape[-1]
    gate_up = gate_up.contiguous()
    rows = gate_up.numel() // two_i
    y = torch.empty(*gate_up.shape[:-1], two_i // 2, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(two_i // 2, block))](gate_up, y, two_i // 2, ROUND=_round_code(y.dtype),
                                                             PRECISE=not interpreting(), BLOCK=block, num_warps=4)
    return y


def rope_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """Rotary embedding of the fused q/k/v output; k and v go into the caches, q is returned.

    Args:
        qkv: [B * T, (H + 2 KV) * D] (q heads, then k heads, then v heads), B sequences of T tokens.
        cos, sin: [T, D] from the model's rotary embedding.
        positions: [T] cache slots (int64), the same for every sequence.
        k_cache, v_cache: [B, KV, L, D], written in place.
        n_heads, n_kv: H and KV.

    Returns:
        q [B, H, T, D].
    """
    d = k_cache.shape[-1]
    ok = (use_triton(qkv) and d % 2 == 0 and (d // 2) & (d // 2 - 1) == 0 and k_cache.is_contiguous()
          and v_cache.is_contiguous() and cos.dtype == qkv.dtype)
    if not ok:
        return rope_to_cache_reference(qkv, cos, sin, positions, k_cache, v_cache, n_heads, n_kv)
    b, t = k_cache.shape[0], positions.shape[0]
    q = torch.empty(b, n_heads, t, d, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(b * t, n_heads + 2 * n_kv)](qkv.contiguous(), cos.contiguous(), sin.contiguous(), positions,
                                               q, k_cache, v_cache, t, k_cache.shape[2],
                                               NH=n_heads, NKV=n_kv, D=d, ROUND=_round_code(qkv.dtype), num_warps=1,
                                               **_NO_FMA)
    return q


def add_rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                      *, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Residual add +) RMSNorm + per-token W8A8 quantization in one pass over the activations.

    The codes are those `quantize_act` gives for `add_rmsnorm`'s output (the norm is rounded to x's dtype first,
    as the unfused layer rounds it), without writing that output.

    Args:
        x: [..., H] bf16/fp16/fp32 activations.
        weight: [H] norm weight in x's dtype.
        eps: the norm's epsilon.
        residual: optional [..., H] added to x first.
        fp8: float8_e4m3fn codes (scale amax/448) instead of int8 (amax/127.5).

    Returns:
        (codes [M, H] int8 or float8_e4m3fn, scales fp32 [M], h [..., H] = x + residual, or x), M = x.numel() // H.
    """
    hsz = x.shape[-1]
    if not use_triton(x) or weight.dtype != x.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        q, s, h = add_rmsnorm_quant_reference(x, weight, eps, residual, fp8=fp8)
        return q.reshape(-1, hsz), s.reshape(-1), h
    block = triton.next_power_of_2(hsz)
    if block > 16384:  # rows too long to keep in registers: norm, then the tiled quantization kernel
        y, h = add_rmsnorm(x, weight, eps, residual)
        q, s = quantize_act(y.reshape(-1, hsz), fp8=fp8)
        return q, s, h
    x = x.contiguous()
    m = x.numel() // hsz
    q = torch.empty(m, hsz, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    h = torch.empty_like(x) if residual is not None else x
    bm = max(1, min(16, 4096 // block))
    if m:
        _add_rmsnorm_quant_kernel[(triton.cdiv(m, bm),)](
            x, residual.contiguous() if residual is not None else x, weight, q, s, h, m, hsz, _inv(hsz), eps,
            HAS_RES=residual is not None, ROUND=_round_code(x.dtype), FP8=fp8, BM=bm, BLOCK=block,
            num_warps=max(4, min(16, bm * block // 512)), **_NO_FMA)  # ~16 values of each operand per thread
    return q, s, h


def silu_mul_quant(gate_up: torch.Tensor, *, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(gate) * up (gate_up = [..., 2I], gate first) + per-token W8A8 quantization, without writing the product.

    Returns:
        (codes [M, I] int8 or float8_e4m3fn, scales fp32 [M]); the codes are `quantize_act` of `silu_mul`'s output.
    """
    two_i = gate_up.shape[-1]
    if not use_triton(gate_up) or gate_up.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        q, s = silu_mul_quant_reference(gate_up, fp8=fp8)
        return q.reshape(-1, two_i // 2), s.reshape(-1)
    inter = two_i // 2
    gate_up = gate_up.contiguous()
    m = gate_up.numel() // two_i
    q = torch.empty(m, inter, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=gate_up.device)
    s = torch.empty(m, dtype=torch.float32, device=gate_up.device)
    # tiles of 4096 values, 16 warps: at most 4 programs per SM, so the rows between a program's two passes
    # (4 x 132 x 2I bf16, ~30 MB at I = 14336) stay within L2
    bk = min(4096, triton.next_power_of_2(inter))
    bm = max(1, min(8, 4096 // bk))
    if m:
        _silu_mul_quant_kernel[(triton.cdiv(m, bm),)](gate_up, q, s, m, inter, ROUND=_round_code(gate_up.dtype),
                                                      FP8=fp8, PRECISE=not interpreting(), BM=bm, BK=bk,
                                                      num_warps=16)
    return q, s
