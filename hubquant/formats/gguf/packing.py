"""Bytes of GGUF blocks, laid out exactly as ggml's block structs (ggml-common.h): `pack(grid)` returns
uint8 [rows, row_bytes] that `gguf.quants.dequantize` reads back to `grid.dequantize()`."""
from __future__ import annotations

import numpy as np
import torch

from hubquant.formats.gguf.blocks import QK_K, TYPES, Grid


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).contiguous().numpy().reshape(-1, 1).view(np.uint8)


def _u8(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy().astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[N, 2, k] -> [N, k]: the first half in the low nibbles, the second in the high ones."""
    return (q[:, 0] & 0x0F) | ((q[:, 1] & 0x0F) << 4)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """2-bit values [N, 256] into 64 bytes: value e goes to byte 32 (e // 128) + e % 32, bits 2 ((e % 128) // 32)."""
    q = q.reshape(-1, 2, 4, 32)
    out = np.zeros((q.shape[0], 2, 32), dtype=np.uint8)
    for s in range(4):
        out |= (q[:, :, s] & 3) << (2 * s)
    return out.reshape(-1, 64)


def _bitplane(bits: np.ndarray, planes: int) -> np.ndarray:
    """One bit per value [N, planes * 32] into 32 bytes: value e is bit e // 32 of byte e % 32."""
    b = bits.reshape(-1, planes, 32)
    out = np.zeros((b.shape[0], 32), dtype=np.uint8)
    for i in range(planes):
        out |= (b[:, i] & 1) << i
    return out


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [N, 8] into Q4_K/Q5_K's 12 bytes."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _q3_scales(v: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit values [N, 16] into Q3_K's 12 bytes."""
    out = np.empty((v.shape[0], 12), dtype=np.uint8)
    out[:, :8] = (v[:, :8] & 0x0F) | ((v[:, 8:] & 0x0F) << 4)
    hi = np.zeros((v.shape[0], 4), dtype=np.uint8)
    for k in range(4):
        hi |= ((v[:, 4 * k: 4 * k + 4] >> 4) & 3) << (2 * k)
    out[:, 8:] = hi
    return out


def pack(grid: Grid) -> np.ndarray:
    """uint8 [rows, cols / block * block_bytes] in ggml's layout for `grid.qtype`."""
    rows, cols = grid.codes.shape
    info = TYPES[grid.qtype]
    n = rows * cols // info.block
    codes = grid.codes.contiguous().numpy().astype(np.int16).reshape(n, info.block)
    f = grid.fields
    t = grid.qtype
    if t == "Q8_0":
        parts = [_f16(f["d"]), codes.astype(np.int8).view(np.uint8)]
    elif t in ("Q4_0", "Q4_1"):
        q = (codes + (8 if t == "Q4_0" else 0)).astype(np.uint8)
        parts = [_f16(f["d"])] + ([_f16(f["m"])] if t == "Q4_1" else []) + [_nibbles(q.reshape(n, 2, 16))]
    elif t in ("Q5_0", "Q5_1"):
        q = (codes + (16 if t == "Q5_0" else 0)).astype(np.uint8)
        qh = np.packbits((q >> 4).astype(np.uint8), axis=-1, bitorder="little")
        parts = [_f16(f["d"])] + ([_f16(f["m"])] if t == "Q5_1" else []) + [qh, _nibbles(q.reshape(n, 2, 16))]
    elif t in ("Q4_K", "Q5_K"):
        q = codes.astype(np.uint8)
        scales = _k_scales(_u8(f["sc"]).reshape(n, 8), _u8(f["m"]).reshape(n, 8))
        ql = _nibbles(q.reshape(n * 4, 2, 32)).reshape(n, 128)
        qh = [_bitplane(q >> 4, 8)] if t == "Q5_K" else []
        parts = [_f16(f["d"]), _f16(f["dmin"]), scales] + qh + [ql]
    elif t == "Q6_K":
        q = (codes + 32).astype(np.uint8)
        ql = _nibbles(q.reshape(n * 2, 2, 64)).reshape(n, 128)
        q4 = (q >> 4).reshape(n, 2, 4, 32)
        qh = np.zeros((n, 2, 32), dtype=np.uint8)
        for s in range(4):
            qh |= (q4[:, :, s] & 3) << (2 * s)
        sc = f["sc"].contiguous().numpy().astype(np.int8).reshape(n, 16).view(np.uint8)
        parts = [ql, qh.reshape(n, 64), sc, _f16(f["d"])]
    elif t == "Q3_K":
        u = (codes + 4).astype(np.uint8)
        v = (f["sc"].contiguous().numpy().astype(np.int16).reshape(n, 16) + 32).astype(np.uint8)
        parts = [_bitplane(u >> 2, 8), _crumbs(u & 3), _q3_scales(v), _f16(f["d"])]
    elif t == "Q2_K":
        q = codes.astype(np.uint8)
        scales = (_u8(f["sc"]).reshape(n, 16) & 0x0F) | (_u8(f["m"]).reshape(n, 16) << 4)
        parts = [scales, _crumbs(q), _f16(f["d"]), _f16(f["dmin"])]
    else:  # pragma: no cover - TYPES and this function list the same types
        raise KeyError(t)
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] * 8 == info.bits * info.block, (t, blocks.shape)
    return blocks.reshape(rows, -1)


def row_bytes(qtype: str, cols: int) -> int:
    info = TYPES[qtype]
    return int(cols // info.block * info.bits * info.block / 8)


__all__ = ["pack", "row_bytes", "QK_K"]
