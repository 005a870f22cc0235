"""INT8 W8A8 and FP8 on bench/kernels/h200.py's shapes, M = 1 .. 8192: the per-token quantization kernels, the
one-launch kernel (quantization inside the GEMM), the fused norm/activation + quantization, the cuBLAS paths and the
end-to-end layers, against bf16 and raw cuBLAS, in one run.

    python bench/kernels/sweep_w8.py                 # on a CUDA machine; JSON to $OUT/sweep_w8.json if OUT is set
    python bench/kernels/sweep_w8.py --cpu-smoke     # CPU + TRITON_INTERPRET=1, tiny shapes: checks the script

1. Correctness on the device (outputs come from a poisoned allocator or are NaN-filled, inputs random, never zero):
   every activation-quantization configuration (default arithmetic and IEEE division `_div`: int8 codes and
   scales bit for bit against `quantize_act_reference`; FP8 codes within one e4m3 step, nearly all equal; the
   bare reciprocal `_rcp` within one step and only next to ties), `add_rmsnorm_quant` and `silu_mul_quant`
   against their torch references, the cuBLAS epilogues against float64, every one-launch configuration against
   the two-launch path with the same GEMM configuration (bit for bit) and float64, the fused decoder's norm and
   SiLU*up kernels against torch's own ops on the device (fraction of differing outputs), and every timed
   end-to-end cell against float64.
2. Timing, for each shape (K x N) and M: bf16 F.linear, raw torch._int_mm (M > 16), raw torch._scaled_mm
   (row-wise scales; and with use_fast_accum), the standalone quantization (first kernel `row_v1`, the default
   tile, the chooser's pick, and its bandwidth), INT8 and FP8 end to end (`w8a8_matmul`, `fp8_matmul`: the
   chooser's pick, one or two launches at M <= 16), two launches at M <= 16, the GEMM alone on pre-quantized
   activations, and at M > 16 the norm (add_rmsnorm with a residual) or activation (K = 14336: SiLU * up)
   before the layer, without and with the fused quantization. Each as in bench/kernels/run.py: a CUDA graph over
   rotating copies (weights, or inputs for the weight-free ops) of >= 256 MiB, median of 20 replays, per call.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before any triton.jit runs
os.environ.setdefault("HUBQUANT_TUNE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from harness import header, sibling, smoke_time  # noqa: E402

from hubquant_kernels import _common, fp8, fused, quant_mm, w8a8  # noqa: E402

_run = sibling("run")
graph_time, rel_err, copy_bandwidth = _run.graph_time, _run.rel_err, _run.copy_bandwidth

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]  # (K, N): bench/kernels/h200.py's shapes
MS = [1, 16, 2048, 4096, 8192]
ROTATE_BYTES = 256 << 20
DEV = "cpu" if SMOKE else "cuda"
# FP8 codes: at most one e4m3 step from torch's, and nearly all equal (the CPU interpreter's e4m3 cast does not
# round to nearest even, so --cpu-smoke only checks that they are close)
FP8_TOL = (8.0, 0.1) if SMOKE else (1.0, 1e-3)
SILU_KS = {14336}  # K of the layers fed by SiLU(gate) * up (down_proj); the others follow a residual add + RMSNorm


def poison(nbytes: int) -> None:
    """Fill a freed block of the caching allocator with 0xFF (NaN in fp32 and e4m3, -1 in int8), so that
    outputs allocated next (likely the same block) hold garbage wherever a kernel forgets to write."""
    if DEV == "cuda":
        t = torch.full((nbytes + (1 << 20),), -1, dtype=torch.int8, device=DEV)
        del t


def code_diff(q, qr, fp8_codes: bool):
    """(max difference in steps, fraction that differ) between two code tensors."""
    a, b = q.float(), qr.float()
    if fp8_codes:
        step = (b.abs() * 2 ** -3).clamp_min(2 ** -9)  # one e4m3 step (3 mantissa bits; subnormal step 2^-9)
        d = (a - b).abs() / step
    else:
        d = (a - b).abs()
    d = torch.nan_to_num(d, nan=1e9)
    return float(d.max()), float((d > 0).float().mean())


def near_tie(v: torch.Tensor) -> torch.Tensor:
    ulp = torch.nextafter(v.abs(), torch.tensor(float("inf"), device=v.device)) - v.abs()
    return (v - torch.floor(v) - 0.5).abs() <= 2 * ulp


# ------------------------------------------------------------------ correctness
def check_all(log) -> list[dict]:
    dev, out = DEV, []
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0, dtype=torch.bfloat16):
        # rows of different ranges, never all zero
        x = torch.randn(*shape, device=dev, generator=g) * scale
        x = x * (0.1 + torch.rand(*shape[:-1], 1, device=dev, generator=g) * 4)
        return x.to(dtype)

    # 1. per-token quantization, every configuration
    # K: a tail in one-pass tiles (1000, 14336), two-pass chunk tails (14336 / 4096, 20000 / 1024), two-pass only
    # (M a multiple of 16 and the timed K: the kernels compiled here are the ones the timing reuses)
    act_shapes = [(5, 1000), (6, 2100)] if SMOKE else [(320, 4096), (64, 14336), (48, 8192)]
    for m, k in act_shapes:
        x = rnd(m, k)
        for is_fp8 in (False, True):
            # the reference runs on the CPU: torch on CUDA divides by 127.5 as a multiply by its reciprocal (scales
            # then differ in the last bit), the CPU divides exactly, as the kernels do
            qr, sr = (t.to(dev) for t in w8a8.quantize_act_reference(x.cpu(), fp8=is_fp8))
            cands = (w8a8.act_quant_candidates(m, k, is_fp8) + w8a8.act_quant_candidates(m, k, is_fp8, div=0)[:1]
                     + w8a8.act_quant_candidates(m, k, is_fp8, div=2)[:1])
            for c in cands:
                q = torch.full((m, k), -1, dtype=torch.int8, device=dev)
                q = q.view(torch.float8_e4m3fn) if is_fp8 else q
                s = torch.full((m,), float("nan"), device=dev)
                try:
                    c.fn(x, q, s, None)
                    dmax, frac = code_diff(q, qr, is_fp8)
                    s_ok = torch.equal(s, sr)
                    if c.name.endswith("_rcp"):
                        v = x.float() / sr[:, None]
                        d = (q.float() - qr.float()).abs() > 0
                        tol = FP8_TOL if is_fp8 else (1.0, 1e-3)
                        ok = s_ok and dmax <= tol[0] and frac < tol[1] and (is_fp8 or bool(near_tie(v)[d].all()))
                    elif is_fp8:
                        ok = s_ok and dmax <= FP8_TOL[0] and frac < FP8_TOL[1]
                    else:
                        ok = s_ok and dmax == 0
                except Exception as ex:  # noqa: BLE001  (a failing config is a failed check, not a crash)
                    dmax, frac, ok = repr(ex)[:300], None, False
                out.append({"op": "act_quant_" + ("fp8" if is_fp8 else "int8"), "shape": [m, k], "impl": c.name,
                            "max_step_diff": dmax, "mismatch_fraction": frac, "ok": ok})
        st = torch.tensor([0.02], device=dev)
        q, s = w8a8.quantize_act(x, static_scale=st)
        qr, _ = w8a8.quantize_act_reference(x, static_scale=st)
        out.append({"op": "act_quant_int8_static", "shape": [m, k], "ok": torch.equal(q, qr) and bool((s == st).all())})

    # 2. fused norm / activation + quantization against the torch references
    norm_shapes = [(5, 1000)] if SMOKE else [(1, 4096), (48, 4096), (64, 8192), (3, 20000)]
    for m, hsz in norm_shapes:
        for is_fp8 in (False, True):
            for with_res in (False, True):
                x, r, w = rnd(m, hsz, scale=3.0), rnd(m, hsz), rnd(hsz)
                poison(m * hsz * 4)
                q, s, h = fused.add_rmsnorm_quant(x, w, 1e-5, r if with_res else None, fp8=is_fp8)
                qr, sr, hr = (t.to(dev) for t in fused.add_rmsnorm_quant_reference(
                    x.cpu(), w.cpu(), 1e-5, r.cpu() if with_res else None, fp8=is_fp8))
                dmax, frac = code_diff(q, qr, is_fp8)
                s_err = float(((s - sr) / sr).abs().max())
                tol = FP8_TOL if is_fp8 else (1.0, 1e-3)
                ok = torch.equal(h, hr) and dmax <= tol[0] and frac < tol[1] and s_err <= 2 ** -7
                out.append({"op": "add_rmsnorm_quant_" + ("fp8" if is_fp8 else "int8"), "shape": [m, hsz],
                            "residual": with_res, "max_step_diff": dmax, "mismatch_fraction": frac,
                            "scale_rel_err": s_err, "ok": ok})
    silu_shapes = [(3, 700)] if SMOKE else [(1, 14336), (48, 14336), (5, 700)]
    for m, inter in silu_shapes:
        for is_fp8 in (False, True):
            gu = rnd(m, 2 * inter, scale=2.0)
            poison(m * inter * 4)
            q, s = fused.silu_mul_quant(gu, fp8=is_fp8)
            qr, sr = (t.to(dev) for t in fused.silu_mul_quant_reference(gu.cpu(), fp8=is_fp8))
            dmax, frac = code_diff(q, qr, is_fp8)
            s_err = float(((s - sr) / sr).abs().max())
            out.append({"op": "silu_mul_quant_" + ("fp8" if is_fp8 else "int8"), "shape": [m, inter],
                        "max_step_diff": dmax, "mismatch_fraction": frac, "scale_rel_err": s_err,
                        "ok": dmax <= (FP8_TOL[0] if is_fp8 else 1) and frac < (FP8_TOL[1] if is_fp8 else 2e-3)
                        and s_err <= 2 ** -7})

    out += check_cublas(rnd, g) + check_one_launch(rnd, g) + check_fused_vs_torch(rnd)
    bad = [r for r in out if not r["ok"]]
    log(f"correctness: {len(out) - len(bad)}/{len(out)} checks passed")
    for r in bad[:20]:
        log(f"  FAILED {r}")
    return out


def check_cublas(rnd, g) -> list[dict]:
    """cuBLAS paths (one-pass int8 epilogue, fp8 row-wise; fast accumulation for the record) against float64."""
    out, dev = [], DEV
    mm_shapes = [(40, 72, 256)] if SMOKE else [(33, 144, 768), (320, 4096, 4096)]
    for m, n, k in mm_shapes:
        x, b = rnd(m, k), rnd(n)
        qa, sa = w8a8.quantize_act_reference(x)
        qw = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=dev, generator=g)
        sw = torch.rand(n, device=dev, generator=g) * 0.01 + 1e-4
        qa8, sa8 = w8a8.quantize_act_reference(x, fp8=True)
        fw, fs = fp8.quantize_weight_fp8(rnd(n, k))
        ref_i = w8a8.scaled_mm_reference(qa, sa, qw, sw, b, torch.float64)
        ref_f = w8a8.scaled_mm_reference(qa8, sa8, fw, fs, b, torch.float64)
        runs = {"cublas_int_mm": lambda y: w8a8._cublas_int8(qa, sa, qw, sw, b, y),
                "cublas_int_mm_nobias": lambda y: w8a8._cublas_int8(qa, sa, qw, sw, None, y),
                "cublas_scaled_mm": lambda y: w8a8._cublas_fp8(qa8, sa8, fw, fs, b, y),
                "scaled_mm_fast_accum": lambda y: torch._scaled_mm(qa8, fw.t(), scale_a=sa8[:, None],
                                                                   scale_b=fs[None, :], bias=b,
                                                                   out_dtype=torch.bfloat16, use_fast_accum=True)}
        refs = {"cublas_int_mm": ref_i, "cublas_int_mm_nobias": ref_i - b.double(), "cublas_scaled_mm": ref_f,
                "scaled_mm_fast_accum": ref_f}
        for name, fn in runs.items():
            if "scaled_mm" in name and (n % 16 or k % 16):
                continue  # cuBLASLt's FP8 GEMM needs multiples of 16; mm_candidates never offers it there
            try:
                y = fn(torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=dev))
                e = rel_err(y, refs[name])
                ok = e < 1e-2 and not bool(torch.isnan(y).any())
            except Exception as ex:  # noqa: BLE001
                e, ok = repr(ex)[:300], False
            out.append({"op": name, "shape": [m, n, k], "rel_err": e, "ok": ok})
    return out


def check_one_launch(rnd, g) -> list[dict]:
    """Every one-launch configuration (quantization inside the GEMM) against the two-launch path with the same GEMM
    configuration (bit for bit, except FP8 split-K, whose fp32 atomics add in any order) and float64."""
    out, dev = [], DEV
    for m, n, k in [(3, 72, 512)] if SMOKE else [(1, 4096, 4096), (3, 1000, 1024), (4, 4096, 14336)]:
        x = rnd(m, k, scale=2.0)
        for is_fp8 in (False, True):
            if is_fp8:
                qw, sw = fp8.quantize_weight_fp8(rnd(n, k))
            else:
                qw = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=dev, generator=g)
                sw = torch.rand(n, device=dev, generator=g) * 0.01 + 1e-4
            qr, sr = (t.to(dev) for t in w8a8.quantize_act_reference(x.cpu(), fp8=is_fp8))
            exact = w8a8.scaled_mm_reference(qr, sr, qw, sw, None, torch.float64)
            qa, sa = w8a8.quantize_act(x, fp8=is_fp8)
            for c in quant_mm.one_launch_candidates(m, k):
                poison(m * n * 2)
                y = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
                try:
                    c.fn(x, qw, sw, None, None, y)
                    two = w8a8.scaled_mm(qa, sa, qw, sw, impl=c.name.replace("q1_", "triton_"))
                    same = torch.equal(y, two)
                    e = rel_err(y, exact)
                    ok = (same or (is_fp8 and "_s1_" not in c.name)) and e < (0.1 if SMOKE and is_fp8 else 1e-2)
                except Exception as ex:  # noqa: BLE001
                    same, e, ok = None, repr(ex)[:300], False
                out.append({"op": "one_launch_" + ("fp8" if is_fp8 else "int8"), "shape": [m, n, k], "impl": c.name,
                            "equals_two_launch": same, "rel_err": e, "ok": ok})
    return out


def check_fused_vs_torch(rnd) -> list[dict]:
    """The fused decoder's norm and activation kernels against the torch ops the unfused decoder runs, on the same
    device: the fraction of bf16 outputs that differ (W8A8 quantizes these outputs, so a one-ulp difference can move
    a code, or a whole row's scale when it hits the row maximum)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    out = []
    for m, hsz in [(5, 200)] if SMOKE else [(132, 576), (33, 4096), (300, 8192)]:
        x, r = rnd(m, hsz, scale=3.0), rnd(m, hsz)
        norm = LlamaRMSNorm(hsz, eps=1e-5).to(device=DEV, dtype=torch.bfloat16)
        with torch.no_grad():
            norm.weight.copy_(rnd(hsz))
            y, h = fused.add_rmsnorm(x, norm.weight, 1e-5, r)
            ref = norm(x + r)
        frac = float((y != ref).float().mean())
        out.append({"op": "add_rmsnorm_vs_torch", "shape": [m, hsz], "mismatch_fraction": frac,
                    "h_equal": torch.equal(h, x + r), "ok": frac < 1e-3 and torch.equal(h, x + r)})
    for m, inter in [(3, 300)] if SMOKE else [(132, 1536), (33, 14336)]:
        gu = rnd(m, 2 * inter, scale=2.0)
        g_, u_ = gu.chunk(2, dim=-1)
        frac = float((fused.silu_mul(gu) != torch.nn.functional.silu(g_) * u_).float().mean())
        out.append({"op": "silu_mul_vs_torch", "shape": [m, inter], "mismatch_fraction": frac, "ok": frac < 1e-3})
    return out


# ------------------------------------------------------------------ timing
def copies(nbytes: int, make) -> list:
    return [make() for _ in range(max(1, min(64, math.ceil(ROTATE_BYTES / nbytes))))]


def bench_shape(k, n, ms, log) -> list[dict]:
    dev, rows = DEV, []
    g = torch.Generator(device=dev).manual_seed(k * 31 + n)
    w = torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
    sw = w.float().abs().amax(1) / 127.5
    wi8 = (w.float() / sw[:, None]).round().clamp(-128, 127).to(torch.int8)
    wf8, sf8 = fp8.quantize_weight_fp8(w)
    bf_w = copies(2 * n * k, lambda: w.clone())
    i8_w = copies(n * k, lambda: wi8.clone())
    f8_w = copies(n * k, lambda: wf8.clone())
    t = lambda fns: graph_time(fns) * 1e6  # noqa: E731  (µs per call)
    for m in ms:
        x = torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16)
        xs = copies(2 * m * k, lambda: x.clone())  # rotating inputs for the weight-free ops
        cell = {"K": k, "N": n, "M": m}
        cell["bf16"] = t([lambda ww=ww: torch.nn.functional.linear(x, ww) for ww in bf_w])
        qa, sa = w8a8.quantize_act(x)
        qa8, sa8 = w8a8.quantize_act(x, fp8=True)
        # raw cuBLAS (torch._int_mm takes M > 16 only)
        if m > 16:
            cell["raw_int_mm"] = t([lambda d=d: torch._int_mm(qa, d.t()) for d in i8_w])
        cell["raw_scaled_mm"] = t([lambda d=d: torch._scaled_mm(qa8, d.t(), scale_a=sa8[:, None], scale_b=sf8[None, :],
                                                                out_dtype=torch.bfloat16) for d in f8_w])
        cell["raw_scaled_mm_fast"] = t([lambda d=d: torch._scaled_mm(
            qa8, d.t(), scale_a=sa8[:, None], scale_b=sf8[None, :], out_dtype=torch.bfloat16, use_fast_accum=True)
            for d in f8_w])
        # standalone per-token quantization: the first kernel, the default tile, the chooser's pick
        for kind, is_fp8 in (("int8", False), ("fp8", True)):
            default = w8a8.act_quant_candidates(m, k, is_fp8)[0].name
            for col, impl in ((("v1", "row_v1"), ("new", default)) if m > 16 else ()) + (("chosen", None),):
                cell[f"quant_{kind}_{col}"] = t([lambda xx=xx, f=is_fp8, i=impl: w8a8.quantize_act(xx, fp8=f, impl=i)
                                                 for xx in xs])
            cell[f"quant_{kind}_default_impl"] = default
            cell[f"quant_{kind}_impl"] = _common.chosen().get(
                ("act_quant", kind, False, _common.m_bucket(m), k, torch.bfloat16), default)
            cell[f"quant_{kind}_tb_s"] = 3 * m * k / (cell[f"quant_{kind}_chosen"] * 1e-6) / 1e12  # bytes moved
        if m <= 16:  # the one-launch kernel against two launches (quantize_act + the GEMM chooser's pick)
            for kind, d8, s8, ww in (("int8", False, sw, i8_w), ("fp8", True, sf8, f8_w)):
                cell[f"{kind}_two"] = t([lambda d=d, f=d8, sc=s8: w8a8.scaled_mm(*w8a8.quantize_act(x, fp8=f), d, sc)
                                         for d in ww])
        # end to end: quantization + the chooser's GEMM; the GEMM alone on pre-quantized activations
        cell["int8"] = t([lambda d=d: w8a8.w8a8_matmul(x, d, sw) for d in i8_w])
        cell["fp8"] = t([lambda d=d: fp8.fp8_matmul(x, d, sf8) for d in f8_w])
        cell["int8_gemm"] = t([lambda d=d: w8a8.scaled_mm(qa, sa, d, sw) for d in i8_w])
        cell["fp8_gemm"] = t([lambda d=d: w8a8.scaled_mm(qa8, sa8, d, sf8) for d in f8_w])
        cell["int8_impl"] = _common.chosen().get(("int8", _common.m_bucket(m), n, k, torch.bfloat16, False))
        cell["fp8_impl"] = _common.chosen().get(("fp8", _common.m_bucket(m), n, k, torch.bfloat16, False))
        for kind in ("int8", "fp8"):  # the layer-level pick at M <= 16: a one-launch config or two_launch
            cell[f"{kind}_linear_impl"] = _common.chosen().get(
                ("w8_linear", kind, _common.m_bucket(m), n, k, torch.bfloat16, False, False))
        if cell["int8_impl"] != "cublas_int_mm" and m > 16:
            cell["int8_cublas_epilogue"] = t([lambda d=d: w8a8.scaled_mm(qa, sa, d, sw, impl="cublas_int_mm")
                                              for d in i8_w])
        # what feeds the layer: bf16 norm / activation vs the fused + quantized one
        if m <= 16:
            pass
        elif k in SILU_KS:  # down_proj: SiLU(gate) * up of a [M, 2K] gate/up output
            gus = copies(4 * m * k, lambda: torch.randn(m, 2 * k, device=dev, generator=g).to(torch.bfloat16))
            cell["pre_op"] = "silu_mul"
            cell["pre_bf16"] = t([lambda gu=gu: fused.silu_mul(gu) for gu in gus])
            cell["pre_int8"] = t([lambda gu=gu: fused.silu_mul_quant(gu) for gu in gus])
            cell["pre_fp8"] = t([lambda gu=gu: fused.silu_mul_quant(gu, fp8=True) for gu in gus])
            del gus
        else:  # q/k/v, gate/up: residual add + RMSNorm
            nw = torch.randn(k, device=dev, generator=g).to(torch.bfloat16)
            cell["pre_op"] = "add_rmsnorm"
            cell["pre_bf16"] = t([lambda xx=xx: fused.add_rmsnorm(xx, nw, 1e-5, x) for xx in xs])
            cell["pre_int8"] = t([lambda xx=xx: fused.add_rmsnorm_quant(xx, nw, 1e-5, x) for xx in xs])
            cell["pre_fp8"] = t([lambda xx=xx: fused.add_rmsnorm_quant(xx, nw, 1e-5, x, fp8=True) for xx in xs])
        # the layer with its input op: bf16 (norm + F.linear) over fused quant + GEMM
        for kind in ("int8", "fp8") if m > 16 else ():
            cell[f"layer_x_{kind}"] = (cell["pre_bf16"] + cell["bf16"]) / (cell[f"pre_{kind}"] + cell[f"{kind}_gemm"])
        # correctness of the timed end-to-end paths against float64
        ref_i = w8a8.scaled_mm_reference(*w8a8.quantize_act_reference(x), wi8, sw, None, torch.float64)
        qr8, sr8 = w8a8.quantize_act_reference(x, fp8=True)
        ref_f = w8a8.scaled_mm_reference(qr8, sr8, wf8, sf8, None, torch.float64)
        cell["int8_rel_err"] = rel_err(w8a8.w8a8_matmul(x, wi8, sw), ref_i)
        cell["fp8_rel_err"] = rel_err(fp8.fp8_matmul(x, wf8, sf8), ref_f)
        cell["ok"] = cell["int8_rel_err"] < 1e-2 and cell["fp8_rel_err"] < (1e-2 if not SMOKE else 0.1)
        del ref_i, ref_f, xs
        rows.append(cell)
        bf = cell["bf16"]
        log(f"K={k:5d} N={n:5d} M={m:4d} bf16 {bf:7.1f} | int8 {bf / cell['int8']:.2f}x (gemm "
            f"{bf / cell['int8_gemm']:.2f}x {cell['int8_impl']}, layer pick {cell['int8_linear_impl']}) | fp8 "
            f"{bf / cell['fp8']:.2f}x (gemm {bf / cell['fp8_gemm']:.2f}x, raw {bf / cell['raw_scaled_mm']:.2f}x, "
            f"layer pick {cell['fp8_linear_impl']}) | quant fp8 {cell['quant_fp8_chosen']:.1f} us "
            f"{cell['quant_fp8_tb_s']:.2f} TB/s ({cell['quant_fp8_impl']}) | err {cell['int8_rel_err']:.1e}/"
            f"{cell['fp8_rel_err']:.1e}")
    return rows


