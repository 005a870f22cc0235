"""W4A16 on the tensor cores (hubquant_kernels.w4a16_tc) against the existing W4A16 kernels and bf16, one run.

    python bench/kernels/sweep_w4.py --out sweep_w4.json       # on a CUDA machine
    python bench/kernels/sweep_w4.py --smoke                   # CPU + TRITON_INTERPRET=1: checks the script

1. Correctness on the GPU: every tensor-core candidate (PTX dequantization and the plain-Triton one) on odd
   shapes, group sizes 32/64/128/-1, sym/asym, bf16/fp16, bias, twice (split-K must leave its workspace zeroed),
   output poisoned with NaN, against float64.
2. Timing, Llama-3-8B shapes plus the fused q/k/v (4096x6144) and gate/up (4096x28672) and 8192x8192: per M the
   chooser (cold L2, as hubquant does) picks the fastest existing candidate ("old": FMA GEMVs, tiled, dequant)
   and, separately, the fastest tensor-core configuration ("tc"); bf16 F.linear, old and tc are then timed as
   CUDA graphs over rotating weight copies (>= 256 MiB, so weights stream from HBM), medians of replays.
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

from hubquant_kernels import _common, pack, w4a16, w4a16_gemv, w4a16_tc  # noqa: E402

_run = sibling("run")
rel_err = _run.rel_err
graph_time, copy_bandwidth = _run.graph_time, _run.copy_bandwidth
DEV = "cuda"
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024), (8192, 8192), (4096, 6144), (4096, 28672)]
ROTATE_BYTES = 256 << 20


def check_tc(log) -> list[dict]:
    dev, out = DEV, []
    g = torch.Generator(device=dev).manual_seed(0)
    cases = [(1, 72, 512, 32, False, torch.bfloat16), (3, 200, 1024, 128, True, torch.float16),
             (1, 4096, 4096, 128, False, torch.bfloat16), (7, 136, 768, -1, True, torch.bfloat16),
             (16, 1000, 14336, 128, True, torch.bfloat16), (12, 264, 2048, 64, False, torch.float16),
             (40, 520, 1024, 128, True, torch.bfloat16), (64, 256, 4096, -1, False, torch.float16)]
    case_no = 0
    for (m, n, k, gs, asym, dt) in cases[:2] if dev == "cpu" else cases:
        gsz = k if gs == -1 else gs
        qw = pack.pack_kn(torch.randint(0, 16, (k, n), device=dev, generator=g))
        s = (torch.rand(k // gsz, n, device=dev, generator=g) * 0.02 + 1e-3).to(dt)
        z = torch.randint(0, 16, (k // gsz, n), device=dev, generator=g).to(torch.uint8) if asym else None
        x = torch.randn(m, k, device=dev, generator=g).to(dt)
        b = torch.randn(n, device=dev, generator=g).to(dt)
        ref = x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
        cands = w4a16_tc.candidates(m, n, k, gsz)
        # a few per case (each distinct configuration compiles anew), rotating so that every block shape and
        # split is checked somewhere
        cands = cands[:2] if dev == "cpu" else cands[case_no % 3::3][:5] + [c for c in cands if "_s2_" in c.name][:1]
        case_no += 1
        for c in cands:
            for asm in ((False,) if dev == "cpu" else (True, False)):
                if not asm and c is not cands[0]:
                    continue  # the plain-Triton dequantization: a subset is enough
                fn = c.fn if asm else (lambda *a, c=c: _plain(c, *a))
                try:
                    y = fn(x, qw, s, z, b, torch.full((m, n), float("nan"), dtype=dt, device=dev), gsz)
                    y2 = fn(x, qw, s, z, b, torch.full((m, n), float("nan"), dtype=dt, device=dev), gsz)
                    e = rel_err(y, ref)
                    ok = e < 1e-2 and rel_err(y2, ref) < 1e-2 and not torch.isnan(y).any().item() \
                        and not torch.isnan(y2).any().item()
                except Exception as ex:  # noqa: BLE001  (a failing candidate is a failed check, not a crash)
                    e, ok = repr(ex)[:300], False
                out.append({"op": "tc", "shape": [m, n, k], "group": gs, "asym": asym, "dtype": str(dt),
                            "impl": c.name, "asm": asm, "rel_err": e, "ok": ok})
    bad = [r for r in out if not r["ok"]]
    log(f"tc correctness: {len(out) - len(bad)}/{len(out)} passed; worst rel err "
        f"{max((r['rel_err'] for r in out if isinstance(r['rel_err'], float)), default=float('nan')):.2e}")
    for r in bad[:12]:
        log(f"  FAILED {r}")
    return out


def _plain(c, *a):
    """Run candidate c with the plain-Triton dequantization instead of the PTX one."""
    kw = _parse(c.name)
    return w4a16_tc.tc(*a, asm=False, **kw)


def _parse(name: str) -> dict:
    head, shape, split, warps = name.split("_")
    bm, bn, bk = map(int, shape.split("x"))
    return {"bm": bm, "bn": bn, "bk": bk, "split_k": int(split[1:]), "warps": int(warps[1:]), "swap": head == "tcT"}


def _parse_gemv2(name: str) -> dict:
    _, bn, bk, split, warps = name.split("_")
    return {"bn": int(bn[2:]), "bk": int(bk[2:]), "split_k": int(split[1:]), "warps": int(warps[1:])}


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
        a = (x, qw, sc, None, None, y, 128)
        old = [c for c in w4a16.candidates(m, n, k, 128) if not c.name.startswith("tc")]
        new = w4a16_tc.candidates(m, n, k, 128)
        c_old, t_old = pick(old, a)
        c_new, t_new = pick(new, a)
        if m == 1:  # the FMA GEMV with its dequantization in plain Triton (no PTX), as before this change
            plain = [_common.Candidate(name=c.name + "_plain", fn=lambda *a, c=c: w4a16_gemv.gemv2(*a, asm=False,
                     **_parse_gemv2(c.name))) for c in w4a16_gemv.candidates(m, n, k, 128)]
            c_plain, _ = pick(plain, a)
        ref = x.double() @ w4a16.dequantize_reference(qw, sc, None, 128).double()
        e_old, e_new = rel_err(c_old.fn(*a).clone(), ref), rel_err(c_new.fn(*a).clone(), ref)
        top = sorted(t_new.items(), key=lambda t: t[1])[:6]
        cell = {"K": k, "N": n, "M": m, "old_impl": c_old.name, "tc_impl": c_new.name, "old_rel_err": e_old,
                "tc_rel_err": e_new, "tune_tc_top": top, "tune_old_best": min(t_old.values()) if t_old else None}
        ys = [torch.empty_like(y) for _ in w4_w]
        cell["bf16"] = graph_time([lambda ww=ww, x=x: torch.nn.functional.linear(x, ww) for ww in bf_w])
        cell["old"] = time_w4(c_old, x, w4_w, ys)
        cell["tc"] = time_w4(c_new, x, w4_w, ys)
        if m == 1:
            cell["gemv2_plain_impl"] = c_plain.name
            cell["gemv2_plain"] = time_w4(c_plain, x, w4_w, ys)
        cell["tc_again"] = time_w4(c_new, x, w4_w, ys)
        cell["w4_bytes"] = n * k // 2 + 2 * n * k // 128 + 2 * m * k + 2 * m * n
        rows.append(cell)
        plain_txt = (f" | gemv2 plain {cell['gemv2_plain'] * 1e6:6.1f} {cell['bf16'] / cell['gemv2_plain']:.2f}x"
                     if m == 1 else "")
        log(f"K={k:5d} N={n:5d} M={m:3d} bf16 {cell['bf16'] * 1e6:7.1f} us{plain_txt} | old {cell['old'] * 1e6:7.1f} "
            f"{cell['bf16'] / cell['old']:.2f}x {c_old.name} | "
            f"tc {cell['tc'] * 1e6:7.1f} ({cell['tc_again'] * 1e6:.1f}) "
            f"{cell['bf16'] / cell['tc']:.2f}x {c_new.name} {cell['w4_bytes'] / cell['tc'] / 1e12:.2f} TB/s "
            f"| err {e_old:.1e}/{e_new:.1e}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sweep_w4.json")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes: checks the script")
    args = ap.parse_args()
    global DEV, graph_time, copy_bandwidth, ROTATE_BYTES
    if args.smoke:
        DEV, ROTATE_BYTES, graph_time, copy_bandwidth = "cpu", 1, smoke_time, (lambda: 1.0)
    _cg = sibling("compare_gemv")
    _cg.DEV = DEV
    shapes, ms = parse_shapes(args.shapes, SHAPES), [int(v) for v in args.ms.split(",")]
    if args.smoke:
        shapes, ms = [(256, 96)], [1, 3]
    res = run_sweep(Path(args.out), DEV, lambda log: check_tc(log) + _cg.check_gemv2(log), bench_shape, shapes, ms,
                    copy_bandwidth)
    return 0 if all(c["ok"] for c in res["checks"]) else 1

if __name__ == "__main__":
    sys.exit(main())
