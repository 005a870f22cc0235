"""Where the M=1 W4A16 GEMV loses time, on a CUDA machine, in one process:

    python bench/kernels/probe_gemv.py --out probe.json
    ncu --clock-control none --nvtx --nvtx-include "probe/" python bench/kernels/probe_gemv.py --ncu

1. Streaming ceiling of the kernel layout: a read-only kernel that walks the packed weights [K/8, N] exactly as
   the GEMV does (one [BK/8, BN] tile per step, split-K over programs, the next tile prefetched into registers)
   and only XORs the words, so its time is what the layout, tile and grid allow without the arithmetic. Timed as
   CUDA-graph replays over rotating weight copies (cold weights), for the GEMV's tile shapes.
2. With --ncu: bf16 F.linear, tinygemm and the GEMV configurations once each inside an NVTX range "probe", for
   Nsight Compute's counters (achieved occupancy, DRAM throughput, issue activity, warp stall reasons).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(Path(__file__).resolve().parent)]

import peers  # noqa: E402
from harness import header, sibling, w4_weights  # noqa: E402

from hubquant_kernels import w4a16_gemv, w4a16_gemv3  # noqa: E402

graph_time = sibling("run").graph_time


@triton.jit
def _tile_read_kernel(qw_ptr, out_ptr, N, rows_per_prog, stride_w, BN: tl.constexpr, R: tl.constexpr,
                      DEPTH: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    r0 = pid_k * rows_per_prog
    ar = tl.arange(0, R)
    acc = tl.zeros((R, BN), dtype=tl.int32)
    nxt = tl.load(qw_ptr + (r0 + ar)[:, None] * stride_w + offs_n[None, :], eviction_policy="evict_first")
    if DEPTH == 2:
        nxt2 = tl.load(qw_ptr + (r0 + R + ar)[:, None] * stride_w + offs_n[None, :], eviction_policy="evict_first")
    for r in range(r0, r0 + rows_per_prog, R):
        cur = nxt
        if DEPTH == 2:
            nxt = nxt2
            ahead = tl.where(r + 3 * R <= r0 + rows_per_prog, r + 2 * R, r)
            nxt2 = tl.load(qw_ptr + (ahead + ar)[:, None] * stride_w + offs_n[None, :], eviction_policy="evict_first")
        else:
            ahead = tl.where(r + 2 * R <= r0 + rows_per_prog, r + R, r)
            nxt = tl.load(qw_ptr + (ahead + ar)[:, None] * stride_w + offs_n[None, :], eviction_policy="evict_first")
        acc ^= cur
    tl.store(out_ptr + (pid_k * N + offs_n), tl.sum(acc, axis=0))


def tile_read(qws, k: int, n: int, bn: int, bk: int, split: int, warps: int, depth: int) -> float:
    """Seconds per pass of the read-only walk over one weight copy (rotating over qws)."""
    rows = k // 8
    per = rows // split
    out = torch.empty(split * n, dtype=torch.int32, device="cuda")
    return graph_time([lambda q=q: _tile_read_kernel[(n // bn, split)](q, out, n, per, n, BN=bn, R=bk // 8,
                                                                      DEPTH=depth, num_warps=warps) for q in qws])


STREAM_CFGS = [(bn, bk, s, w, d) for bn, bk, w in ((32, 512, 4), (64, 512, 8), (64, 256, 4), (128, 128, 4),
                                                 (256, 64, 4), (512, 64, 8))
               for s in (1, 4) for d in (1, 2)]
GEMV_CFGS = {  # the best of the sweep (bench/kernels/results/h200_sweep_gemv3.json) per shape, plus contrasts
    (4096, 14336): [("gemv3", dict(bn=64, bk=512, split_k=1, warps=8, stages=1)),
                    ("gemv3", dict(bn=32, bk=512, split_k=1, warps=4, stages=3)),
                    ("gemv2", dict(bn=32, bk=512, split_k=1, warps=4))],
    (8192, 8192): [("gemv3", dict(bn=64, bk=512, split_k=2, warps=8, stages=1)),
                   ("gemv2", dict(bn=32, bk=256, split_k=8, warps=4))],
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe.json")
    ap.add_argument("--ncu", action="store_true", help="run each kernel once in an NVTX range (under ncu)")
    args = ap.parse_args()
    res = {**header("cuda"), "command": " ".join(sys.argv), "stream": []}
    t0 = time.time()
    for (k, n), cfgs in GEMV_CFGS.items():
        g, qw, sc, bf_w, w4_w = w4_weights(k, n, "cuda", 0 if args.ncu else 256 << 20)
        x = torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16)
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        runs = [("bf16", lambda: torch.nn.functional.linear(x, bf_w[0]))]
        tw, tsz = peers.tinygemm_pack(qw, sc, 128)
        runs.append(("tinygemm", lambda: peers.tinygemm(x, tw, tsz, 128)))
        for fam, cfg in cfgs:
            f = w4a16_gemv3.gemv3 if fam == "gemv3" else w4a16_gemv.gemv2
            runs.append((f"{fam} {cfg}", lambda f=f, cfg=cfg: f(x, qw, sc, None, None, y, 128, **cfg)))
        if args.ncu:
            for _, f in runs:  # compile and warm outside the range
                f()
            torch.cuda.synchronize()
            for name, f in runs:
                torch.cuda.nvtx.range_push("probe")
                f()
                torch.cuda.nvtx.range_pop()
                torch.cuda.synchronize()
                print(f"probed {k}x{n} {name}", flush=True)
            continue
        qws = [d[0] for d in w4_w]
        nbytes = k * n // 2
        for bn, bk, s, w, d in STREAM_CFGS:
            if (k // 8) % (s * bk // 8) or (k // 8) // s < 2 * (bk // 8) or n % bn:
                continue
            t = tile_read(qws, k, n, bn, bk, s, w, d)
            row = {"K": k, "N": n, "bn": bn, "bk": bk, "split": s, "warps": w, "depth": d, "us": t * 1e6,
                   "TB_s": nbytes / t / 1e12}
            res["stream"].append(row)
        best = sorted((r for r in res["stream"] if r["K"] == k), key=lambda r: r["us"])[:8]
        for r in best:
            print(f"K={k} N={n} read-only walk bn{r['bn']} bk{r['bk']} s{r['split']} w{r['warps']} d{r['depth']}: "
                  f"{r['us']:.1f} us, {r['TB_s']:.2f} TB/s", flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    res["seconds"] = time.time() - t0
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
