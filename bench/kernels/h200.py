"""One-call GPU benchmark: hubquant's W4A16, FP4, INT8 and FP8 kernels beside bf16 cuBLAS, torch's tinygemm and
gemlite, in one process, on the same weights.

    python bench/kernels/h200.py --out h200.json                 # on a CUDA machine
    python bench/kernels/h200.py --smoke --out /tmp/smoke.json   # CPU, TRITON_INTERPRET=1: checks the script

- Read bandwidth, measured the fair way: a read-only streaming Triton kernel (2 GiB, best of four grids) and, per
  shape, bf16's own GEMV (F.linear at M=1: weight bytes / time). Every M=1 kernel is reported as % of both.
- Each cell: bf16 F.linear, hubquant (its chooser picks, with a cold L2, then CUDA-graph replays over rotating
  weight copies >= 256 MiB so weights stream from HBM), the peers; every output is checked against a float64
  product of the same dequantized weight (relative error < 1e-2, no NaN).
- Host overhead: CPU microseconds per eager call once the shape is decided (no synchronization in the loop).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(Path(__file__).resolve().parent)]
os.environ.setdefault("HUBQUANT_TUNE_CACHE", "0")

import peers  # noqa: E402
from harness import header, sibling, smoke_time  # noqa: E402

from hubquant_kernels import _common, fp4, fp8, pack, w4a16, w8a8  # noqa: E402

_run = sibling("run")
graph_time, rel_err = _run.graph_time, _run.rel_err
DEV = "cuda"
SHAPES = [(8192, 8192), (4096, 14336), (14336, 4096), (4096, 4096)]  # (K, N): N x K as in Llama-3-8B
MS = [1, 16, 64, 256, 1024, 4096]
W8_MS = {1, 16, 2048, 4096}
FP4 = True
ROTATE = 256 << 20


def _copies(nbytes, make):
    return [make() for _ in range(max(1, min(64, math.ceil(ROTATE / nbytes))))]


def build(k, n):
    """Every variant's weights from one seeded bf16 weight [N, K], each with its rotation copies."""
    g = torch.Generator(device=DEV).manual_seed(k * 31 + n)
    w = torch.randn(n, k, device=DEV, generator=g, dtype=torch.bfloat16) * 0.02
    packed, scale, _ = pack.rtn_pack(w, 128, True)
    qw, sc = pack.ct_to_kernel_layout(packed, k), scale.t().contiguous()
    v = {"g": g, "bf16": _copies(2 * n * k, w.clone), "w4": _copies(n * k // 2, lambda: (qw.clone(), sc.clone())),
         "w4_ref": w4a16.dequantize_reference(qw, sc, None, 128).double()}
    if DEV == "cuda":
        tw, tsz = peers.tinygemm_pack(qw, sc, 128)
        v["tinygemm"] = _copies(n * k // 2, lambda: (tw.clone(), tsz.clone()))
        try:
            v["gemlite"] = peers.gemlite_layer(qw, sc, 128)
        except Exception as e:  # noqa: BLE001  (a peer that fails is reported, not fatal)
            v["gemlite_error"] = repr(e)[:300]
    for kind in ("nvfp4", "mxfp4") if FP4 else ():
        p, s, gsc = peers.fp4_quantize(w, kind)
        v[kind] = _copies(n * k // 2, lambda p=p, s=s: (p.clone(), s.clone()))
        v[kind + "_g"] = gsc
        v[kind + "_ref"] = fp4.fp4_dequantize_reference(p, s, gsc, kind).double().t()
    qi, si = peers.int8_quantize(w)
    v["int8"], v["int8_s"] = _copies(n * k, qi.clone), si
    qf, sf = fp8.quantize_weight_fp8(w)
    v["fp8"], v["fp8_s"] = _copies(n * k, qf.clone), sf
    return v


def _timed(cell, name, fns, check, ref):
    """Time fns (one call per weight copy); check the first call's output against ref (float64)."""
    try:
        y = fns[0]()
        e = rel_err(y, ref) if ref is not None else float("nan")
        ok = ref is None or (e < 1e-2 and not torch.isnan(y).any().item())
        cell[name] = graph_time(fns)
        cell.setdefault("checks", {})[name] = {"rel_err": e, "ok": bool(ok)}
        check.append(ok)
    except Exception as ex:  # noqa: BLE001
        cell.setdefault("errors", {})[name] = repr(ex)[:300]
        check.append(False)


def bench_cell(k, n, m, v, log, check) -> dict:
    x = torch.randn(m, k, device=DEV, generator=v["g"], dtype=torch.bfloat16)
    cell = {"K": k, "N": n, "M": m}
    _timed(cell, "bf16", [lambda w=w: torch.nn.functional.linear(x, w) for w in v["bf16"]], check,
           x.double() @ v["bf16"][0].double().t())
    ref4 = x.double() @ v["w4_ref"]
    key = ("w4a16", _common.m_bucket(m), n, k, 128, False, torch.bfloat16, False)
    _timed(cell, "hubquant", [lambda d=d: w4a16.w4a16_matmul(x, d[0], d[1], None, 128) for d in v["w4"]], check, ref4)
    cell["hubquant_impl"] = _common.chosen().get(key)
    cell["hubquant_tune"] = _common.TUNE_LOG.get(key)
    if "tinygemm" in v and m <= 256:
        _timed(cell, "tinygemm", [lambda d=d: peers.tinygemm(x, d[0], d[1], 128) for d in v["tinygemm"]], check, ref4)
    if v.get("gemlite") is not None and m <= 1024:
        _timed(cell, "gemlite", [lambda: v["gemlite"](x)], check, ref4)  # one weight copy: L2-warm (flatters it)
    if m <= 64 and FP4:
        for kind in ("nvfp4", "mxfp4"):
            refk = x.double() @ v[kind + "_ref"]
            _timed(cell, kind, [lambda d=d, kind=kind: fp4.fp4_linear(x, d[0], d[1], v[kind + "_g"], kind)
                                for d in v[kind]], check, refk)
            cell[kind + "_impl"] = _common.chosen().get(("fp4", kind, _common.m_bucket(m), n, k, torch.bfloat16,
                                                          False, kind == "nvfp4"))
    if m in W8_MS:
        for name, f, is_fp8 in (("int8", w8a8.w8a8_matmul, False), ("fp8", fp8.fp8_matmul, True)):
            qa, sa = (t.to(DEV) for t in w8a8.quantize_act_reference(x.cpu(), fp8=is_fp8))  # CPU: exact division
            ref8 = w8a8.scaled_mm_reference(qa, sa, v[name][0], v[name + "_s"], None, torch.float64)
            _timed(cell, name, [lambda d=d, f=f, name=name: f(x, d, v[name + "_s"]) for d in v[name]], check, ref8)
        cell["int8_impl"] = _common.chosen().get(("int8", _common.m_bucket(m), n, k, torch.bfloat16, False))
        cell["fp8_impl"] = _common.chosen().get(("fp8", _common.m_bucket(m), n, k, torch.bfloat16, False))
    bf = cell.get("bf16")
    ratios = " ".join(f"{nm} {bf / cell[nm]:.2f}x" for nm in ("hubquant", "tinygemm", "gemlite", "nvfp4", "mxfp4",
                                                             "int8", "fp8") if bf and cell.get(nm))
    log(f"K={k:5d} N={n:5d} M={m:4d} bf16 {bf * 1e6 if bf else float('nan'):8.1f} us | {ratios} | "
        f"{cell.get('hubquant_impl')} {cell.get('errors', '')}")
    return cell


def host_overhead(log) -> dict:
    """CPU us per eager call at M=1, 4096x4096, after the shape is decided (the GPU is never the bottleneck:
    200 calls of ~10 us kernels stay far below the launch queue's depth)."""
    k = n = 4096 if DEV == "cuda" else 256
    g = torch.Generator(device=DEV).manual_seed(7)
    w = torch.randn(n, k, device=DEV, generator=g, dtype=torch.bfloat16) * 0.02
    packed, scale, _ = pack.rtn_pack(w, 128, True)
    qw, sc = pack.ct_to_kernel_layout(packed, k), scale.t().contiguous()
    qi, si = peers.int8_quantize(w)
    qf, sf = fp8.quantize_weight_fp8(w)
    p4, s4, g4 = peers.fp4_quantize(w, "nvfp4")
    x = torch.randn(1, k, device=DEV, generator=g, dtype=torch.bfloat16)
    calls = {"bf16 F.linear": lambda: torch.nn.functional.linear(x, w),
             "w4a16_matmul": lambda: w4a16.w4a16_matmul(x, qw, sc, None, 128),
             "w8a8_matmul": lambda: w8a8.w8a8_matmul(x, qi, si), "fp8_matmul": lambda: fp8.fp8_matmul(x, qf, sf),
             "fp4_linear": lambda: fp4.fp4_linear(x, p4, s4, g4, "nvfp4")}
    if DEV == "cuda":
        tw, tsz = peers.tinygemm_pack(qw, sc, 128)
        calls["tinygemm"] = lambda: peers.tinygemm(x, tw, tsz, 128)
    out = {}
    for name, f in calls.items():
        for _ in range(5):
            f()
        if DEV == "cuda":
            torch.cuda.synchronize()
        reps = 200 if DEV == "cuda" else 3
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        out[name] = (time.perf_counter() - t0) / reps * 1e6
        if DEV == "cuda":
            torch.cuda.synchronize()
    log("host us per eager call (M=1, 4096x4096): " + ", ".join(f"{k_} {v_:.1f}" for k_, v_ in out.items()))
    return out


def main() -> int:
    global DEV, graph_time, ROTATE, W8_MS, FP4
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="h200.json")
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="time the wide W4A16 candidate sets (HUBQUANT_W4_SWEEP=1), compiled first in parallel")
    ap.add_argument("--w8-ms", default=",".join(map(str, sorted(W8_MS))), help="M values with INT8/FP8 cells")
    ap.add_argument("--workers", type=int, default=14, help="compile processes for --sweep")
    ap.add_argument("--no-fp4", action="store_true", help="leave out the NVFP4/MXFP4 cells")
    ap.add_argument("--warm", action="store_true", help="compile the W4A16 candidates in parallel first")
    args = ap.parse_args()
    FP4 = not args.no_fp4
    W8_MS = {int(v) for v in args.w8_ms.split(",") if v}
    if args.sweep:
        os.environ["HUBQUANT_W4_SWEEP"] = "1"
    if args.smoke:
        DEV, graph_time, ROTATE, W8_MS = "cpu", smoke_time, 1, {1}
    shapes = SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    if args.smoke:
        shapes = [(256, 64)]
    ms = [int(s) for s in args.ms.split(",")]
    t0, check = time.time(), []
    res = {**header(DEV), "cells": [], "command": " ".join(sys.argv)}

    def log(s):
        print(s, flush=True)

    def save():
        res["seconds"] = round(time.time() - t0, 1)
        res["checks_passed"], res["checks_total"] = sum(check), len(check)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))

    try:
        import gemlite
        res["gemlite"] = gemlite.__version__ if hasattr(gemlite, "__version__") else "installed"
    except ImportError:
        res["gemlite"] = None
    res["host_us"] = host_overhead(log)
    if args.sweep or args.warm:
        import warm

        res["warm"] = warm.warm(shapes, ms, 2 if args.smoke else args.workers, DEV)
        log(f"compiled in parallel: {res['warm']}")
    if DEV == "cuda":
        res["read"] = peers.read_bandwidth(graph_time)
        res["copy_bytes_per_s"] = _run.copy_bandwidth()
        log(f"read-only stream {res['read']['bytes_per_s'] / 1e12:.2f} TB/s ({res['read']['config']}); "
            f"copy {res['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)")
    save()
    for k, n in shapes:
        v = build(k, n)
        for m in ms:
            res["cells"].append(bench_cell(k, n, m, v, log, check))
            save()
        del v
        if DEV == "cuda":
            torch.cuda.empty_cache()
    log(f"checks {sum(check)}/{len(check)}; done in {time.time() - t0:.0f} s")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
