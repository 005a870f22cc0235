"""Large-M W4A16 on one GPU: bf16 F.linear, hubquant's current pick and the swapped-operand wgmma kernel
(hubquant_kernels.w4a16_wgmma) side by side, in one process, on the same weights.

    python bench/kernels/large_m.py --out bench/kernels/results/h200_large_m.json   # on a CUDA machine
    python bench/kernels/large_m.py --smoke --out /tmp/large_m.json                  # CPU, TRITON_INTERPRET=1

1. Every kernel variant the run uses is compiled first in parallel worker processes (Triton's disk cache), the
   current candidates through bench/kernels/warm.py.
2. Checks on the GPU: each wgmma configuration against a float64 product on odd shapes (group sizes 32/64/128/-1,
   sym and asym, bias, bf16 and fp16, split-K run twice, output poisoned with NaN first), and the PTX
   dequantization bit for bit against the portable one.
3. Per shape and M: bf16 F.linear; hubquant's chooser over its current W4A16 candidates ("current"); the chooser
   over the wgmma configurations of this file's sweep ("wgmma"); each pick timed as CUDA-graph replays over
   rotating weight copies (>= 256 MiB, weights stream from HBM), its output checked against float64.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(Path(__file__).resolve().parent)]
os.environ.setdefault("HUBQUANT_TUNE_CACHE", "0")
if "--smoke" in sys.argv:  # before triton is imported: kernels are decorated for the interpreter then
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from harness import header, pick, sibling, smoke_time, time_w4, w4_weights  # noqa: E402

from hubquant_kernels import w4a16, w4a16_wgmma  # noqa: E402

SHAPES = [(8192, 8192), (4096, 14336), (14336, 4096), (4096, 4096)]  # (K, N); reported as N x K
MS = [64, 256, 1024, 4096]
ROTATE = 256 << 20
FAILED: set[str] = set()  # configurations that failed a check (not timed)
SMOKE_SWEEP = ((32, 32, 64, 1, 4, 2), (16, 32, 64, 2, 4, 2, True))
# checks: (m, n, k, group size, asym, dtype name, bias)
CHECKS = [(77, 200, 384, 128, False, "bfloat16", True), (300, 136, 1024, 32, True, "float16", False),
          (64, 256, 512, -1, False, "bfloat16", True), (129, 72, 512, 64, True, "bfloat16", True),
          (1000, 520, 2048, 128, True, "bfloat16", False)]
SMOKE_CHECKS = [(37, 40, 256, 64, True, "bfloat16", True), (20, 32, 128, -1, False, "float16", False)]


def sweep_for(m: int, smoke: bool):
    """The configurations timed at m: w4a16_wgmma.SWEEP_CONFIGS (a superset of the chooser's shortlist)."""
    return SMOKE_SWEEP if smoke else w4a16_wgmma.configs_for(m, w4a16_wgmma.SWEEP_CONFIGS)


def all_configs(ms, smoke: bool) -> list[tuple]:
    return sorted({c for m in ms for c in sweep_for(m, smoke)}, key=str)


# ------------------------------------------------------------------ correctness
def _case(spec, dev, seed):
    m, n, k, gs, asym, dt, has_bias = spec
    dtype = getattr(torch, dt)
    g = torch.Generator(device="cpu").manual_seed(seed)
    gsz = k if gs == -1 else gs
    from hubquant_kernels import pack

    qw = pack.pack_kn(torch.randint(0, 16, (k, n), generator=g)).to(dev)
    s = (torch.rand(k // gsz, n, generator=g) * 0.02 + 1e-3).to(dtype).to(dev)
    z = torch.randint(0, 16, (k // gsz, n), generator=g).to(torch.uint8).to(dev) if asym else None
    x = torch.randn(m, k, generator=g).to(dtype).to(dev)
    b = torch.randn(n, generator=g).to(dtype).to(dev) if has_bias else None
    return x, qw, s, z, b, gsz


def run_check(spec, cfg, dev, asm=None) -> tuple[float, bool, torch.Tensor]:
    """(worst relative error of two calls against float64, NaN-free, last output) for one case and config."""
    x, qw, s, z, b, gsz = _case(spec, dev, seed=sum(spec[:3]))
    bm, bn, bk, split, warps, stages, *tma = cfg
    ref = x.double() @ w4a16.dequantize_reference(qw, s, z, spec[3]).double()
    if b is not None:
        ref = ref + b.double()
    worst, clean = 0.0, True
    for _ in range(2):  # twice: split-K must leave the workspace zeroed
        y = torch.full((spec[0], spec[1]), float("nan"), dtype=x.dtype, device=dev)
        w4a16_wgmma.wgmma(x, qw, s, z, b, y, gsz, bm=bm, bn=bn, bk=bk, split_k=split, warps=warps, stages=stages,
                          asm=asm, tma=bool(tma and tma[0]))
        clean &= not bool(torch.isnan(y).any())
        worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
    return worst, clean, y


def check_jobs(configs, smoke: bool) -> list[tuple]:
    """(case, config) pairs: every config on the case it fits first, and every case on one config that fits."""
    cases = SMOKE_CHECKS if smoke else CHECKS
    jobs = []
    for i, cfg in enumerate(configs):
        for j in range(len(cases)):
            spec = cases[(i + j) % len(cases)]
            if w4a16_wgmma.fits(spec[2], spec[2] if spec[3] == -1 else spec[3], cfg[2], cfg[3]):
                jobs.append((spec, cfg))
                break
    for spec in cases:
        fit = [c for c in configs if w4a16_wgmma.fits(spec[2], spec[2] if spec[3] == -1 else spec[3], c[2], c[3])]
        if fit and not any(s == spec for s, _ in jobs):
            jobs.append((spec, fit[0]))
    return jobs


def checks(jobs, dev, log) -> list[dict]:
    """Run the check jobs; a configuration that fails any is left out of the timing (``failed`` below)."""
    out = []
    for spec, cfg in jobs:
        err, clean, y = run_check(spec, cfg, dev)
        row = {"case": spec, "config": w4a16_wgmma.config_name(*cfg), "rel_err": err, "ok": clean and err < 1e-2}
        if dev == "cuda" and cfg[3] == 1:  # the PTX dequantization must give the portable one's values exactly
            # (split-K sums in arrival order, which varies between runs)
            _, _, y_plain = run_check(spec, cfg, dev, asm=False)
            row["ptx_equals_portable"] = bool(torch.equal(y, y_plain))
        out.append(row)
        log(f"check {spec} {row['config']}: rel err {err:.2e} {'ok' if row['ok'] else 'FAIL'} "
            f"ptx==portable {row.get('ptx_equals_portable')}")
    return out


# ------------------------------------------------------------------ parallel compilation
def _compile_job(job) -> tuple[int, int]:
    """Compile one share of the configurations (benchmark specialization: every size a multiple of 16) and of the
    checks, in a worker process."""
    index, count, configs, jobs, dev = job
    done = failed = 0
    x = torch.randn(64, 1024, device=dev, dtype=torch.bfloat16)
    qw = torch.randint(-2**31, 2**31 - 1, (128, 256), device=dev, dtype=torch.int32)
    sc = torch.full((8, 256), 0.01, device=dev, dtype=torch.bfloat16)
    y = torch.empty(64, 256, device=dev, dtype=torch.bfloat16)
    items = [("cfg", c) for c in configs] + [("check", j) for j in jobs]
    for i, (kind, item) in enumerate(items):
        if i % count != index:
            continue
        try:
            if kind == "cfg":
                w4a16_wgmma.candidate(*item).fn(x, qw, sc, None, None, y, 128)
            else:
                run_check(item[0], item[1], dev)
                run_check(item[0], item[1], dev, asm=False)
            done += 1
        except Exception:  # noqa: BLE001  (the timed run records the failure)
            failed += 1
    if dev == "cuda":
        torch.cuda.synchronize()
    return done, failed


def compile_all(configs, jobs, shapes, ms, workers: int, dev: str) -> dict:
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        out = pool.map(_compile_job, [(i, workers, configs, jobs, dev) for i in range(workers)])
    res = {"wgmma_compiled": sum(o[0] for o in out), "wgmma_failed": sum(o[1] for o in out),
           "wgmma_seconds": round(time.time() - t0, 1)}
    if dev == "cuda":
        import warm  # by its own name: spawned workers import it again

        res["current"] = warm.warm(shapes, ms, workers, dev)
    return res


# ------------------------------------------------------------------ timing
def _timed(cell, name, c, x, v, ys, ref, graph_time):
    """Time candidate c over the rotated W4 copies; check its first output against ref (float64)."""
    try:
        y = c.fn(x, v["qw"], v["sc"], None, None, ys[0], 128)
        err = float((y.double() - ref).norm() / ref.norm())
        cell.setdefault("checks", {})[name] = {"rel_err": err, "ok": bool(err < 1e-2 and not torch.isnan(y).any())}
        cell[name] = time_w4(graph_time, c, x, v["w4"], ys)
        cell[name + "_impl"] = c.name
    except Exception as e:  # noqa: BLE001  (reported, not fatal)
        cell.setdefault("errors", {})[name] = repr(e)[:300]


def bench_cell(k, n, m, v, dev, graph_time, smoke, log) -> dict:
    x = torch.randn(m, k, device=dev, generator=v["g"], dtype=torch.bfloat16)
    cell = {"N": n, "K": k, "M": m}
    cell["bf16"] = graph_time([lambda w=w: torch.nn.functional.linear(x, w) for w in v["bf16"]])
    ys = [torch.empty(m, n, device=dev, dtype=torch.bfloat16) for _ in v["w4"]]
    args = (x, v["qw"], v["sc"], None, None, ys[0], 128)
    ref = x.double() @ v["ref"]
    current = [c for c in w4a16.candidates(m, n, k, 128) if not c.name.startswith("wgmma")]
    c_cur, cell["current_tune"] = pick(dev, current, args)
    _timed(cell, "current", c_cur, x, v, ys, ref, graph_time)
    cands = [c for c in w4a16_wgmma.candidates(m, n, k, 128, configs=sweep_for(m, smoke)) if c.name not in FAILED]
    if smoke:
        cands = cands[:1]
    if cands:
        c_new, cell["wgmma_tune"] = pick(dev, cands, args)
        _timed(cell, "wgmma", c_new, x, v, ys, ref, graph_time)
    bf = cell["bf16"]
    ratios = " ".join(f"{nm} {bf / cell[nm]:.2f}x ({cell[nm] * 1e6:.1f} us, {cell[nm + '_impl']})"
                      for nm in ("current", "wgmma") if cell.get(nm))
    log(f"{n:5d}x{k:<5d} M={m:4d} bf16 {bf * 1e6:8.1f} us | {ratios} {cell.get('errors', '')}")
    return cell


def weights(k, n, dev):
    g, qw, sc, bf_w, w4_w = w4_weights(k, n, dev, ROTATE)
    return {"g": g, "qw": qw, "sc": sc, "bf16": bf_w, "w4": w4_w,
            "ref": w4a16.dequantize_reference(qw, sc, None, 128).double()}


def table(cells) -> str:
    rows = ["| N x K | M | bf16 us | current x bf16 | wgmma x bf16 | current pick | wgmma pick |",
            "|---|---|---|---|---|---|---|"]
    for c in cells:
        bf = c["bf16"]
        r = {nm: f"{bf / c[nm]:.2f}" if c.get(nm) else "-" for nm in ("current", "wgmma")}
        rows.append(f"| {c['N']}x{c['K']} | {c['M']} | {bf * 1e6:.1f} | {r['current']} | {r['wgmma']} | "
                    f"`{c.get('current_impl')}` | `{c.get('wgmma_impl')}` |")
    return "\n".join(rows)


def main() -> int:
    global ROTATE
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="large_m.json")
    ap.add_argument("--shapes", default="all", help="'all' or a comma list of KxN")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--workers", type=int, default=14, help="compile processes")
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, one tiny shape")
    args = ap.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    graph_time = smoke_time if args.smoke else sibling("run").graph_time
    if args.smoke:
        ROTATE = 1
    shapes = [(256, 64)] if args.smoke else (
        SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")])
    ms = [64] if args.smoke else [int(s) for s in args.ms.split(",")]
    res = {**header(dev), "command": " ".join(sys.argv), "cells": []}
    t0 = time.time()

    def log(s):
        print(s, flush=True)

    def save():
        res["seconds"] = round(time.time() - t0, 1)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))

    configs = all_configs(ms, args.smoke)
    jobs = check_jobs(configs, args.smoke)
    res["compile"] = compile_all(configs, jobs, shapes, ms, 1 if args.smoke else args.workers, dev)
    log(f"compiled: {res['compile']}")
    res["checks"] = checks(jobs, dev, log)
    if any(r["ok"] and not r.get("ptx_equals_portable", True) for r in res["checks"]):
        w4a16_wgmma.USE_PTX = False  # time the portable dequantization rather than a wrong fast one
        log("PTX dequantization differs from the portable one: timing the portable path")
    FAILED.update(r["config"] for r in res["checks"] if not r["ok"])
    save()
    for k, n in shapes:
        v = weights(k, n, dev)
        for m in ms:
            res["cells"].append(bench_cell(k, n, m, v, dev, graph_time, args.smoke, log))
            save()
        del v
        if dev == "cuda":
            torch.cuda.empty_cache()
    cell_checks = [ch["ok"] for c in res["cells"] for ch in c.get("checks", {}).values()]
    ok = sum(r["ok"] for r in res["checks"]) + sum(cell_checks)
    total = len(res["checks"]) + len(cell_checks)
    res["checks_passed"], res["checks_total"] = ok, total
    save()
    log(table(res["cells"]))
    log(f"checks {ok}/{total}; done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
