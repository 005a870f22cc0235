"""docs/memory.md and docs/img/memory.svg from bench/memory/run.py's results.

    python bench/memory/report.py bench/memory/results/*.json    # several runs' rows in one table (a later file's
                                                                 # row replaces an earlier one of the same size, case
                                                                 # and path)
    python bench/memory/report.py RUNS.json --gpu bench/memory/results/gpu-70b.json   # with the GPU section

The GPU section comes from `python bench/quantize_speed/run.py --config 70b --layers 2 --methods gptq --no-save
--json FILE` (its peak_gpu_gib and peak_gpu_reserved_gib); without --gpu it says the GPU figure is not measured.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOALS = {"rtn": 40, "gptq": 50}  # peak RSS as % of the model's bytes
GOAL_MIN_GB = 2  # the goals are for models of several GB; smaller sizes are in the table for the byte comparison
CASE_TEXT = {"rtn": "RTN, evaluation skipped", "rtn+eval": "RTN with evaluation",
             "gptq": "GPTQ (16 x 512 calibration tokens), evaluation skipped"}


def table(rows: list[dict]) -> list[str]:
    sha = {(r["size_gb"], r["case"], r["streaming"]): r["sha256"] for r in rows}
    out = ["| model | layers | read from | case | path | peak RSS GB | % of model | wall s | same bytes as in-memory |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["case"], r["size_gb"], r["streaming"] != "on")):
        other = sha.get((r["size_gb"], r["case"], "off"))
        same = "-" if r["streaming"] == "off" or other is None else ("yes" if other == r["sha256"] else "NO")
        path = "streamed" if r["streaming"] == "on" else "in memory"
        case = CASE_TEXT.get(r["case"], r["case"])
        src = r.get("source", "local Hub")
        out.append(f"| {r['model_bytes'] / 1e9:.2f} GB | {r['layers']} | {src} | {case} | {path} | "
                   f"{r['peak_rss_bytes'] / 1e9:.2f} | {r['rss_pct_of_model']:.0f}% | {r['wall_s']:.0f} | {same} |")
    return out


def goals(rows: list[dict]) -> list[str]:
    out = []
    for case, goal in GOALS.items():
        for r in sorted((r for r in rows if r["case"] == case and r["streaming"] == "on"
                         and r["model_bytes"] >= GOAL_MIN_GB * 1e9), key=lambda r: r["size_gb"]):
            ok = r["rss_pct_of_model"] <= goal
            out.append(f"- {CASE_TEXT[case]}, {r['model_bytes'] / 1e9:.2f} GB: {r['rss_pct_of_model']:.0f}% of the "
                       f"model against the {goal}% goal: {'met' if ok else 'missed'}.")
    sha = {(r["size_gb"], r["case"], r["streaming"]): r["sha256"] for r in rows}
    for (gb, case, mode), digest in sorted(sha.items()):
        if mode == "on" and (gb, case, "off") in sha:
            same = digest == sha[(gb, case, "off")]
            out.append(f"- {CASE_TEXT.get(case, case)}, {gb:g} GB: the streamed files are "
                       f"{'the same bytes as' if same else 'NOT the same bytes as'} the in-memory path's.")
    return out


def gpu_section(path: Path | None) -> list[str]:
    """docs/memory.md's GPU section from bench/quantize_speed/run.py's JSON (a list of rows), or 'not measured'."""
    head = ["## On the GPU (70B-shaped GPTQ)", ""]
    cmd = "python bench/quantize_speed/run.py --config 70b --layers 2 --methods gptq --no-save --json FILE"
    rows = [r for r in json.loads(path.read_text()) if r.get("method") == "gptq"] if path else []
    if not rows or rows[0].get("peak_gpu_gib") is None:
        return head + [f"Not measured on a GPU yet: `{cmd}` reports `peak_gpu_gib` (max allocated) and "
                       "`peak_gpu_reserved_gib` (max reserved); `python bench/memory/report.py RUNS.json --gpu FILE` "
                       "puts them here.", ""]
    r = rows[0]
    limit = 24e9 / 2**30
    ok = r["peak_gpu_gib"] <= limit and r["peak_gpu_reserved_gib"] <= limit
    return head + [
        f"Measured {r['date']} on {r['device']} (torch {r['torch']}) by `{cmd}`: GPTQ (W4, group 128, act-order, "
        f"{r['samples']} x {r['seq_len']} calibration tokens) on {r['layers']} of the {r['full_layers']} decoder "
        "layers of a Llama-3-70B-shaped model (random bf16 weights in host memory; each layer visits the GPU in "
        "turn, so the peak does not grow with depth).", "",
        "| peak allocated GiB | peak reserved GiB | goal | quantize s (2 layers) | later layer s |",
        "|---|---|---|---|---|",
        f"| {r['peak_gpu_gib']:.1f} | {r['peak_gpu_reserved_gib']:.1f} | 24 GB ({limit:.1f} GiB), allocated and "
        f"reserved: {'met' if ok else 'missed'} | {r['quant_s']:.0f} | {r['later_layer_s'] or float('nan'):.0f} |", ""]


def svg(rows: list[dict]) -> str:
    """Peak RSS (GB) against model size (GB): one line per case and path, the goals dashed."""
    w, h, left, bottom, top, right = 640, 380, 60, 50, 20, 210
    xmax = max(r["model_bytes"] for r in rows) / 1e9 * 1.05
    ymax = max(max(r["peak_rss_bytes"] for r in rows) / 1e9, 0.5 * xmax) * 1.1

    def xy(x, y):
        return left + x / xmax * (w - left - right), h - bottom - y / ymax * (h - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             'font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>']
    x0, y0 = xy(0, 0)
    x1, y1 = xy(xmax, ymax)
    parts.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="black"/>')
    parts.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="black"/>')
    for i in range(int(xmax) + 1):
        x, _ = xy(i, 0)
        parts.append(f'<text x="{x}" y="{y0 + 16}" text-anchor="middle">{i}</text>')
    step = 0.5 if ymax < 4 else 1
    k = 0
    while k * step <= ymax:
        _, y = xy(0, k * step)
        parts.append(f'<text x="{x0 - 6}" y="{y + 4}" text-anchor="end">{k * step:g}</text>')
        parts.append(f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#eee"/>')
        k += 1
    parts.append(f'<text x="{(x0 + x1) / 2}" y="{h - 10}" text-anchor="middle">model size (GB, bf16)</text>')
    parts.append(f'<text x="15" y="{(y0 + y1) / 2}" transform="rotate(-90 15 {(y0 + y1) / 2})" '
                 f'text-anchor="middle">peak RSS of hubquant convert (GB)</text>')
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    series: dict = {}
    for r in rows:
        series.setdefault((r["case"], r["streaming"]), []).append((r["model_bytes"] / 1e9, r["peak_rss_bytes"] / 1e9))
    legend_y = top + 10
    for i, ((case, mode), pts) in enumerate(sorted(series.items())):
        pts.sort()
        c = colors[i % len(colors)]
        dash = "" if mode == "on" else ' stroke-dasharray="2,3"'
        path = " ".join(f"{'M' if j == 0 else 'L'}{xy(x, y)[0]:.1f},{xy(x, y)[1]:.1f}" for j, (x, y) in enumerate(pts))
        parts.append(f'<path d="{path}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        for x, y in pts:
            px, py = xy(x, y)
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{c}"/>')
        label = f"{case} {'streamed' if mode == 'on' else 'in memory'}"
        parts.append(f'<line x1="{w - right + 15}" y1="{legend_y}" x2="{w - right + 40}" y2="{legend_y}" '
                     f'stroke="{c}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{w - right + 45}" y="{legend_y + 4}">{label}</text>')
        legend_y += 18
    for pct, c in ((40, "#888"), (50, "#bbb")):
        xa, ya = xy(0, 0)
        xb, yb = xy(xmax, xmax * pct / 100)
        parts.append(f'<line x1="{xa}" y1="{ya}" x2="{xb}" y2="{yb}" stroke="{c}" stroke-dasharray="6,4"/>')
        parts.append(f'<text x="{xb + 4}" y="{yb + 4}" fill="{c}">{pct}%</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_report(meta: dict, rows: list[dict], md: Path, img: Path, gpu: Path | None = None) -> None:
    img.parent.mkdir(parents=True, exist_ok=True)
    img.write_text(svg(rows))
    notes = (Path(__file__).parent / "NOTES.md").read_text()
    lines = ["# Peak host memory of `hubquant convert`", "",
             f"Measured {meta['date']} on {meta['hardware']}, shared with other jobs (wall times are noisy), by:", "",
             *[f"- `{c}`" for c in meta["command"].split("\n")], "",
             "Random-weight models with Llama shapes (TinyLlama-1.1B's decoder layer: hidden 2048, MLP 5632, 32 heads, "
             "4 KV heads; 49152-token vocabulary, untied lm_head), bf16, more or fewer layers for each size; published "
             "on a local Hub (or, where the table says so, converted from the local folder: one copy on disk instead "
             "of three) and converted by the CLI in a child process. W4A16, group 128, compressed-tensors. "
             "Peak RSS is the process's VmHWM.", "",
             *table(rows), "",
             f"![peak RSS against model size]({img.relative_to(md.parent).as_posix()})", "",
             "## Goals", "", *goals(rows), "",
             notes.rstrip(), "",
             *gpu_section(gpu)]
    md.write_text("\n".join(lines).rstrip() + "\n")


def main() -> None:
    args = sys.argv[1:]
    gpu = None
    if "--gpu" in args:
        i = args.index("--gpu")
        gpu = Path(args[i + 1])
        args = args[:i] + args[i + 2:]
    runs = [json.loads(Path(p).read_text()) for p in args]
    latest: dict = {}  # (size, case, path) -> (run index, row): a later run's row replaces an earlier one's
    for i, r in enumerate(runs):
        for row in r["rows"]:
            latest[(row["size_gb"], row["case"], row["streaming"])] = (i, row)
    used = sorted({i for i, _ in latest.values()})  # runs with a row in the table
    meta = dict(runs[used[0]]["meta"])
    meta["command"] = "\n".join(runs[i]["meta"]["command"] for i in used)
    dates = sorted(runs[i]["meta"]["date"] for i in used)
    meta["date"] = dates[0] if len(set(dates)) == 1 else f"from {dates[0]} to {dates[-1]}"
    rows = [row for _, row in latest.values()]
    write_report(meta, rows, ROOT / "docs" / "memory.md", ROOT / "docs" / "img" / "memory.svg", gpu)


if __name__ == "__main__":
    main()
