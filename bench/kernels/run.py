"""Kernel benchmark on one GPU: checks every kernel against its reference, then times Llama-3-8B GEMM shapes.

    python bench/kernels/run.py --out results.json            # on a CUDA machine
    python bench/kernels/report.py results.json               # -> docs/kernels.md + docs/img/kernels_*.png

In one run and on the same inputs: bf16 F.linear (cuBLAS), raw torch._int_mm, raw torch._scaled_mm (row-wise
scales), hubquant's W4A16 (sym, group 128), W8A8 int8 and FP8 (both including the fused per-token activation
quantization), and a device-to-device copy for the bandwidth ceiling. Each cell is timed as a CUDA graph of R
calls over R weight copies (>= 256 MiB together, so the weights stream from HBM, not L2), replayed after warm-up;
the median over replays divided by R is reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from hubquant_kernels import _common, fp8, pack, w4a16, w8a8  # noqa: E402  (after the sys.path line above)

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024), (8192, 8192)]  # (K, N)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
ROTATE_BYTES = 256 << 20


def rel_err(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def graph_time(fns, reps=20) -> float:
    """Median seconds per call of the list `fns`, captured as one CUDA graph."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(fns))
    times.sort()
    return times[len(times) // 2]


# ------------------------------------------------------------------ correctness on the GPU
def _subset(cands, case_no: int):
    """Every family (kernel, split or not, prefetch depth) once, plus every third candidate in rotation: each
    distinct configuration compiles anew, and checking all of them in every case costs minutes of GPU time."""
    seen, out = set(), []
    for i, c in enumerate(cands):
        parts = c.name.split("_")
        fam = (parts[0], "_s1_" in c.name, c.name.endswith("_d2"))
        if fam not in seen or i % 3 == case_no % 3:
            seen.add(fam)
            out.append(c)
    return out


def check_all(log, ops: str = "all") -> list[dict]:
    dev = "cuda"
    out = []
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g, device=dev).to(dtype)

    # W4A16: every kind of candidate (each configuration somewhere), odd shapes, every group size, sym/asym,
    # bf16/fp16, bias
    case_no = 0
    for (m, n, k, gs, asym, dt) in [(1, 72, 512, 32, False, torch.bfloat16), (3, 200, 1024, 64, True, torch.float16),
                                    (1, 4096, 4096, 128, False, torch.bfloat16),
                                    (7, 136, 768, -1, True, torch.bfloat16),
                                    (33, 264, 2048, 128, True, torch.bfloat16),
                                    (300, 520, 1024, 64, False, torch.float16),
                                    (16, 1024, 14336, 128, False, torch.bfloat16)]:
        if ops == "w4a16" and m > 16:
            continue
        gsz = k if gs == -1 else gs
        case_no += 1
        u = torch.randint(0, 16, (k, n), device=dev, generator=g)
        qw = pack.pack_kn(u)
        s = (torch.rand(k // gsz, n, device=dev, generator=g) * 0.02 + 1e-3).to(dt)
        z = torch.randint(0, 16, (k // gsz, n), device=dev, generator=g).to(torch.uint8) if asym else None
        x, b = rnd(m, k, dtype=dt), rnd(n, dtype=dt)
        ref = x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
        for c in _subset(w4a16.candidates(m, n, k, gsz), case_no):
            y = torch.full((m, n), float("nan"), dtype=dt, device=dev)
            try:
                y = c.fn(x, qw, s, z, b, y, gsz)
                y = c.fn(x, qw, s, z, b, y, gsz)  # twice: split-K must leave its workspace zeroed
                e = rel_err(y, ref)
                ok = e < 1e-2 and not torch.isnan(y).any().item()
            except Exception as ex:  # noqa: BLE001  (a failing candidate is a failed check, not a crash)
                e, ok = repr(ex)[:300], False
            out.append({"op": "w4a16", "shape": [m, n, k], "group": gs, "asym": asym, "dtype": str(dt),
                        "impl": c.name, "rel_err": e, "ok": ok})
    # W4A16 on column views of a fused q/k/v weight (rows longer than N, as the fused decoder's parts are)
    for m in [] if ops == "none" else (1, 16):
        k, gs, n_all = 4096, 128, 6144
        qw = pack.pack_kn(torch.randint(0, 16, (k, n_all), device=dev, generator=g))
        s = (torch.rand(k // gs, n_all, device=dev, generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
        view = (qw[:, 4096:5120], s[:, 4096:5120])
        x = rnd(m, k)
        ref = x.double() @ w4a16.dequantize_reference(view[0].contiguous(), view[1].contiguous(), None, gs).double()
        for c in _subset(w4a16.candidates(m, 1024, k, gs), m):
            try:
                y = c.fn(x, *view, None, None, torch.full((m, 1024), float("nan"), dtype=torch.bfloat16, device=dev),
                         gs)
                e = rel_err(y, ref)
                ok = e < 1e-2 and not torch.isnan(y).any().item()
            except Exception as ex:  # noqa: BLE001
                e, ok = repr(ex)[:300], False
            out.append({"op": "w4a16_column_view", "shape": [m, 1024, k], "impl": c.name, "rel_err": e, "ok": ok})
    # W8A8 int8 / FP8: activation quantization bit-exact, GEMMs vs float64 reference
    w8_shapes = [(1, 72, 512), (5, 200, 1024), (33, 136, 768), (300, 4096, 4096), (16, 1024, 14336)]
    for (m, n, k) in [] if ops == "w4a16" else w8_shapes:
        x, b = rnd(m, k), rnd(n)
        for is_fp8 in (False, True):
            qa, sa = w8a8.quantize_act(x, fp8=is_fp8)
            # reference on the CPU: torch on CUDA divides by 127.5 as a multiply by its reciprocal (scales then
            # differ in the last bit and ~0.1% of codes by one step); the CPU divides exactly, as the kernels do
            qr, sr = (t.to(dev) for t in w8a8.quantize_act_reference(x.cpu(), fp8=is_fp8))
            # codes within one step of torch's, and (nearly) all identical; scales bit-exact
            diff = (qa.float() - qr.float()).abs()
            step = 1.0 if not is_fp8 else (qr.float().abs() * 2 ** -3).clamp_min(2 ** -9)
            mismatch = float((diff > 0).float().mean())
            ok = bool((diff <= step).all()) and mismatch < 1e-3 and torch.equal(sa, sr)
            out.append({"op": "act_quant_" + ("fp8" if is_fp8 else "int8"), "shape": [m, k], "ok": ok,
                        "mismatch_fraction": mismatch, "rel_err": rel_err(qa.float(), qr.float())})
            if is_fp8:
                qw, sw = fp8.quantize_weight_fp8(rnd(n, k))
            else:
                qw = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=dev, generator=g)
                sw = torch.rand(n, device=dev, generator=g) * 0.01
            ref = w8a8.scaled_mm_reference(qr, sr, qw, sw, b, torch.float64)
            for c in w8a8.mm_candidates(m, n, k, is_fp8, torch.bfloat16):
                y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=dev)
                try:
                    y = c.fn(qr, sr, qw, sw, b, y)
                    y = c.fn(qr, sr, qw, sw, b, y)
                    e = rel_err(y, ref)
                    ok = e < 1e-2 and not torch.isnan(y).any().item()
                except Exception as ex:  # noqa: BLE001
                    e, ok = repr(ex)[:300], False
                out.append({"op": "fp8" if is_fp8 else "int8", "shape": [m, n, k], "impl": c.name, "rel_err": e,
                            "ok": ok})
    # RTN quantize + pack: bit-exact against hubquant.quant + compressed-tensors packing
    pack_shapes = [(200, 1024, 32, True), (136, 768, 64, False), (4096, 4096, 128, True), (72, 512, -1, False)]
    for (n, k, gs, sym) in [] if ops == "w4a16" else pack_shapes:
        w = rnd(n, k)
        a, r = pack.rtn_pack(w, gs, sym), pack.rtn_pack_reference(w, gs, sym)
        exact = all((p is None and q is None) or torch.equal(p, q) for p, q in zip(a, r))
        out.append({"op": "rtn_pack", "shape": [n, k], "group": gs, "asym": not sym, "ok": exact, "rel_err": 0.0})
    bad = [r for r in out if not r["ok"]]
    log(f"correctness: {len(out) - len(bad)}/{len(out)} checks passed")
    for r in bad:
        log(f"  FAILED {r}")
    return out


# ------------------------------------------------------------------ timing
def copy_bandwidth() -> float:
    n = 1 << 30
    a = torch.randn(n // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    t = graph_time([lambda: b.copy_(a)], reps=20)
    return 2 * n / t


def bench_shape(k, n, ms, log) -> list[dict]:
    dev = "cuda"
    rows = []
    g = torch.Generator(device=dev).manual_seed(k * 31 + n)
    w = torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
    # weights of each kind (from the same float weight)
    packed, scale, _ = pack.rtn_pack(w, 128, True)
    w4 = {"qweight": pack.ct_to_kernel_layout(packed, k), "scales": scale.t().contiguous()}
    q8 = w.float().abs().amax(1) / 127.5
    wi8 = (w.float() / q8[:, None]).round().clamp(-128, 127).to(torch.int8)
    wf8, sf8 = fp8.quantize_weight_fp8(w)

    def copies(nbytes, make):
        r = max(1, min(64, math.ceil(ROTATE_BYTES / nbytes)))
        return [make() for _ in range(r)]

    bf_w = copies(2 * n * k, lambda: w.clone())
    w4_w = copies(n * k // 2 + 2 * n * k // 128, lambda: {kk: v.clone() for kk, v in w4.items()})
    i8_w = copies(n * k, lambda: wi8.clone())
    f8_w = copies(n * k, lambda: wf8.clone())
    for m in ms:
        x = torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16)
        qa, _ = w8a8.quantize_act(x)
        qa8, sa8 = w8a8.quantize_act(x, fp8=True)
        cell = {"K": k, "N": n, "M": m}
        t_bf = graph_time([lambda ww=ww, x=x: torch.nn.functional.linear(x, ww) for ww in bf_w])
        cell["bf16"] = t_bf
        # hubquant W4A16 (tuned on first call), plus its chosen implementation
        w4a16.w4a16_matmul(x, w4["qweight"], w4["scales"], None, 128)
        cell["w4a16"] = graph_time([lambda d=d, x=x: w4a16.w4a16_matmul(x, d["qweight"], d["scales"], None, 128)
                                    for d in w4_w])
        cell["w4a16_impl"] = _common.chosen().get(("w4a16", _common.m_bucket(m), n, k, 128, False, torch.bfloat16,
                                                   False))
        cell["w8a8"] = graph_time([lambda d=d, x=x: w8a8.w8a8_matmul(x, d, q8) for d in i8_w])
        cell["w8a8_impl"] = _common.chosen().get(("int8", _common.m_bucket(m), n, k, torch.bfloat16, False))
        cell["fp8"] = graph_time([lambda d=d, x=x: fp8.fp8_matmul(x, d, sf8) for d in f8_w])
        cell["fp8_impl"] = _common.chosen().get(("fp8", _common.m_bucket(m), n, k, torch.bfloat16, False))
        if m > 16:
            cell["torch_int_mm"] = graph_time([lambda d=d, qa=qa: torch._int_mm(qa, d.t()) for d in i8_w])
        cell["torch_scaled_mm"] = graph_time([lambda d=d, qa8=qa8, sa8=sa8: torch._scaled_mm(
            qa8, d.t(), scale_a=sa8[:, None], scale_b=sf8[None, :], out_dtype=torch.bfloat16) for d in f8_w])
        cell["bytes"] = {"bf16": 2 * n * k + 2 * m * k + 2 * m * n,
                         "w4a16": n * k // 2 + 2 * n * k // 128 + 2 * m * k + 2 * m * n,
                         "w8": n * k + 4 * n + 2 * m * k + 2 * m * n}
        rows.append(cell)
        log(f"K={k:5d} N={n:5d} M={m:4d}  bf16 {t_bf * 1e6:8.1f} us  w4a16 {cell['w4a16'] * 1e6:8.1f} "
            f"({t_bf / cell['w4a16']:.2f}x, {cell['w4a16_impl']})  int8 {cell['w8a8'] * 1e6:8.1f} "
            f"({t_bf / cell['w8a8']:.2f}x)  fp8 {cell['fp8'] * 1e6:8.1f} ({t_bf / cell['fp8']:.2f}x)")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernels_results.json")
    ap.add_argument("--shapes", default="all", help="'all' or a comma list of KxN")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--checks", default="all", choices=("all", "w4a16"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    t0 = time.time()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "host": platform.node(), "cells": [], "checks": []}
    out = Path(args.out)

    def log(s):
        print(s, flush=True)

    def save():
        res["tune_log"] = {repr(k): v for k, v in _common.TUNE_LOG.items()}
        res["seconds"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(res, indent=1, default=str))

    if not args.skip_check:
        res["checks"] = check_all(log, args.checks)
        save()
    res["copy_bytes_per_s"] = copy_bandwidth()
    log(f"device-to-device copy: {res['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)")
    shapes = SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    for k, n in shapes:
        res["cells"] += bench_shape(k, n, ms, log)
        save()
        torch.cuda.empty_cache()
    log(f"done in {time.time() - t0:.0f} s")
    return 0 if all(c["ok"] for c in res["checks"]) else 1


if __name__ == "__main__":
    os.environ.setdefault("HUBQUANT_TUNE", "1")
    os.environ.setdefault("HUBQUANT_TUNE_CACHE", "0")  # time the chooser afresh, never from disk
    sys.exit(main())
