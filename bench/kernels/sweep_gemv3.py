"""One-call GPU sweep of the small-M W4A16 kernels (the rotated-code GEMV w4a16_gemv3, the tensor-core GEMV
w4a16_mmv) against the other W4A16 candidates, bf16 cuBLAS and torch's tinygemm, in one process, same weights.

    python bench/kernels/sweep_gemv3.py --out sweep.json                  # on a CUDA machine
    python bench/kernels/sweep_gemv3.py --smoke --out /tmp/smoke.json     # CPU, TRITON_INTERPRET=1

1. Correctness: gemv3 configurations (register prefetch and cp.async pipelines, BM 1/4/8 rows, split-K) on odd
   shapes, group sizes 32/64/128/-1, sym/asym, bf16/fp16, bias, against float64; the output is NaN-poisoned
   before each call and each configuration runs twice (the split-K workspace must come back zeroed).
   The MMA GEMV: every third configuration per case, M = 1-16, on the stored layout and on column slices.
2. Per shape and M (default 1, 8, 16, 64): bf16 F.linear and tinygemm; three W4A16 families, each picked by
   hubquant's chooser (cold L2): "old" (every default candidate but gemv3 and the MMA GEMV), gemv3, the MMA GEMV;
   the best few of each timed as CUDA-graph replays over rotating weight copies (>= 256 MiB), every timed output
   checked against float64. "best" is the fastest family (all three are offered by default).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(Path(__file__).resolve().parent)]
os.environ.setdefault("HUBQUANT_TUNE_CACHE", "0")

import peers  # noqa: E402
from harness import header, sibling, smoke_time, w4_weights  # noqa: E402

from hubquant_kernels import _common, pack, w4a16, w4a16_gemv3, w4a16_mmv  # noqa: E402

_run = sibling("run")
graph_time, rel_err = _run.graph_time, _run.rel_err
DEV = "cuda"
SHAPES = [(8192, 8192), (4096, 14336), (14336, 4096), (4096, 4096)]  # (K, N)
CHECK_CONFIGS = [dict(bn=64, bk=128, split_k=1, stages=1), dict(bn=32, bk=256, split_k=3, stages=4),
                 dict(bn=128, bk=64, split_k=2, stages=3), dict(bn=64, bk=128, split_k=2, stages=3, bm=4),
                 dict(bn=32, bk=128, split_k=1, stages=1, bm=8), dict(bn=256, bk=64, split_k=4, stages=5),
                 dict(bn=64, bk=128, split_k=3, stages=4, nt=2), dict(bn=32, bk=256, split_k=1, stages=1, nt=2)]


MMV_CASES = [(1, 256, 1024, 128, False, torch.bfloat16), (3, 544, 2048, 128, True, torch.float16),
             (8, 4096, 4096, 128, False, torch.bfloat16), (5, 1024, 768, -1, True, torch.bfloat16),
             (1, 4096, 14336, 128, True, torch.bfloat16), (2, 128, 512, 256, False, torch.float16),
             (12, 1024, 2048, 128, True, torch.bfloat16), (16, 4096, 4096, 128, False, torch.float16)]


def _problem(g, m, n, k, gs, asym, dt):
    """A seeded random W4A16 problem and its float64 product: (group, qweight, scales, zeros, x, bias, ref)."""
    gsz = k if gs == -1 else gs
    qw = pack.pack_kn(torch.randint(0, 16, (k, n), device=DEV, generator=g))
    s = (torch.rand(k // gsz, n, device=DEV, generator=g) * 0.02 + 1e-3).to(dt)
    z = torch.randint(0, 16, (k // gsz, n), device=DEV, generator=g).to(torch.uint8) if asym else None
    x = torch.randn(m, k, device=DEV, generator=g).to(dt)
    b = torch.randn(n, device=DEV, generator=g).to(dt)
    return gsz, qw, s, z, x, b, x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()


def mmv_checks(g) -> list[dict]:
    """Every third MMA GEMV configuration per case (warps, split-K, prefetch) against float64, on the stored layout
    and, for every second case, on a column slice of a wider weight (as fused q/k/v and gate/up layers pass)."""
    out = []
    for i, (m, n, k, gs, asym, dt) in enumerate(MMV_CASES if DEV == "cuda" else MMV_CASES[:2]):
        gsz, qw, s, z, x, b, ref = _problem(g, m, n, k, gs, asym, dt)
        if i % 2:
            wide = torch.zeros(qw.shape[0], n + 64, dtype=qw.dtype, device=DEV)
            wide[:, :n] = qw
            qw = wide[:, :n]
        for c in w4a16_mmv.candidates(m, n, k, gsz)[i % 3::3]:
            y1 = torch.full((m, n), float("nan"), dtype=dt, device=DEV)
            y2 = torch.full((m, n), float("nan"), dtype=dt, device=DEV)
            try:
                c.fn(x, qw, s, z, b, y1, gsz)
                c.fn(x, qw, s, z, b, y2, gsz)
                e = rel_err(y1, ref)
                ok = e < 1e-2 and not torch.isnan(y1).any().item() and torch.allclose(y1, y2, rtol=1e-2, atol=1e-2)
            except Exception as ex:  # noqa: BLE001
                e, ok = repr(ex)[:300], False
            out.append({"shape": [m, n, k], "group": gs, "asym": asym, "dtype": str(dt), "cfg": c.name, "asm": True,
                        "slice": bool(i % 2), "rel_err": e, "ok": bool(ok)})
    return out


def checks(log, mmv_only: bool = False) -> list[dict]:
    out = []
    g = torch.Generator(device=DEV).manual_seed(0)
    cases = [(1, 72, 512, 32, False, torch.bfloat16), (3, 200, 1024, 64, True, torch.float16),
             (8, 136, 768, -1, True, torch.bfloat16), (1, 4096, 4096, 128, False, torch.bfloat16),
             (5, 264, 2048, 128, True, torch.bfloat16), (16, 1024, 4096, 128, False, torch.float16),
             (1, 520, 1024, 64, True, torch.float16)]
    for (m, n, k, gs, asym, dt) in [] if mmv_only else cases if DEV == "cuda" else cases[:3]:
        gsz, qw, s, z, x, b, ref = _problem(g, m, n, k, gs, asym, dt)
        for cfg in CHECK_CONFIGS:
            for asm in (True, False) if DEV == "cuda" and cfg is CHECK_CONFIGS[0] else (DEV == "cuda",):
                y1 = torch.full((m, n), float("nan"), dtype=dt, device=DEV)
                y2 = torch.full((m, n), float("nan"), dtype=dt, device=DEV)
                try:
                    w4a16_gemv3.gemv3(x, qw, s, z, b, y1, gsz, asm=asm, **cfg)
                    w4a16_gemv3.gemv3(x, qw, s, z, b, y2, gsz, asm=asm, **cfg)
                    e = rel_err(y1, ref)
                    ok = e < 1e-2 and not torch.isnan(y1).any().item() and torch.equal(y1, y2)
                except Exception as ex:  # noqa: BLE001  (a failing configuration is a failed check, not a crash)
                    e, ok = repr(ex)[:300], False
                out.append({"shape": [m, n, k], "group": gs, "asym": asym, "dtype": str(dt), "cfg": cfg, "asm": asm,
                            "rel_err": e, "ok": bool(ok)})
    out += mmv_checks(g)
    bad = [c for c in out if not c["ok"]]
    worst = max((c["rel_err"] for c in out if isinstance(c["rel_err"], float)), default=float("nan"))
    log(f"gemv3 and mmv checks: {len(out) - len(bad)}/{len(out)} pass, worst rel err {worst:.2e}; failures: "
        f"{bad[:3]}")
    mmv = [c for c in out if str(c["cfg"]).startswith("mmv")]
    if mmv and all(c["ok"] for c in mmv):
        log(f"MMV_OK ({len(mmv)} checks)")
    return out


def _pick(key, cands, args):
    """The chooser's cold-L2 pick among cands, with every candidate's time."""
    if DEV != "cuda":
        return cands[0], {c.name: 0.0 for c in cands}
    c = _common.choose(key, cands, args, on_gpu=True)
    return c, _common.TUNE_LOG.get(key, {})


def bench_cell(k, n, m, wts, log, top: int) -> dict:
    g, qw, sc, bf_w, w4_w, tg_w = wts
    x = torch.randn(m, k, device=DEV, generator=g, dtype=torch.bfloat16)
    ref = x.double() @ w4a16.dequantize_reference(qw, sc, None, 128).double()
    cell = {"K": k, "N": n, "M": m}
    cell["bf16"] = graph_time([lambda w=w: torch.nn.functional.linear(x, w) for w in bf_w])
    if tg_w is not None:
        cell["tinygemm"] = graph_time([lambda d=d: peers.tinygemm(x, d[0], d[1], 128) for d in tg_w])
    ys = [torch.empty(m, n, device=DEV, dtype=torch.bfloat16) for _ in w4_w]
    args = (x, qw, sc, None, None, ys[0], 128)
    os.environ["HUBQUANT_GEMV3"] = os.environ["HUBQUANT_MMV"] = "0"
    old = w4a16.candidates(m, n, k, 128)
    os.environ["HUBQUANT_GEMV3"] = os.environ["HUBQUANT_MMV"] = "1"
    fams = (("old", old), ("gemv3", w4a16_gemv3.candidates(m, n, k, 128)), ("mmv", w4a16_mmv.candidates(m, n, k, 128)))
    for fam, cands in fams:
        if not cands:
            continue
        best, tune = _pick(("sweep", fam, m, n, k), cands, args)
        finite = sorted((t, name) for name, t in tune.items() if t != float("inf"))
        names = [name for _, name in finite[:top]] if DEV == "cuda" else [best.name]
        if not names:  # every candidate failed (e.g. a kernel that declined this GPU)
            cell[fam] = {"failed": True, "tune_ms": tune}
            continue
        timed = {}
        for name in names:
            c = next(c for c in cands if c.name == name)
            ys[0].fill_(float("nan"))
            c.fn(x, qw, sc, None, None, ys[0], 128)
            e = rel_err(ys[0], ref)
            t = graph_time([lambda d=d, yy=yy, c=c: c.fn(x, d[0], d[1], None, None, yy, 128)
                            for d, yy in zip(w4_w, ys)])
            timed[name] = {"graph_s": t, "rel_err": e, "ok": bool(e < 1e-2 and not torch.isnan(ys[0]).any().item()),
                           "cold_l2_s": tune.get(name, 0) / 1e3}
        win = min(timed, key=lambda nm: timed[nm]["graph_s"])
        cell[fam] = {"pick": best.name, "best_graph": win, "graph_s": timed[win]["graph_s"], "timed": timed,
                     "n_candidates": len(cands), "tune_ms": tune}
    bf = cell["bf16"]
    best = min((cell[f]["graph_s"], f) for f in ("old", "gemv3", "mmv") if "graph_s" in cell.get(f, {}))
    cell["default_best"] = {"family": best[1], "graph_s": best[0], "x_bf16": bf / best[0]}
    fams = " | ".join(f"{fam} {bf / cell[fam]['graph_s']:.2f}x ({cell[fam]['best_graph']})"
                      for fam in ("old", "gemv3", "mmv") if "graph_s" in cell.get(fam, {}))
    log(f"K={k:5d} N={n:5d} M={m:3d} bf16 {bf * 1e6:7.1f} us | best {bf / best[0]:.2f}x | {fams}"
        + (f" | tinygemm {bf / cell['tinygemm']:.2f}x" if "tinygemm" in cell else ""))
    return cell


def main() -> int:
    global DEV, graph_time
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sweep_gemv3.json")
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--ms", default="1,8,16,64")
    ap.add_argument("--top", type=int, default=4, help="graph-time this many of each family's cold-L2 best")
    ap.add_argument("--workers", type=int, default=15)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--wide", action="store_true", help="time gemv3's wide configuration set")
    ap.add_argument("--mmv-checks-only", action="store_true", help="check only the MMA GEMV (gemv3 checked before)")
    args = ap.parse_args()
    if args.wide:
        os.environ["HUBQUANT_W4_SWEEP_GEMV3"] = "1"
    shapes = SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    if args.smoke:
        DEV, graph_time, shapes, ms = "cpu", smoke_time, [(512, 2112)], [1]
    t0 = time.time()
    res = {**header(DEV), "command": " ".join(sys.argv), "cells": []}

    def log(s):
        print(s, flush=True)

    def save():
        res["seconds"] = round(time.time() - t0, 1)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))

    pool = None
    if DEV == "cuda":  # compile the sweep in worker processes while this one runs the checks
        import multiprocessing as mp

        import warm

        tw = time.time()
        pool = mp.get_context("spawn").Pool(args.workers)
        pending = pool.map_async(warm._work, [(i, args.workers, shapes, ms, DEV) for i in range(args.workers)])
    res["checks"] = checks(log, args.mmv_checks_only)
    save()
    if pool is not None:
        out = pending.get()
        pool.close()
        res["warm"] = {"compiled": sum(o[0] for o in out), "failed": sum(o[1] for o in out),
                       "seconds": time.time() - tw, "workers": args.workers}
        log(f"compiled in parallel: {res['warm']}")
    for k, n in shapes:
        g, qw, sc, bf_w, w4_w = w4_weights(k, n, DEV, 256 << 20 if DEV == "cuda" else 1)
        tg_w = None
        if DEV == "cuda":
            tw, tsz = peers.tinygemm_pack(qw, sc, 128)
            tg_w = [(tw.clone(), tsz.clone()) for _ in w4_w]
        for m in ms:
            res["cells"].append(bench_cell(k, n, m, (g, qw, sc, bf_w, w4_w, tg_w), log, args.top))
            save()
        del bf_w, w4_w, tg_w
        if DEV == "cuda":
            torch.cuda.empty_cache()
    log(f"done in {time.time() - t0:.0f} s")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
