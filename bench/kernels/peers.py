"""What bench/kernels/h200.py compares with, built from the same quantized weights: torch's tinygemm int4 kernel
(`aten._weight_int4pack_mm`), gemlite (if installed), a read-only streaming kernel for the read-bandwidth
ceiling, and simple RTN quantizers for the FP4 and 8-bit variants."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hubquant_kernels import fp4, pack


# ---------------------------------------------------------------- read bandwidth: a read-only stream
@triton.jit
def _read_kernel(src_ptr, out_ptr, n_per_prog, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    pid = tl.program_id(0)
    base = pid * n_per_prog
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(0, n_per_prog, BLOCK * UNROLL):
        for u in tl.static_range(UNROLL):  # UNROLL independent 16-byte loads in flight per thread
            acc ^= tl.load(src_ptr + base + i + u * BLOCK + tl.arange(0, BLOCK), eviction_policy="evict_first")
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def read_bandwidth(graph_time, nbytes: int = 2 << 30) -> dict:
    """Bytes/s of a kernel that only reads (xor-reduces into a tiny output), best of a few grid shapes."""
    n = nbytes // 4
    src = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    best = {}
    for progs_per_sm, block, unroll, warps in ((4, 1024, 4, 4), (8, 1024, 2, 4), (2, 2048, 4, 8), (16, 512, 4, 4)):
        progs = sms * progs_per_sm
        per = -(-n // progs)
        per = -(-per // (block * unroll)) * block * unroll
        progs = n // per
        out = torch.empty(progs * block, dtype=torch.int32, device="cuda")
        t = graph_time([lambda progs=progs, out=out, per=per, block=block, unroll=unroll, warps=warps:
                        _read_kernel[(progs,)](src, out, per, BLOCK=block, UNROLL=unroll, num_warps=warps)])
        bw = progs * per * 4 / t
        if bw > best.get("bytes_per_s", 0):
            best = {"bytes_per_s": bw, "config": f"{progs_per_sm}/SM block{block} unroll{unroll} w{warps}"}
    return best


# ---------------------------------------------------------------- tinygemm (torch's int4 kernel)
def tinygemm_pack(qweight: torch.Tensor, scales: torch.Tensor, group_size: int):
    """(int4pack weight, scale-and-zeros [G, N, 2]) computing the same W as hubquant's symmetric layout:
    tinygemm dequantizes (u - 8) * scale + zero, with zero = 0 here."""
    u = pack.unpack_kn(qweight).t().contiguous().to(torch.int32)  # [N, K] unsigned codes
    packed = ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8)
    w = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
    sz = torch.stack([scales.to(torch.bfloat16), torch.zeros_like(scales, dtype=torch.bfloat16)], -1).contiguous()
    return w, sz


def tinygemm(x, w, sz, group_size):
    return torch.ops.aten._weight_int4pack_mm(x, w, group_size, sz)


# ---------------------------------------------------------------- gemlite
def gemlite_layer(qweight: torch.Tensor, scales: torch.Tensor, group_size: int):
    """A gemlite A16W4 layer over the same codes and scales (zero point 8), or None if gemlite is missing."""
    try:
        from gemlite.helper import A16Wn
    except ImportError:
        return None
    u = pack.unpack_kn(qweight).t().contiguous()  # uint8 [N, K]
    s = scales.t().contiguous().to(torch.bfloat16)
    z = torch.full_like(s, 8.0)
    return A16Wn(device=str(qweight.device), dtype=torch.bfloat16).from_weights(u, s, z, 4, group_size)


# ---------------------------------------------------------------- quantizers for the other variants
def fp4_quantize(w: torch.Tensor, kind: str):
    """Round-to-nearest FP4 of a float weight [N, K]: (packed uint8 [N, K/2], block scales, global scale or None).
    NVFP4: E4M3 block scales of 16 under a global scale (amax / (6 * 448)); MXFP4: E8M0 power-of-two scales of 32."""
    n, k = w.shape
    gs = fp4.KINDS[kind]
    blocks = w.float().reshape(n, k // gs, gs)
    amax = blocks.abs().amax(-1).clamp_min(1e-12)
    if kind == "nvfp4":
        gscale = (448.0 * 6.0 / w.float().abs().max()).reshape(1)
        bscale = (amax / 6.0 * gscale).clamp(max=448.0).to(torch.float8_e4m3fn)
        eff = bscale.float() / gscale
    else:
        gscale = None
        e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
        bscale = (e + 127).to(torch.uint8)
        eff = torch.pow(2.0, e)
    q = blocks / eff.clamp_min(1e-30)[..., None]
    grid = torch.tensor(fp4.E2M1_VALUES, device=w.device)
    idx = (q.abs().clamp(max=6.0)[..., None] - grid).abs().argmin(-1)
    codes = (idx | ((q < 0).long() << 3)).reshape(n, k).to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), bscale.contiguous(), gscale


def int8_quantize(w: torch.Tensor):
    s = w.float().abs().amax(1) / 127.5
    return (w.float() / s[:, None]).round().clamp(-128, 127).to(torch.int8), s
