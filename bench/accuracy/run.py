"""Accuracy benchmark: SmolLM2-135M-Instruct, float vs RTN vs GPTQ vs AWQ (hubquant) vs llm-compressor's
GPTQModifier and AWQModifier, same calibration windows and evaluation windows for everyone, each run in a
fresh process, one after another. Writes docs/accuracy.md and docs/img/accuracy.png.

    python bench/accuracy/run.py                 # W4 g64 and W3 g64
    python bench/accuracy/run.py --bits 4        # W4 only
Environment: LLMC_PYTHON (default /work/venvs/llmc/bin/python), BENCH_THREADS (default 1; every run gets the same).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CALIB = ("fortunes", 32, 512)  # source, samples, tokens
EVAL_WINDOWS, EVAL_LEN = 16, 512


def prepare(work: Path, model_dir: Path) -> dict:
    from ppl import prepare_data

    meta = prepare_data(work, model_dir, calib=CALIB, eval_windows=EVAL_WINDOWS, eval_len=EVAL_LEN)
    return {"calib": meta["calib"], "eval": meta["eval"]}


def run_one(cmd: list[str], env: dict) -> dict:
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200], "process_s": wall}
    res = json.loads(lines[-1])
    res["process_s"] = wall
    return res


def kept_sections(doc: Path) -> list[str]:
    """Sections other benchmarks write into the same page (``<!-- NAME-section:begin -->`` ... ``:end -->``)."""
    if not doc.exists():
        return []
    import re

    return ["", *re.findall(r"<!-- [\w-]+-section:begin -->.*?<!-- [\w-]+-section:end -->", doc.read_text(), re.S)]


def write_report(rows: list[dict], meta: dict, out_md: Path, out_png: Path) -> None:
    lines = [
        "# Accuracy: hubquant GPTQ/AWQ vs RTN vs llm-compressor on SmolLM2-135M-Instruct",
        "",
        f"Measured {meta['date']} on {meta['machine']} by `python bench/accuracy/run.py`.",
        "",
        "- Model: SmolLM2-135M-Instruct from `hubquant.assets.smollm2_dir()` (bf16; its weights carry Q4_1 rounding "
        "from the GGUF they were rebuilt from), loaded in bf16 by every run.",
        f"- Calibration (same token windows for every method): {meta['calib']}.",
        f"- Evaluation (checked disjoint from the calibration text): {meta['eval']}; perplexity of the in-memory "
        "quantized model (dequantized weights, bf16 compute).",
        f"- Every run is a fresh process with {meta['threads']} CPU thread(s) (OMP_NUM_THREADS); "
        "the 2 cores were shared "
        "with other jobs, so wall times carry noise.",
        "- llm-compressor 0.14.0.1 (its own venv: torch 2.13.0 CPU, transformers 5.17, compressed-tensors 0.19): "
        "GPTQModifier (actorder static, block 128, dampening 0.01, symmetric) and AWQModifier (duo scaling, grid 20) + "
        "QuantizationModifier (asymmetric). On this CPU-only machine its AWQ calls `Tensor.pin_memory()`, which fails "
        "without CUDA; the harness replaces `torch.Tensor.pin_memory` with the identity.",
        "- hubquant: GPTQ (actorder static groups, block 128, damp 0.01, symmetric, clip search of the static group "
        "ranges), AWQ (duo scaling, grid 20, clip search, asymmetric), RTN min-max symmetric (`rtn`) and asymmetric "
        "(`rtn-asym`, AWQ's baseline).",
        "- `quantize s`: load + calibrate + quantize + save; `process s`: the whole process including imports and "
        "the perplexity run; `peak RSS`: the process's maximum resident memory.",
        "",
        "| scheme | tool | method | perplexity | vs float | quantize s | process s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = next((r["ppl"] for r in rows if r.get("method") == "float" and "ppl" in r), None)
    order = {"float": 0, "rtn": 1, "gptq-noclip": 2, "gptq-loaded": 2, "gptq": 3, "rtn-asym": 4, "awq": 5}
    rows = sorted(rows, key=lambda r: (-r["bits"], order.get(r["method"], 9), r["tool"] != "hubquant"))
    for r in rows:
        scheme = "bf16" if r["method"] == "float" else f"W{r['bits']}A16 g64"
        if r["method"] in ("awq", "rtn-asym"):
            scheme += " asym"
        if "error" not in r and "quant_s" not in r:
            continue  # a placeholder row (used to skip runs with --resume)
        if "error" in r:
            lines.append(f"| {scheme} | {r['tool']} | {r['method']} | failed: {r['error']} | | | "
                         f"{r['process_s']:.0f} | |")
            continue
        delta = f"{100 * (r['ppl'] / base - 1):+.1f}%" if base else ""
        proc = f"{r['process_s']:.0f}" if "process_s" in r else "n/a"
        lines.append(f"| {scheme} | {r['tool']} | {r['method']} | {r['ppl']:.3f} | {delta} | {r['quant_s']:.0f} | "
                     f"{proc} | {r['peak_rss_mib']:.0f} |")
    lines += ["", "![perplexity and time](img/accuracy.png)", ""]
    notes = HERE / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text()]
    out_md.write_text("\n".join(lines + kept_sections(out_md)) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in rows if "quant_s" in r and r["method"] != "float"]
        labels = [f"{r['tool'][:4]} {r['method']} W{r['bits']}" for r in ok]
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        colors = ["tab:blue" if r["tool"] == "hubquant" else "tab:orange" for r in ok]
        ax[0].barh(labels, [r["ppl"] for r in ok], color=colors)
        if base:
            ax[0].axvline(base, color="k", ls="--", lw=1, label="bf16")
            ax[0].legend()
        ax[0].set_xlabel("perplexity (lee-news, lower is better)")
        ax[1].barh(labels, [r["quant_s"] for r in ok], color=colors)
        ax[1].set_xlabel("load + calibrate + quantize + save, s")
        fig.tight_layout()
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--work", default="/tmp/hubquant-bench-accuracy")
    ap.add_argument("--skip-llmc", action="store_true")
    ap.add_argument("--llmc-methods", nargs="+", default=["gptq", "awq"], help="llm-compressor runs per bit width")
    ap.add_argument("--resume", action="store_true", help="keep results.jsonl and skip runs already in it")
    ap.add_argument("--merge", nargs="*", default=[], help="results.jsonl files of other runs to take rows from "
                    "(later files win); implies --resume")
    args = ap.parse_args()
    from hubquant.assets import smollm2_dir

    model_dir = smollm2_dir()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    threads = os.environ.get("BENCH_THREADS", "1")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    meta = prepare(work, model_dir)
    meta.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), threads=threads,
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU, "
                        f"torch {torch.__version__}")
    llmc = os.environ.get("LLMC_PYTHON", "/work/venvs/llmc/bin/python")
    jobs = [("float", 16, None)]
    for bits in args.bits:
        jobs += [("rtn", bits, None), ("rtn-asym", bits, None), ("gptq", bits, None), ("awq", bits, None)]
        if not args.skip_llmc:
            jobs += [(m, bits, llmc) for m in args.llmc_methods]
    results = work / "results.jsonl"
    rows = []
    if (args.resume or args.merge) and results.exists():
        rows = [json.loads(ln) for ln in results.read_text().splitlines() if ln.strip()]
    elif results.exists():
        results.unlink()
    for path in args.merge:
        for ln in Path(path).read_text().splitlines():
            r = json.loads(ln)
            if "error" in r or not r.get("ppl"):
                continue
            rows = [x for x in rows if (x["tool"], x["method"], x["bits"]) != (r["tool"], r["method"], r["bits"])] + [r]
    if args.merge:
        results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = {(r["tool"], r["method"], r["bits"]) for r in rows if "error" not in r}
    for method, bits, py in jobs:
        tool = "llm-compressor" if py else "hubquant"
        if (tool, method, bits) in done:
            continue
        script = HERE / ("llmc_variant.py" if py else "hq_variant.py")
        cmd = [py or sys.executable, str(script), "--model", str(model_dir), "--work", str(work),
               "--method", method, "--bits", str(bits)]
        res = run_one(cmd, env)
        res.setdefault("tool", tool)
        res.setdefault("method", method)
        res.setdefault("bits", bits)
        rows = [r for r in rows if (r["tool"], r["method"], r["bits"]) != (tool, method, bits)] + [res]
        with results.open("a") as f:
            f.write(json.dumps(res) + "\n")
        print(json.dumps(res), flush=True)
        write_report(rows, meta, ROOT / "docs" / "accuracy.md", ROOT / "docs" / "img" / "accuracy.png")
    write_report(rows, meta, ROOT / "docs" / "accuracy.md", ROOT / "docs" / "img" / "accuracy.png")


if __name__ == "__main__":
    main()
