"""Compile every W4A16 candidate of a sweep in parallel worker processes, so the timing process finds them in
Triton's disk cache (one process compiles one kernel at a time: a few hundred configurations would take minutes).

    python bench/kernels/warm.py --shapes 8192x8192,4096x4096 --ms 16,64 --workers 14   # on a CUDA machine

Each worker builds the same problem shapes (M, N, K multiples of 16 and 16-byte aligned tensors, as the timed
calls have, so Triton specializes them the same way) and calls its share of the candidates once.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]


def _work(job: tuple) -> tuple[int, int, float]:
    """Compile job = (worker index, worker count, shapes, ms, device): candidates i with i % count == index."""
    index, count, shapes, ms, dev = job
    import torch

    from hubquant_kernels import pack, w4a16

    t0, done, failed, i = time.time(), 0, 0, 0
    for k, n in shapes:
        qw = pack.pack_kn(torch.randint(0, 16, (k, n), device=dev))
        sc = (torch.rand(k // 128, n, device=dev) * 0.01 + 1e-3).to(torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            for c in w4a16.candidates(m, n, k, 128):
                i += 1
                if i % count != index:
                    continue
                try:
                    c.fn(x, qw, sc, None, None, y, 128)
                    done += 1
                except Exception:  # noqa: BLE001  (the sweep records the failure when it times it)
                    failed += 1
    if dev == "cuda":
        torch.cuda.synchronize()
    return done, failed, time.time() - t0


def warm(shapes: list[tuple[int, int]], ms: list[int], workers: int, dev: str = "cuda") -> dict:
    """Compile in `workers` spawned processes (the environment, HUBQUANT_W4_SWEEP included, is inherited)."""
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        out = pool.map(_work, [(i, workers, shapes, ms, dev) for i in range(workers)])
    return {"compiled": sum(o[0] for o in out), "failed": sum(o[1] for o in out), "seconds": time.time() - t0,
            "workers": workers}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x8192")
    ap.add_argument("--ms", default="16,64")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes")
    args = ap.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    print(warm(shapes, ms, args.workers, "cpu" if args.smoke else "cuda"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
