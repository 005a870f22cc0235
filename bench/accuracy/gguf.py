"""GGUF accuracy: SmolLM2-135M-Instruct as every llama.cpp preset hubquant writes, plain (uncalibrated, as
llama-quantize without an imatrix), with an importance matrix, and with GPTQ on the GGUF grids, against the
float base, on held-out text; one process, one after another. Writes docs/accuracy-gguf.md and
docs/img/accuracy-gguf.png.

    python bench/accuracy/gguf.py                      # all presets, plain + imatrix + gptq
    python bench/accuracy/gguf.py --types Q4_K_M Q4_0 --modes plain imatrix
Environment: BENCH_THREADS (default 1).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# this script's folder goes last: Python put it first, where its name would hide the `gguf` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
CALIB = ("fortunes", 32, 512)  # the accuracy benchmark's calibration windows; half its evaluation windows
EVAL_WINDOWS, EVAL_LEN = 6, 512
TYPES = ("Q4_K_M", "Q4_0", "Q6_K", "Q8_0", "Q5_K_M", "Q3_K_M", "Q2_K")
MODES = ("plain", "imatrix", "gptq")


def _job(calib):
    from hubquant.methods import QuantJob
    from hubquant.schemes import QuantScheme, WeightScheme

    return QuantJob(scheme=QuantScheme(weights=WeightScheme(bits=4, group_size=-1)), calib=calib, progress=False)


def run_all(types, modes, work: Path, report) -> tuple[list[dict], dict]:
    """Every (type, mode) in turn; `report(rows, meta)` after each row (a partial report survives a stop)."""
    from ppl import perplexity, prepare_data
    from transformers import AutoModelForCausalLM

    from hubquant.assets import smollm2_dir
    from hubquant.formats.gguf.method import collect_imatrix, run
    from hubquant.formats.gguf.writer import write

    model_dir = smollm2_dir()
    meta = prepare_data(work, model_dir, calib=CALIB, eval_windows=EVAL_WINDOWS, eval_len=EVAL_LEN)
    calib, eval_ids = meta["calib_ids"], meta["eval_ids"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t = time.time()
    base_ppl = perplexity(base, eval_ids)
    print(f"float base: perplexity {base_ppl:.3f} ({time.time() - t:.0f} s)", flush=True)
    t = time.time()
    imatrix = collect_imatrix(copy.deepcopy(base), calib, progress=False) if "imatrix" in modes else None
    imatrix_s = time.time() - t
    rows: list[dict] = []
    meta.update(base_ppl=base_ppl, imatrix_s=imatrix_s)
    for preset in types:
        for mode in modes:
            if preset == "Q8_0" and mode == "imatrix":
                continue  # Q8_0's scale is its block's max (no search to weight), as in llama.cpp
            model = copy.deepcopy(base)
            t = time.time()
            log: list[str] = []
            q = run(model, _job(calib if mode != "plain" else None), mode=mode, preset=preset,
                    imatrix=imatrix if mode == "imatrix" else None, log=log.append)
            quant_s = time.time() - t
            size = None
            if mode == "plain":  # the file's size (the same for every mode of a preset)
                out = work / preset
                qc = write(model, q, out_dir=out, options={"gguf_type": preset, "tokenizer_dir": str(model_dir),
                                                           "split_size": 0})
                size = sum((out / f).stat().st_size for f in qc["files"])
            ppl = perplexity(model, eval_ids)
            row = {"type": preset, "mode": mode, "ppl": ppl, "delta_pct": 100 * (ppl / base_ppl - 1),
                   "quant_s": quant_s, "size": size, "mix": log[-1].split(": ", 2)[-1] if log else ""}
            rows.append(row)
            print(json.dumps(row), flush=True)
            report(rows, meta)
            del model, q
    return rows, meta


def write_report(rows: list[dict], meta: dict, cmd: str, out_md: Path, out_png: Path) -> None:
    by = {(r["type"], r["mode"]): r for r in rows}
    types = list(dict.fromkeys(r["type"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    sizes = {r["type"]: r["size"] for r in rows if r["size"]}
    names = {"plain": "plain (no imatrix)", "imatrix": "imatrix", "gptq": "GPTQ + imatrix"}
    lines = [
        "# GGUF accuracy: llama.cpp presets, plain vs importance matrix vs GPTQ (SmolLM2-135M-Instruct)", "",
        f"Measured {meta['date']} on {meta['machine']} by {cmd}.", "",
        "- Model: SmolLM2-135M-Instruct from `hubquant.assets.smollm2_dir()`; its bf16 weights carry Q4_1 rounding "
        "(they were rebuilt from a Q4_1 GGUF), so low-bit presets lose less here than on an original checkpoint.",
        f"- Calibration (imatrix and GPTQ): {meta['calib']}. Evaluation (held out, checked disjoint): {meta['eval']}.",
        "- Perplexity of the in-memory model whose weights are the GGUF's dequantized values, float32 compute "
        "(what llama.cpp computes from the file up to its own kernels' arithmetic); base = the float model.",
        "- plain = llama.cpp's uncalibrated quantization (hubquant's own block quantizers, llama.cpp's per-tensor "
        "type mix); imatrix = per-column activation energy weighting every block's scale/min search; GPTQ = "
        "blocks' parameters from that search, columns rounded with GPTQ's error compensation.",
        "- SmolLM2's hidden size 576 is a multiple of 32 but not 256: every tensor reading the hidden state "
        "(attn q/k/v/o, ffn gate/up, token embeddings) cannot hold a K-quant and falls back as llama.cpp does "
        "(Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0); only ffn_down (1536 columns) gets K-quants. "
        "So Q4_K_M here is mostly Q5_0, Q3_K_M and Q2_K mostly Q4_0: their rows compare types, not the names.",
        "- GPTQ's error feedback fits the calibration text's activations; on this checkpoint it does not always "
        "lower held-out perplexity below the imatrix search alone (see the rows); docs/accuracy.md finds the same "
        "for INT4 GPTQ without its clip search (gptq-noclip +42.7% vs RTN +36.1%).",
        f"- CPU shared with other jobs ({meta['threads']} thread); times are indicative. Base perplexity "
        f"{meta['base_ppl']:.3f}" + (f"; the imatrix pass took {meta['imatrix_s']:.0f} s" if meta["imatrix_s"] == meta[
            "imatrix_s"] else "") + ". Q8_0 has no imatrix row: its "
        "scale is the block maximum, there is no search to weight (llama.cpp ignores the imatrix for Q8_0 too).", "",
        "| type | file | " + " | ".join(f"{names[m]} ppl (delta)" for m in modes) + " | tensor types (plain) |",
        "|---|---|" + "---|" * len(modes) + "---|",
    ]
    for t in types:
        cells = []
        for m in modes:
            r = by.get((t, m))
            cells.append(f"{r['ppl']:.3f} ({r['delta_pct']:+.2f}%)" if r else "-")
        size = f"{sizes[t] / 1e6:.0f} MB" if t in sizes else "-"
        mix_ = by.get((t, "plain"), by.get((t, modes[0])))["mix"]
        lines.append(f"| {t} | {size} | " + " | ".join(cells) + f" | {mix_} |")
    lines += ["", "Quantization time (s): " + "; ".join(
        f"{t}: " + ", ".join(f"{m} {by[(t, m)]['quant_s']:.0f}" for m in modes if (t, m) in by) for t in types),
        "", f"![perplexity per GGUF type](img/{out_png.name})", ""]
    out_md.write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(modes)
    for i, m in enumerate(modes):
        xs = [j + i * width for j, t in enumerate(types) if (t, m) in by]
        ax.bar(xs, [by[(t, m)]["delta_pct"] for t in types if (t, m) in by], width, label=names[m])
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(types))], types)
    ax.set_ylabel("perplexity increase over float (%)")
    ax.set_title("SmolLM2-135M-Instruct GGUF, Lee news (held out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def rows_from_logs(paths: list[str]) -> tuple[list[dict], dict]:
    """Rows printed by runs of this script (one JSON object per line) and the data descriptions."""
    import re

    from ppl import prepare_data

    from hubquant.assets import smollm2_dir

    rows, base, commands = [], None, []
    for path in paths:
        types = []
        for line in Path(path).read_text(errors="replace").splitlines():
            if line.startswith("{") and '"mode"' in line:
                rows.append(json.loads(line))
                types.append(rows[-1]["type"])
            m = re.search(r"float base: perplexity ([0-9.]+)", line)
            if m:
                base = float(m.group(1))
        commands.append("--types " + " ".join(dict.fromkeys(types)))
    with tempfile.TemporaryDirectory(prefix="hq-gguf-") as tmp:
        meta = prepare_data(Path(tmp), smollm2_dir(), calib=CALIB, eval_windows=EVAL_WINDOWS, eval_len=EVAL_LEN)
    return rows, {"calib": meta["calib"], "eval": meta["eval"], "base_ppl": base, "imatrix_s": float("nan"),
                  "commands": commands}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", nargs="+", default=list(TYPES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--out", default=str(ROOT / "docs" / "accuracy-gguf.md"))
    ap.add_argument("--from-logs", nargs="+", metavar="LOG",
                    help="write the report from the printed rows of earlier runs (e.g. --types split over processes)")
    args = ap.parse_args()
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    out_md = Path(args.out)
    out_png = out_md.parent / "img" / "accuracy-gguf.png"
    out_png.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/accuracy/gguf.py"
    if args.types != list(TYPES) or args.modes != list(MODES):
        cmd += " --types " + " ".join(args.types) + " --modes " + " ".join(args.modes)

    if args.from_logs:
        rows, meta = rows_from_logs(args.from_logs)
        meta.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    machine=f"2-core CPU shared ({platform.machine()}, torch {torch.__version__})", threads=threads)
        order = {t: i for i, t in enumerate(TYPES)}
        rows.sort(key=lambda r: (order.get(r["type"], 99), MODES.index(r["mode"])))
        commands = meta.pop("commands")
        cmd = ", ".join(f"`python bench/accuracy/gguf.py {c}`" for c in commands)
        cmd += f" ({len(commands)} processes at the same time; this page rendered from their rows with `--from-logs`)"
        write_report(rows, meta, cmd, out_md, out_png)
        print(f"wrote {out_md}")
        return

    def report(rows, meta):
        meta.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    machine=f"2-core CPU shared ({platform.machine()}, torch {torch.__version__})", threads=threads)
        write_report(rows, meta, f"`{cmd}`", out_md, out_png)

    with tempfile.TemporaryDirectory(prefix="hq-gguf-") as tmp:
        run_all(args.types, args.modes, Path(tmp), report)
    print(f"wrote {out_md}")


if __name__ == "__main__":
    main()
