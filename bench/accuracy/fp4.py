"""FP4 accuracy: NVFP4A16, MXFP4A16 (rtn and gptq) and NVFP4 (W4A4, rtn) next to float and W4A16 g64 rtn/gptq on
SmolLM2-135M-Instruct, same calibration and evaluation windows as bench/accuracy/run.py, each variant in a fresh
process, one after another. Writes the "FP4 schemes" section of docs/accuracy.md (between its markers).

    python bench/accuracy/fp4.py
Environment: BENCH_THREADS (default 1; every run gets the same).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from run import CALIB, EVAL_LEN, EVAL_WINDOWS, run_one  # noqa: E402

BEGIN, END = "<!-- fp4-section:begin -->", "<!-- fp4-section:end -->"
# (label, method, extra arguments of hq_variant.py, bits per weight incl. scales)
JOBS = [
    ("bf16", "float", [], 16.0),
    ("W4A16 g64", "rtn", ["--bits", "4"], 4.25),
    ("W4A16 g64", "gptq", ["--bits", "4"], 4.25),
    ("NVFP4A16", "rtn", ["--scheme", "NVFP4A16"], 4.5),
    ("NVFP4A16", "gptq", ["--scheme", "NVFP4A16"], 4.5),
    ("MXFP4A16", "rtn", ["--scheme", "MXFP4A16"], 4.25),
    ("MXFP4A16", "gptq", ["--scheme", "MXFP4A16"], 4.25),
    ("NVFP4 (W4A4)", "rtn", ["--scheme", "NVFP4"], 4.5),
]


def section(rows: list[dict], meta: dict) -> str:
    base = next((r["ppl"] for r in rows if r["method"] == "float" and "ppl" in r), None)
    lines = [
        BEGIN,
        "## FP4 schemes (NVFP4, MXFP4)",
        "",
        f"Measured {meta['date']} on {meta['machine']} (2-core CPU, shared with other jobs: wall times are noisy) by "
        "`python bench/accuracy/fp4.py`.",
        "",
        "- Model: SmolLM2-135M-Instruct from `hubquant.assets.smollm2_dir()`, loaded in bf16. Its weights carry Q4_1 "
        "rounding from the GGUF they were rebuilt from (every row starts from those weights).",
        f"- Calibration: {meta['calib']}; evaluation: {meta['eval']} (the windows of the table above).",
        "- Perplexity of the in-memory quantized model (dequantized weights, bf16 compute); NVFP4 (W4A4) also "
        "quantizes every quantized Linear's input as compressed-tensors does (e4m3 scales per 16 inputs under a "
        "calibrated global scale).",
        "- NVFP4: e4m3 scales per 16 weights under a per-tensor global scale (q/k/v and gate/up share one); MXFP4: "
        "E8M0 scales per 32 weights. GPTQ on the FP4 grid keeps each block's scale from the float weights "
        "(as llm-compressor's GPTQ does) and compensates rounding errors column by column (act-order, block 128, "
        "damp 0.01). W4A16 g64 rows: integer 4-bit, symmetric, groups of 64 (GPTQ with its clip search).",
        "- `bits/weight` counts the scales (16-bit per group of 64, 8-bit per block of 16 or 32); "
        "`quantize s`: load + calibrate + quantize + save; `process s`: the whole process.",
        "",
        "| scheme | method | bits/weight | perplexity | vs bf16 | quantize s | process s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['method']} | {r['bpw']} | failed: {r['error']} | | | | |")
            continue
        delta = f"{100 * (r['ppl'] / base - 1):+.1f}%" if base else ""
        lines.append(f"| {r['label']} | {r['method']} | {r['bpw']:g} | {r['ppl']:.3f} | {delta} | {r['quant_s']:.0f} | "
                     f"{r['process_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    lines += ["", *findings(rows, base), "", END]
    return "\n".join(lines)


def findings(rows: list[dict], base: float | None) -> list[str]:
    """Side-by-side statements computed from this run's rows."""
    ppl = {(r["label"], r["method"]): r["ppl"] for r in rows if "ppl" in r}
    out = []
    for label in ("NVFP4A16", "MXFP4A16"):
        rtn, gptq = ppl.get((label, "rtn")), ppl.get((label, "gptq"))
        if rtn and gptq:
            out.append(f"- {label}: GPTQ on the FP4 grid {gptq:.2f} vs round-to-nearest {rtn:.2f} "
                       f"({100 * (gptq / rtn - 1):+.1f}%).")
    w4, nv, mx = ppl.get(("W4A16 g64", "gptq")), ppl.get(("NVFP4A16", "gptq")), ppl.get(("MXFP4A16", "gptq"))
    if w4 and nv and mx:
        out.append(f"- With GPTQ, NVFP4A16 ({nv:.2f}, 4.5 bits/weight) is within {100 * abs(nv / w4 - 1):.1f}% of "
                   f"integer W4A16 g64 ({w4:.2f}, 4.25 bits/weight); MXFP4A16 (E8M0 scales per 32 weights) is higher "
                   f"({mx:.2f}).")
    w4a4, w4a16 = ppl.get(("NVFP4 (W4A4)", "rtn")), ppl.get(("NVFP4A16", "rtn"))
    if w4a4 and w4a16 and base:
        out.append(f"- Quantizing the activations too (NVFP4, W4A4) adds {100 * (w4a4 / w4a16 - 1):.1f}% perplexity "
                   f"over NVFP4A16 round-to-nearest ({w4a4:.2f} vs {w4a16:.2f}); accuracy only (no GPU in this run).")
    return out


def write_section(doc: Path, text: str) -> None:
    """Replace the section between the markers in `doc`, or append it."""
    old = doc.read_text() if doc.exists() else ""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    new = pattern.sub(lambda m: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    doc.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/hubquant-bench-accuracy-fp4")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "accuracy.md"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the section from WORK/fp4_results.json")
    args = ap.parse_args()
    work = Path(args.work)
    if args.report_only:
        saved = json.loads((work / "fp4_results.json").read_text())
        write_section(Path(args.doc), section(saved["rows"], saved["meta"]))
        return
    from ppl import prepare_data

    from hubquant.assets import smollm2_dir

    model_dir = smollm2_dir()
    work.mkdir(parents=True, exist_ok=True)
    threads = os.environ.get("BENCH_THREADS", "1")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")])}
    data = prepare_data(work, model_dir, calib=CALIB, eval_windows=EVAL_WINDOWS, eval_len=EVAL_LEN)
    meta = {"calib": data["calib"], "eval": data["eval"],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU, "
                       f"torch {torch.__version__}, {threads} thread(s) per run"}
    rows = []
    for label, method, extra, bpw in JOBS:
        cmd = [sys.executable, str(HERE / "hq_variant.py"), "--model", str(model_dir), "--work", str(work),
               "--method", method, *extra]
        res = run_one(cmd, env)
        res.update(label=label, method=method, bpw=bpw)
        rows.append(res)
        print(json.dumps(res), flush=True)
        (work / "fp4_results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        write_section(Path(args.doc), section(rows, meta))


if __name__ == "__main__":
    main()
