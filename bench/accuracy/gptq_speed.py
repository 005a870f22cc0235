"""GPTQ wall time, hubquant vs llm-compressor, interleaved (A B A B ...) on SmolLM2-135M-Instruct W4 g64, with
the machine's load average recorded around every run (the 2 cores are shared with other jobs).

    python bench/accuracy/gptq_speed.py --rounds 2            # hq llmc hq llmc
    python bench/accuracy/gptq_speed.py --rounds 2 --hq-options '{"true_sequential": false}'

Each run is a fresh process (bench/accuracy/hq_variant.py or llmc_variant.py) with the calibration/eval token files
of bench/accuracy/run.py (prepared here if missing). Appends one JSON line per run to WORK/speed.jsonl and prints
a table: quant s (load + calibrate + quantize + save, what the wall-time goal compares), perplexity, load average
(1-minute, before and after). Environment: LLMC_PYTHON, BENCH_THREADS (default 1) as in run.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))


def load1() -> float:
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/hubquant-bench-gptq-speed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--only", choices=["hubquant", "llm-compressor"], help="time one tool only")
    ap.add_argument("--hq-options", default="{}", help="GPTQ options for hubquant, JSON")
    ap.add_argument("--wait-load", type=float, default=0.0,
                    help="before each run, wait (up to 10 min) until the 1-minute load is below this (0: don't)")
    args = ap.parse_args()
    from run import prepare, run_one

    from hubquant.assets import smollm2_dir

    model_dir = smollm2_dir()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "calib_ids.pt").exists():
        prepare(work, model_dir)
    threads = os.environ.get("BENCH_THREADS", "1")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    llmc = os.environ.get("LLMC_PYTHON", "/work/venvs/llmc/bin/python")
    tools = [args.only] if args.only else ["hubquant", "llm-compressor"]
    rows = []
    for r in range(args.rounds):
        for tool in tools:
            if args.wait_load:
                t_end = time.time() + 600
                while load1() >= args.wait_load and time.time() < t_end:
                    time.sleep(10)
            script = HERE / ("hq_variant.py" if tool == "hubquant" else "llmc_variant.py")
            cmd = [sys.executable if tool == "hubquant" else llmc, str(script), "--model", str(model_dir),
                   "--work", str(work), "--method", "gptq", "--bits", str(args.bits)]
            if tool == "hubquant":
                cmd += ["--options", args.hq_options]
            before = load1()
            start = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
            res = run_one(cmd, env)
            res.update(tool=tool, round=r, start_utc=start, load_before=before, load_after=load1(),
                       hq_options=json.loads(args.hq_options) if tool == "hubquant" else None)
            rows.append(res)
            with (work / "speed.jsonl").open("a") as f:
                f.write(json.dumps(res) + "\n")
            print(json.dumps(res), flush=True)
    print("\n| round | tool | start UTC | load before/after | quant s | process s | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for x in rows:
        ppl = f"{x['ppl']:.3f}" if "ppl" in x else x.get("error", "?")
        q = f"{x['quant_s']:.1f}" if "quant_s" in x else "-"
        print(f"| {x['round']} | {x['tool']} | {x['start_utc']} | {x['load_before']:.2f} / {x['load_after']:.2f} | "
              f"{q} | {x['process_s']:.1f} | {ppl} |")
    med = {t: statistics.median([x["quant_s"] for x in rows if x["tool"] == t and "quant_s" in x])
           for t in tools if any(x["tool"] == t and "quant_s" in x for x in rows)}
    for t, m in med.items():
        print(f"median quant s, {t}: {m:.1f}")
    if len(med) == 2:
        print(f"ratio hubquant / llm-compressor: {med['hubquant'] / med['llm-compressor']:.2f}")


if __name__ == "__main__":
    main()
