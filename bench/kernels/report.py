"""Turn bench/kernels/run.py results into docs/kernels.md tables and docs/img/kernels_*.png plots.

    python bench/kernels/report.py RUN_A.json [RUN_B.json ...] --notes NOTES.md

Later files override cells (same K, N, M) of earlier ones; each table row says which run it came from.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fmt_us(t):
    return f"{t * 1e6:.1f}" if t else "-"


def load_runs(paths):
    runs, cells = [], {}
    for i, p in enumerate(paths):
        r = json.loads(Path(p).read_text())
        m = re.search(r"_run([A-Za-z0-9]+)$", Path(p).stem)  # h100_runD1.json -> D1
        r["label"] = m.group(1) if m else chr(ord("A") + i)
        r["file"] = Path(p).name
        runs.append(r)
        for c in r["cells"]:
            c["run"] = r["label"]
            cells[(c["K"], c["N"], c["M"])] = c
    return runs, cells


def shape_table(cells, k, n, copy_bw):
    rows = [f"### K={k}, N={n}  (weights: bf16 {2 * k * n / 2**20:.0f} MiB, W4 g128 {k * n / 2 / 2**20:.1f} MiB)", "",
            ("| M | bf16 µs | W4A16 µs | W4A16 x | W4A16 TB/s | W4A16 % copy | W4A16 path | INT8 W8A8 µs | INT8 x | "
            "FP8 µs | FP8 x | raw _int_mm µs | raw _scaled_mm µs | run |"),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (kk, nn, m), c in sorted(cells.items()):
        if (kk, nn) != (k, n):
            continue
        bw = c["bytes"]["w4a16"] / c["w4a16"]
        rows.append(
            f"| {m} | {fmt_us(c['bf16'])} | {fmt_us(c['w4a16'])} | {c['bf16'] / c['w4a16']:.2f} | {bw / 1e12:.2f} | "
            f"{100 * bw / copy_bw:.0f}% | `{c['w4a16_impl']}` | {fmt_us(c['w8a8'])} | {c['bf16'] / c['w8a8']:.2f} | "
            f"{fmt_us(c['fp8'])} | {c['bf16'] / c['fp8']:.2f} | {fmt_us(c.get('torch_int_mm'))} | "
            f"{fmt_us(c.get('torch_scaled_mm'))} | {c['run']} |")
    return "\n".join(rows)


def goals(cells, copy_bw):
    def sp(kind, k, n, m):
        c = cells.get((k, n, m))
        return c["bf16"] / c[kind] if c else None

    out = ["| goal | measured | met |", "|---|---|---|"]
    for k, n in ((8192, 8192), (4096, 14336)):
        s = sp("w4a16", k, n, 1)
        c = cells[(k, n, 1)]
        pct = c["bytes"]["w4a16"] / c["w4a16"] / copy_bw
        out.append(f"| W4A16 M=1 >= 3.0x bf16, {k}x{n} | {s:.2f}x | {'yes' if s >= 3 else 'no'} |")
        out.append(f"| W4A16 M=1 >= 75% of copy bandwidth, {k}x{n} | {100 * pct:.0f}% "
                   f"| {'yes' if pct >= .75 else 'no'} |")
    m16 = [sp("w4a16", k, n, 16) for k, n in sorted({(k, n) for k, n, _ in cells})]
    out.append(f"| W4A16 M=16 >= 2.0x (all shapes) | {min(m16):.2f}x .. {max(m16):.2f}x | "
               f"{'yes' if min(m16) >= 2 else 'no'} |")
    big = [(k, n, m) for k, n, m in cells if m >= 256]
    worst = min(sp("w4a16", *key) for key in big)
    out.append(f"| W4A16 never slower than bf16 at M >= 256 | worst {worst:.2f}x | {'yes' if worst >= 1 else 'no'} |")
    for kind, goal, name in (("w8a8", 1.4, "INT8 W8A8"), ("fp8", 1.6, "FP8")):
        vals = [sp(kind, k, n, m) for k, n, m in cells if m >= 2048]
        out.append(f"| {name} >= {goal}x bf16 at M >= 2048 (M=4096 measured) | {min(vals):.2f}x .. {max(vals):.2f}x | "
                   f"{'yes' if min(vals) >= goal else 'no'} |")
    return "\n".join(out)


def plots(cells, out_dir: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    shapes = sorted({(k, n) for k, n, _ in cells})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), sharey=True)
    for ax, (k, n) in zip(axes, shapes):
        ms = sorted(m for kk, nn, m in cells if (kk, nn) == (k, n))
        for kind, label in (("w4a16", "W4A16"), ("w8a8", "INT8 W8A8"), ("fp8", "FP8")):
            ax.plot(ms, [cells[(k, n, m)]["bf16"] / cells[(k, n, m)][kind] for m in ms], marker="o", label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"K={k} N={n}")
        ax.set_xlabel("M (tokens)")
    axes[0].set_ylabel("speedup over bf16 (cuBLAS)")
    axes[0].legend()
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / "kernels_speedup.png"
    fig.savefig(p, dpi=110)
    return [p]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--notes", help="markdown inserted after the header (analysis)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "kernels.md"))
    args = ap.parse_args()
    runs, cells = load_runs(args.results)
    copy_bw = max(r["copy_bytes_per_s"] for r in runs)
    imgs = plots(cells, ROOT / "docs" / "img")
    head = ["# hubquant kernels on the GPU", ""]
    for r in runs:
        ok = sum(c["ok"] for c in r["checks"])
        head.append(f"- run {r['label']} ({r['file']}): {r['date']}, {r['gpu']}, torch {r['torch']}, Triton "
                    f"{r['triton']}, CUDA {r['cuda']}; device-to-device copy {r['copy_bytes_per_s'] / 1e12:.2f} TB/s; "
                    f"correctness checks {ok}/{len(r['checks'])}; {len(r['cells'])} cells in {r['seconds']:.0f} s.")
    head.append("")
    if args.notes:
        head += [Path(args.notes).read_text().strip(), ""]
    body = ["## Goals", "", goals(cells, copy_bw), ""]
    if imgs:
        body += ["## Speedup over bf16", "", *(f"![speedup](img/{p.name})" for p in imgs), ""]
    body += ["## All cells", "", ("Times are medians per call, CUDA-graph replays over rotating weight copies "
             "(>= 256 MiB, so weights stream from HBM). x = bf16 time / kernel time. W4A16 TB/s counts packed "
             "weights + scales + activations + output; % copy is relative to the measured copy bandwidth. INT8 and "
             "FP8 include hubquant's per-token activation quantization; the raw cuBLAS columns do not."), ""]
    for k, n in sorted({(k, n) for k, n, _ in cells}, key=lambda s: (s[0] * s[1], s)):
        body += [shape_table(cells, k, n, copy_bw), ""]
    Path(args.out).write_text("\n".join(head + body) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