def _x(c: dict, key: str) -> str:
    """bf16 time / c[key], or '-' where the cell has no such column."""
    return f"{c['bf16'] / c[key]:.2f}" if c.get(key) else "-"


def _f(c: dict, key: str, fmt: str = ".1f") -> str:
    return format(c[key], fmt) if c.get(key) is not None else "-"


def table(cells: list[dict]) -> str:
    head = ("| K x N | M | bf16 µs | INT8 e2e x | INT8 GEMM x | INT8 two-launch x | layer x INT8 | FP8 e2e x "
            "| FP8 GEMM x | FP8 two-launch x | layer x FP8 | _int_mm x | _scaled_mm x | fast x "
            "| fp8 quant v1/new/chosen µs | fp8 quant TB/s | pre bf16/int8/fp8 µs | INT8 GEMM | INT8 layer pick "
            "| FP8 layer pick |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cells:
        lines.append(
            f"| {c['K']}x{c['N']} | {c['M']} | {c['bf16']:.1f} | {_x(c, 'int8')} | {_x(c, 'int8_gemm')} | "
            f"{_x(c, 'int8_two')} | {_f(c, 'layer_x_int8', '.2f')} | {_x(c, 'fp8')} | {_x(c, 'fp8_gemm')} | "
            f"{_x(c, 'fp8_two')} | {_f(c, 'layer_x_fp8', '.2f')} | {_x(c, 'raw_int_mm')} | {_x(c, 'raw_scaled_mm')} | "
            f"{_x(c, 'raw_scaled_mm_fast')} | {_f(c, 'quant_fp8_v1')}/{_f(c, 'quant_fp8_new')}/"
            f"{_f(c, 'quant_fp8_chosen')} | {_f(c, 'quant_fp8_tb_s', '.2f')} | {_f(c, 'pre_bf16')}/{_f(c, 'pre_int8')}/"
            f"{_f(c, 'pre_fp8')} | `{c['int8_impl']}` | `{c.get('int8_linear_impl')}` | `{c.get('fp8_linear_impl')}` |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/sweep_w8.json, else ./sweep_w8.json)")
    ap.add_argument("--shapes", default="all", help="'all' or a comma list of KxN")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes")
    args = ap.parse_args()
    global graph_time, ROTATE_BYTES, SILU_KS
    if SMOKE:
        ROTATE_BYTES, graph_time = 1, smoke_time
    elif not torch.cuda.is_available():
        print("sweep_w8 needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or ".") / "sweep_w8.json"
    t0 = time.time()
    res = {**header(DEV), "cuda": torch.version.cuda, "cells": [], "checks": []}

    def log(s):
        print(s, flush=True)

    def save():
        res["tune_log"] = {repr(k): v for k, v in _common.TUNE_LOG.items()}
        res["chosen"] = {repr(k): v for k, v in _common.chosen().items()}
        res["seconds"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(res, indent=1, default=str))

    if not args.skip_check:
        res["checks"] = check_all(log)
        save()
    if DEV == "cuda":
        res["copy_bytes_per_s"] = copy_bandwidth()
        log(f"device-to-device copy: {res['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)")
    shapes = SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    if SMOKE:
        shapes, ms, SILU_KS = [(256, 96), (512, 64)], [3, 40], {512}
    for k, n in shapes:
        res["cells"] += bench_shape(k, n, ms, log)
        save()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    log(f"done in {time.time() - t0:.0f} s on {res['gpu']}; x = bf16 µs / ours; e2e includes per-token quantization; "
        "GEMM = on pre-quantized activations; layer = (bf16 norm|act + F.linear) / (fused quant + GEMM)")
    log(table(res["cells"]))
    bad_checks = [c for c in res["checks"] if not c["ok"]]
    bad_cells = [c for c in res["cells"] if not c["ok"]]
    if bad_checks or bad_cells:
        log(f"FAILED: {len(bad_checks)} checks, {len(bad_cells)} cells (see the JSON)")
    return 0 if not bad_checks and not bad_cells else 1


if __name__ == "__main__":
    sys.exit(main())
