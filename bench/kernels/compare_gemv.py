"""The first W4A16 GEMV against gemv2 (mantissa codes), and the fused decode ops, side by side in one run.

    python bench/kernels/compare_gemv.py --out gemv.json          # on a CUDA machine

1. Correctness on the GPU: every gemv2 candidate on odd shapes, group sizes 32/128/-1, sym/asym, bf16/fp16, bias,
   twice (split-K workspace must come back zeroed), output poisoned with NaN, against float64; the fused decode
   ops (add+RMSNorm, SiLU*up, rotary+cache) against the torch code they replace.
2. Timing (Llama-3-8B shapes plus the fused q/k/v 4096x6144 and gate/up 4096x28672): for each M, the chooser
   picks the fastest of the earlier candidates ("old": first GEMV + tiled) and separately of the gemv2
   candidates ("new"), each timed with a cold L2 as hubquant's chooser does; then bf16 F.linear, old and new
   are timed as CUDA graphs over rotating weight copies (>= 256 MiB, weights stream from HBM), median of replays.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from harness import parse_shapes, run_sweep, sibling, smoke_time, w4_weights  # noqa: E402
from harness import pick as harness_pick  # noqa: E402
from harness import time_w4 as _time_w4  # noqa: E402

from hubquant_kernels import fused, pack, w4a16, w4a16_gemv  # noqa: E402

_run = sibling("run")
copy_bandwidth, graph_time, rel_err = _run.copy_bandwidth, _run.graph_time, _run.rel_err
DEV = "cuda"

SHAPES = [(4096, 6144), (4096, 28672), (14336, 4096), (8192, 8192), (4096, 4096), (4096, 14336)]  # (K, N)
ROTATE_BYTES = 256 << 20


def check_gemv2(log) -> list[dict]:
    dev, out = DEV, []
    g = torch.Generator(device=dev).manual_seed(0)
    for (m, n, k, gs, asym, dt) in [(1, 72, 512, 32, False, torch.bfloat16), (3, 200, 1024, 128, True, torch.float16),
                                    (1, 4096, 4096, 128, False, torch.bfloat16),
                                    (7, 136, 768, -1, True, torch.bfloat16),
                                    (8, 1000, 14336, 128, True, torch.bfloat16)][:2 if DEV == "cpu" else None]:
        gsz = k if gs == -1 else gs
        qw = pack.pack_kn(torch.randint(0, 16, (k, n), device=dev, generator=g))
        s = (torch.rand(k // gsz, n, device=dev, generator=g) * 0.02 + 1e-3).to(dt)
        z = torch.randint(0, 16, (k // gsz, n), device=dev, generator=g).to(torch.uint8) if asym else None
        x = torch.randn(m, k, device=dev, generator=g).to(dt)
        b = torch.randn(n, device=dev, generator=g).to(dt)
        ref = x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
        for c in w4a16_gemv.candidates(m, n, k, gsz)[:3 if DEV == "cpu" else None]:
            try:
                y = c.fn(x, qw, s, z, b, torch.full((m, n), float("nan"), dtype=dt, device=dev), gsz)
                y2 = c.fn(x, qw, s, z, b, torch.full((m, n), float("nan"), dtype=dt, device=dev), gsz)
                e = rel_err(y, ref)
                ok = e < 1e-2 and rel_err(y2, ref) < 1e-2 and not torch.isnan(y).any().item()
            except Exception as ex:  # noqa: BLE001
                e, ok = repr(ex)[:300], False
            out.append({"op": "gemv2", "shape": [m, n, k], "group": gs, "asym": asym, "dtype": str(dt),
                        "impl": c.name, "rel_err": e, "ok": ok})
    bad = [r for r in out if not r["ok"]]
    log(f"gemv2 correctness: {len(out) - len(bad)}/{len(out)} passed; worst rel err "
        f"{max((r['rel_err'] for r in out if isinstance(r['rel_err'], float)), default=float('nan')):.2e}")
    for r in bad[:10]:
        log(f"  FAILED {r}")
    return out


def check_fused(log) -> list[dict]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    dev, out = DEV, []
    g = torch.Generator(device=dev).manual_seed(1)
    x, r = (torch.randn(1, 1, 4096, device=dev, generator=g).to(torch.bfloat16) for _ in range(2))
    w = torch.randn(4096, device=dev, generator=g).to(torch.bfloat16)
    y, h = fused.add_rmsnorm(x, w, 1e-5, r)
    yr, hr = fused.add_rmsnorm_reference(x, w, 1e-5, r)
    out.append({"op": "add_rmsnorm", "h_equal": torch.equal(h, hr), "y_mismatch": float((y != yr).float().mean()),
                "rel_err": rel_err(y, yr), "ok": torch.equal(h, hr) and rel_err(y, yr) < 1e-2})
    gu = torch.randn(1, 1, 2 * 14336, device=dev, generator=g).to(torch.bfloat16)
    y, yr = fused.silu_mul(gu), fused.silu_mul_reference(gu)
    out.append({"op": "silu_mul", "y_mismatch": float((y != yr).float().mean()), "rel_err": rel_err(y, yr),
                "ok": rel_err(y, yr) < 1e-2})
    nh, nkv, d, length, t = 32, 8, 128, 64, 3
    qkv = torch.randn(t, (nh + 2 * nkv) * d, device=dev, generator=g).to(torch.bfloat16)
    ang = torch.rand(t, d // 2, device=dev, generator=g) * 50
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(torch.bfloat16)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(torch.bfloat16)
    pos = torch.tensor([5, 6, 7], device=dev)
    kc, vc = (torch.randn(1, nkv, length, d, device=dev, generator=g).to(torch.bfloat16) for _ in range(2))
    kc2, vc2 = kc.clone(), vc.clone()
    q = fused.rope_to_cache(qkv, cos, sin, pos, kc, vc, nh, nkv)
    qh, kh, vh = (p.view(1, t, -1, d).transpose(1, 2) for p in qkv.split((nh * d, nkv * d, nkv * d), -1))
    qr, kr = apply_rotary_pos_emb(qh, kh, cos[None], sin[None])
    kc2.index_copy_(2, pos, kr)
    vc2.index_copy_(2, pos, vh)
    out.append({"op": "rope_to_cache", "q_equal": torch.equal(q, qr), "k_equal": torch.equal(kc, kc2),
                "v_equal": torch.equal(vc, vc2), "q_rel_err": rel_err(q, qr),
                "ok": torch.equal(vc, vc2) and rel_err(q, qr) < 1e-2 and rel_err(kc, kc2) < 1e-2})
    for r_ in out:
        log(f"fused {r_}")
    return out


def pick(cands, args):
    return harness_pick(DEV, cands, args)


def time_w4(c, x, w4_w, ys):
    return _time_w4(graph_time, c, x, w4_w, ys)


def bench_shape(k, n, ms, log) -> list[dict]:
    dev, rows = DEV, []
    g, qw, sc, bf_w, w4_w = w4_weights(k, n, dev, ROTATE_BYTES)
    for m in ms:
        x = torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16)
        y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        allc = w4a16.candidates(m, n, k, 128)
        old = [c for c in allc if not c.name.startswith("gemv2")]
        new = [c for c in allc if c.name.startswith("gemv2")]
        if not new:  # gemv2 is offered at M=1 only
            continue
        a = (x, qw, sc, None, None, y, 128)
        c_old, t_old = pick(old, a)
        c_new, t_new = pick(new, a)
        ref = x.double() @ w4a16.dequantize_reference(qw, sc, None, 128).double()
        e_old, e_new = rel_err(c_old.fn(*a).clone(), ref), rel_err(c_new.fn(*a).clone(), ref)
        cell = {"K": k, "N": n, "M": m, "old_impl": c_old.name, "new_impl": c_new.name,
                "old_rel_err": e_old, "new_rel_err": e_new, "tune_old": t_old, "tune_new": t_new}
        cell["bf16"] = graph_time([lambda ww=ww, x=x: torch.nn.functional.linear(x, ww) for ww in bf_w])
        ys = [torch.empty_like(y) for _ in w4_w]
        cell["old"] = time_w4(c_old, x, w4_w, ys)
        cell["new"] = time_w4(c_new, x, w4_w, ys)
        cell["old_again"] = time_w4(c_old, x, w4_w, ys)
        cell["w4_bytes"] = n * k // 2 + 2 * n * k // 128 + 2 * m * k + 2 * m * n
        rows.append(cell)
        log(f"K={k:5d} N={n:5d} M={m:2d} bf16 {cell['bf16'] * 1e6:7.1f} us | old {cell['old'] * 1e6:7.1f} "
            f"({cell['old_again'] * 1e6:.1f}) {cell['bf16'] / cell['old']:.2f}x {c_old.name} | new "
            f"{cell['new'] * 1e6:7.1f} {cell['bf16'] / cell['new']:.2f}x {c_new.name} "
            f"{cell['w4_bytes'] / cell['new'] / 1e12:.2f} TB/s | err {e_old:.1e}/{e_new:.1e}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gemv_compare.json")
    ap.add_argument("--ms", default="1,2,4,8")
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes: checks the script")
    args = ap.parse_args()
    global DEV, graph_time, copy_bandwidth, ROTATE_BYTES
    if args.smoke:
        DEV, ROTATE_BYTES, graph_time, copy_bandwidth = "cpu", 1, smoke_time, (lambda: 1.0)
    shapes, ms = parse_shapes(args.shapes, SHAPES), [int(v) for v in args.ms.split(",")]
    if args.smoke:
        shapes = [(256, 96)]
    run_sweep(Path(args.out), DEV, lambda log: check_gemv2(log) + check_fused(log), bench_shape, shapes, ms,
              copy_bandwidth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
