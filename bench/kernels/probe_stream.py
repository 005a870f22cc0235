"""How fast can a Triton kernel stream the packed W4 weights? A read-only probe beside the real GEMV.

    python bench/kernels/probe_stream.py          # on a CUDA machine; --smoke on CPU (TRITON_INTERPRET=1)

Each variant reads the int32 [K/8, N] weights once, in [R, BN] tiles with the GEMV's split-K grid, and writes a
xor of each column (so nothing is optimized away): the best any GEMV with that access pattern can do. Variants:
the GEMV's strided tiles (rows of BN words N*4 bytes apart), the same with evict_first, and a tile-contiguous
layout ([N/BN, K/8, BN]: each program's block is one contiguous run). Beside them, in the same run: bf16
F.linear and the W4A16 GEMV the chooser picks, timed as CUDA graphs over rotating copies (>= 256 MiB).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from harness import header, sibling, smoke_time  # noqa: E402

from hubquant_kernels import _common, w4a16  # noqa: E402

graph_time = sibling("run").graph_time


@triton.jit
def _stream_kernel(qw_ptr, out_ptr, N, K8, rows_per_split, R: tl.constexpr, BN: tl.constexpr,
                   TILED: tl.constexpr, EVICT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    r0 = pid_k * rows_per_split
    offs_c = tl.arange(0, BN)
    acc = tl.zeros((R, BN), dtype=tl.int32)
    for r in range(r0, r0 + rows_per_split, R):
        offs_r = r + tl.arange(0, R)
        if TILED:
            ptrs = qw_ptr + (pid_n * K8 + offs_r[:, None]) * BN + offs_c[None, :]
        else:
            ptrs = qw_ptr + offs_r[:, None] * N + (pid_n * BN + offs_c)[None, :]
        if EVICT:
            acc ^= tl.load(ptrs, eviction_policy="evict_first")
        else:
            acc ^= tl.load(ptrs)
    x = tl.reduce(acc, 0, _xor)
    tl.store(out_ptr + pid_k * N + pid_n * BN + offs_c, x)


@triton.jit
def _xor(a, b):
    return a ^ b


def stream(qw, out, k8, n, *, r, bn, split, tiled, evict, warps, stages):
    _stream_kernel[(n // bn, split)](qw, out, n, k8, k8 // split, R=r, BN=bn, TILED=tiled, EVICT=evict,
                                     num_warps=warps, num_stages=stages)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_stream.json")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    shapes = [(256, 128)] if args.smoke else [(8192, 8192), (4096, 28672), (14336, 4096)]
    res = {**header(dev), "rows": []}
    gt = graph_time if dev == "cuda" else smoke_time
    for k, n in shapes:
        g = torch.Generator(device=dev).manual_seed(1)
        qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (k // 8, n), device=dev, generator=g, dtype=torch.int32)
        nbytes = qw.numel() * 4
        reps = 1 if args.smoke else max(1, min(64, math.ceil((256 << 20) / nbytes)))
        copies = [qw.clone() for _ in range(reps)]
        out = torch.empty(64 * n, dtype=torch.int32, device=dev)
        ref = None
        for bn in (64, 128):
            tiled_copies = [c.reshape(k // 8, n // bn, bn).permute(1, 0, 2).contiguous() for c in copies]
            for r in (32, 64):
                for warps in (4, 8):
                    for split in (1, 2, 4, 8, 16):
                        tiles = (n // bn) * split
                        if (k // 8) % (split * r) or tiles < 132 and split != 16 or tiles > 4096:
                            continue
                        for tiled, evict in ((False, False), (False, True), (True, False)):
                            src = tiled_copies if tiled else copies
                            kw = dict(r=r, bn=bn, split=split, tiled=tiled, evict=evict, warps=warps, stages=3)
                            try:
                                stream(src[0], out, k // 8, n, **kw)
                                got = out[:n].clone() if split == 1 else None
                                t = gt([lambda c=c: stream(c, out, k // 8, n, **kw) for c in src])
                            except Exception as e:  # noqa: BLE001
                                print("failed", kw, repr(e)[:200])
                                continue
                            res["rows"].append({"K": k, "N": n, **kw, "us": t * 1e6, "TBps": nbytes / t / 1e12})
                            if got is not None:
                                ref = got if ref is None else ref
        # references in the same run
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        bfw = [w.clone() for _ in range(1 if args.smoke else max(1, math.ceil((256 << 20) / (2 * n * k))))]
        t_bf = gt([lambda ww=ww: torch.nn.functional.linear(x, ww) for ww in bfw])
        sc = torch.rand(k // 128, n, device=dev, dtype=torch.bfloat16) * 0.01
        w4a16.w4a16_matmul(x, copies[0], sc, None, 128)
        t_w4 = gt([lambda c=c: w4a16.w4a16_matmul(x, c, sc, None, 128) for c in copies])
        best = sorted((r for r in res["rows"] if r["K"] == k and r["N"] == n), key=lambda r: r["us"])
        res.setdefault("refs", []).append({"K": k, "N": n, "bf16_us": t_bf * 1e6, "w4a16_us": t_w4 * 1e6,
                                           "w4a16_impl": str(_common.chosen()), "bytes": nbytes})
        print(f"K={k} N={n}: bf16 {t_bf * 1e6:.1f} us, W4A16 {t_w4 * 1e6:.1f} us ({nbytes / t_w4 / 1e12:.2f} TB/s of "
              f"packed words); read-only best per kind:")
        for kind in ((False, False), (False, True), (True, False)):
            rows = [r for r in best if (r["tiled"], r["evict"]) == kind]
            if rows:
                b = rows[0]
                print(f"   tiled={kind[0]!s:5} evict={kind[1]!s:5}: {b['us']:.1f} us {b['TBps']:.2f} TB/s "
                      f"(r{b['r']} bn{b['bn']} s{b['split']} w{b['warps']})")
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
