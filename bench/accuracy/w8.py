"""8-bit accuracy benchmark: SmolLM2-135M-Instruct, float vs naive W8A8 vs SmoothQuant W8A8 vs FP8 vs bitsandbytes
LLM.int8 vs NF4 (hubquant), side by side with llm-compressor's SmoothQuant + W8A8 recipe, one run.

    python bench/accuracy/w8.py                # writes docs/accuracy-8bit.md
    python bench/accuracy/w8.py --extended     # also alpha search, norms-only smoothing, static W8A8 and FP8
    python bench/accuracy/w8.py --ablation     # where the W8A8 loss comes from (adds a section to the doc)

Same calibration windows (fortunes, 32 x 512) and evaluation windows (lee-news) for everyone. Activation
quantization is simulated on CPU: hubquant's methods leave forward pre-hooks that quantize each Linear's input
(per token, or with the static input_scale), and llm-compressor's checkpoint is loaded by transformers +
compressed-tensors, which quantizes activations the same way (tests/formats/test_w8a8_loaders.py shows both give
identical logits on hubquant checkpoints). llm-compressor runs in its own venv (LLMC_PYTHON, default
/work/venvs/llmc/bin/python) in a subprocess, in parallel with the hubquant variants (llm-compressor 1 thread,
hubquant BENCH_THREADS, default 2).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CALIB = ("fortunes", 32, 512)
EVAL_WINDOWS, EVAL_LEN = 8, 512
LLMC_ALPHA = 0.8  # llm-compressor's W8A8 example


def llmc_worker(model_dir: str, work: Path, alpha: float) -> None:
    """Runs under llm-compressor's python: SmoothQuantModifier + GPTQModifier(W8A8), save compressed."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    calib = torch.load(work / "calib_ids.pt")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    recipe = [SmoothQuantModifier(smoothing_strength=alpha),
              GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    out = work / "llmc-smoothquant-w8a8"
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    print(json.dumps({"quant_s": time.time() - t0, "out": str(out)}), flush=True)


def prepare(work: Path, model_dir: Path) -> dict:
    from ppl import prepare_data

    return prepare_data(work, model_dir, calib=CALIB, eval_windows=EVAL_WINDOWS, eval_len=EVAL_LEN)


_DICT_ALPHA = {"default": 0.8, "self_attn.v_proj": 0.5, "mlp.up_proj": 0.9}
_GRID = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def variants(extended: bool) -> list[tuple[str, str, dict, str]]:
    """(label, method, options, activation mode) in run order."""
    v = [("naive W8A8", "w8a8", {}, "dynamic"),
         ("SmoothQuant W8A8, alpha 0.5", "smoothquant", {"alpha": 0.5}, "dynamic"),
         ("SmoothQuant W8A8, alpha 0.8", "smoothquant", {"alpha": 0.8}, "dynamic"),
         ("FP8 e4m3 dynamic", "fp8", {}, "dynamic"),
         ("bnb LLM.int8 (threshold 6)", "bnb-int8", {}, "dynamic"),
         ("bnb NF4 + double quant (bf16 compute)", "bnb-nf4", {}, "-")]
    if extended:
        v += [("SmoothQuant W8A8, alpha 0.8, GPTQ weights", "smoothquant", {"alpha": 0.8, "weights": "gptq"},
               "dynamic"),
              ("SmoothQuant W8A8, alpha 0.8 (v_proj->o_proj 0.5, up_proj->down_proj 0.9)", "smoothquant",
               {"alpha": {"default": 0.8, "self_attn.v_proj": 0.5, "mlp.up_proj": 0.9}}, "dynamic"),
              ("SmoothQuant W8A8, alpha 0.8 (v_proj->o_proj 0.5, up_proj->down_proj 0.9), GPTQ weights", "smoothquant",
               {"alpha": {"default": 0.8, "self_attn.v_proj": 0.5, "mlp.up_proj": 0.9}, "weights": "gptq"}, "dynamic"),
              ("SmoothQuant W8A8, alpha search", "smoothquant", {"alpha": "search"}, "dynamic"),
              ("SmoothQuant W8A8, alpha 0.5, norms only", "smoothquant", {"alpha": 0.5, "smooth": "norms"}, "dynamic"),
              ("naive W8A8, static activations", "w8a8", {}, "static"),
              ("SmoothQuant W8A8 alpha 0.5, static activations", "smoothquant", {"alpha": 0.5}, "static"),
              ("FP8 e4m3 static", "fp8", {}, "static"),
              # session 2 (docs/accuracy-8bit.md): layer-output alpha search, FP8 with smoothing / GPTQ weights
              ("FP8 e4m3 dynamic, smoothed alpha 0.8 (v_proj->o_proj 0.5, up_proj->down_proj 0.9)", "fp8",
               {"alpha": _DICT_ALPHA}, "dynamic"),
              ("SmoothQuant W8A8, layer-search alpha", "smoothquant", {"alpha": "layer-search", "alpha_grid": _GRID},
               "dynamic"),
              ("FP8 e4m3 dynamic, GPTQ weights, one pass", "fp8", {"weights": "gptq", "sequential": False},
               "dynamic"),
              ("SmoothQuant W8A8, alpha 0.8 (v_proj->o_proj 0.5, up_proj->down_proj 0.9), GPTQ weights, one pass",
               "smoothquant", {"alpha": _DICT_ALPHA, "weights": "gptq", "sequential": False}, "dynamic"),
              ("FP8 e4m3 dynamic, smoothed alpha 0.8 (v_proj->o_proj 0.5, up_proj->down_proj 0.9), "
               "GPTQ weights, one pass",
               "fp8", {"alpha": _DICT_ALPHA, "weights": "gptq", "sequential": False}, "dynamic"),
              ("FP8 e4m3 dynamic, smoothed layer-search alpha", "fp8", {"alpha": "layer-search", "alpha_grid": _GRID},
               "dynamic")]
    return v


def run_hubquant(base, label, method, options, act_mode, calib_ids, eval_ids, ppl_fn) -> dict:
    import torch

    from hubquant.methods import METHODS, QuantJob
    from hubquant.quant import ActivationScheme, QuantScheme

    spec = METHODS[method]
    scheme = spec.default_scheme
    if act_mode == "static":
        scheme = QuantScheme(weights=scheme.weights, activations=ActivationScheme(
            type=scheme.activations.type, dynamic=False, strategy="tensor"))
    model = copy.deepcopy(base)
    t0 = time.time()
    spec.load()(model, QuantJob(scheme=scheme, calib=calib_ids, options=options, progress=False))
    t_quant = time.time() - t0
    t1 = time.time()
    with torch.no_grad():
        ppl = ppl_fn(model, eval_ids)
    extra = getattr(model, "_hubquant_smoothquant", {}).get("alphas_used")
    if options.get("alpha") == "layer-search" and extra:  # mean alpha per group kind (producer suffix)
        kinds: dict[str, list[float]] = {}
        for k, v in extra.items():
            kinds.setdefault(k.split(".", 3)[-1], []).append(v)
        print(label, {k: round(sum(v) / len(v), 2) for k, v in kinds.items()}, flush=True)
    name = "LLM.int8" if method == "bnb-int8" else scheme.name
    row = {"tool": "hubquant", "label": label, "method": method, "scheme": name, "ppl": ppl,
           "quant_s": t_quant, "eval_s": time.time() - t1}
    if extra:
        vals = sorted(extra.values())
        row["alphas"] = (f"{len(vals)} groups, alpha median {vals[len(vals) // 2]:.1f}, "
                         f"range {vals[0]:.1f}-{vals[-1]:.1f}")
    return row


def write_report(rows: list[dict], meta: dict, out_md: Path) -> None:
    base = next((r["ppl"] for r in rows if r["method"] == "float"), None)
    lines = [
        "# 8-bit accuracy: W8A8 int8 (naive, SmoothQuant), FP8, bitsandbytes on SmolLM2-135M-Instruct",
        "",
        f"Measured {meta['date']} on {meta['machine']} by `python bench/accuracy/w8.py{meta['args']}`.",
        "",
        "- Model: SmolLM2-135M-Instruct from `hubquant.assets.smollm2_dir()` (bf16 safetensors rebuilt from a GGUF; "
        "its weights carry Q4_1 rounding), run in float32 so that only quantization error shows.",
        f"- Calibration (same token windows for every calibrated method): {meta['calib']}.",
        f"- Evaluation (checked disjoint from the calibration text): {meta['eval']}; perplexity, each window scored "
        "on its own.",
        "- Activation quantization is simulated on CPU. hubquant: each quantized Linear holds its dequantized weight "
        "and a forward pre-hook quantizes its input (int8 per token with scale absmax/127.5, FP8 e4m3 per token "
        "with absmax/448, or a static calibrated scale; LLM.int8: per-token int8 with columns holding a value >= 6 "
        "kept in float, as bitsandbytes computes it; NF4: input cast to bf16). llm-compressor: its saved checkpoint "
        "loaded by transformers + compressed-tensors, which quantizes activations in the forward the same way.",
        f"- llm-compressor 0.14.0.1 in its own venv (torch 2.13.0 CPU, transformers 5.17, compressed-tensors 0.19): "
        f"its W8A8 example recipe, `SmoothQuantModifier(smoothing_strength={LLMC_ALPHA})` + "
        "`GPTQModifier(scheme=\"W8A8\", ignore=[\"lm_head\"])` (GPTQ int8 weights; hubquant uses round-to-nearest "
        "int8 weights), run in a subprocess with 1 CPU thread in parallel with the hubquant variants "
        f"({meta['threads']} threads).",
        "- hubquant SmoothQuant smooths input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, "
        "v_proj -> o_proj (scales tied across the query heads that share a KV head) and up_proj -> down_proj "
        "(`smooth=\"all\"`, the default); `norms only` is llm-compressor's mapping set.",
        "- `quantize s`: calibrate + smooth + quantize in memory (llm-compressor: its whole oneshot + save); the 2 "
        "cores were shared with other jobs, so times carry noise.",
        "",
        "| variant | tool | scheme | perplexity | vs float | quantize s | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['tool']} | {r.get('scheme', '')} | failed: {r['error']} | | | |")
            continue
        delta = "" if r["method"] == "float" or not base else f"{100 * (r['ppl'] / base - 1):+.2f}%"
        q = f"{r['quant_s']:.0f}" if r.get("quant_s") is not None else ""
        lines.append(f"| {r['label']} | {r['tool']} | {r.get('scheme', '')} | {r['ppl']:.3f} | {delta} | {q} | "
                     f"{'; '.join(x for x in (r.get('alphas'), r.get('note')) if x)} |")
    keep, marker = "", "\n## Where the W8A8 loss comes from"  # an earlier `--ablation` section survives
    if out_md.exists() and marker in out_md.read_text():
        keep = marker + out_md.read_text().split(marker)[1]
    out_md.write_text("\n".join(lines) + "\n" + meta.get("summary", "") + keep)


def summarize(rows: list[dict]) -> str:
    by = {r["label"]: r for r in rows if "ppl" in r}
    base = by.get("float", {}).get("ppl")
    if not base:
        return ""
    pct = {k: 100 * (r["ppl"] / base - 1) for k, r in by.items()}
    out = ["", "## Goals", ""]
    naive = pct.get("naive W8A8")
    sq = {k: v for k, v in pct.items() if k.startswith("SmoothQuant") and "static" not in k}
    if sq:
        best = min(sq, key=sq.get)
        out.append(f"- SmoothQuant W8A8 within 1% of float: best hubquant variant ({best}) "
                   f"{sq[best]:+.2f}% -> {'met' if sq[best] <= 1 else 'NOT met'}.")
        if naive is not None:
            beats = all(v < naive for v in sq.values())
            out.append(f"- SmoothQuant strictly better than naive W8A8 ({naive:+.2f}%): "
                       f"{'yes, every SmoothQuant variant' if beats else 'NOT for every variant'}.")
    fp8 = {k: v for k, v in pct.items() if k.startswith("FP8 e4m3 dynamic")}
    if fp8:
        best = min(fp8, key=fp8.get)
        out.append(f"- FP8 (dynamic) within 1% of float: best hubquant variant ({best}) {fp8[best]:+.2f}% -> "
                   f"{'met' if fp8[best] <= 1 else 'NOT met'}.")
    return "\n".join(out) + "\n"


ABLATION_WINDOWS = 4
ABLATION_GROUPS = (("q/k/v inputs", ("q_proj", "k_proj", "v_proj")), ("o_proj inputs", ("o_proj",)),
                   ("gate/up inputs", ("gate_proj", "up_proj")), ("down_proj inputs", ("down_proj",)))


def ablation(base, calib_ids, eval_ids, ppl_fn) -> list[str]:
    """Naive vs SmoothQuant (alpha 0.8, and the per-group alpha search) W8A8: int8 weights alone, then activation
    quantization on one group of Linears at a time, on the first ABLATION_WINDOWS evaluation windows."""
    import torch

    from hubquant.methods import METHODS, QuantJob
    from hubquant.methods.actquant import attach_activation_quant, attach_input_hooks, detach_activation_quant

    ev = eval_ids[:ABLATION_WINDOWS]
    with torch.no_grad():
        f = ppl_fn(base, ev)
    scheme = METHODS["smoothquant"].default_scheme
    cols = ["all activations", "weights only"] + [g for g, _ in ABLATION_GROUPS]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, method, opts in (("naive W8A8", "w8a8", {}), ("SmoothQuant alpha 0.8", "smoothquant", {"alpha": 0.8}),
                                ("SmoothQuant alpha search", "smoothquant", {"alpha": "search"})):
        model = copy.deepcopy(base)
        q = METHODS[method].load()(model, QuantJob(scheme=scheme, calib=calib_ids, options=opts, progress=False))
        cells = []
        for col in cols:
            detach_activation_quant(model)
            if col == "all activations":
                attach_activation_quant(model, q, scheme.activations)
            elif col != "weights only":
                suffixes = dict(ABLATION_GROUPS)[col]
                attach_input_hooks(model, {n: v for n, v in q.items() if n.rsplit(".", 1)[-1] in suffixes},
                                   scheme.activations)
            with torch.no_grad():
                cells.append(f"{100 * (ppl_fn(model, ev) / f - 1):+.2f}%")
            print(label, col, cells[-1], flush=True)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return ["", "## Where the W8A8 loss comes from (`--ablation`)", "",
            f"Perplexity change vs float ({f:.3f}) on the first {ABLATION_WINDOWS} evaluation windows: int8 weights "
            "everywhere, activations quantized everywhere, nowhere, or only at the inputs of one kind of Linear.", "",
            *lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/hubquant-bench-w8")
    ap.add_argument("--extended", action="store_true")
    ap.add_argument("--skip-llmc", action="store_true")
    ap.add_argument("--ablation", action="store_true", help="only the ablation; appends a section to the doc")
    ap.add_argument("--only", nargs="+", metavar="LABEL_PART",
                    help="run only the (extended) variants whose label contains one of these; their rows are added "
                         "to the previous run's rows (same --work) and marked with the date")
    ap.add_argument("--llmc-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.llmc_worker:
        llmc_worker(args.model, work, LLMC_ALPHA)
        return

    import torch
    from transformers import AutoModelForCausalLM

    from hubquant.assets import smollm2_dir

    sys.path.insert(0, str(HERE))
    from ppl import perplexity

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model_dir = smollm2_dir()
    work.mkdir(parents=True, exist_ok=True)
    meta = prepare(work, model_dir)
    calib_ids, eval_ids = meta.pop("calib_ids"), meta.pop("eval_ids")
    meta.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=f"{platform.processor() or platform.machine()} ({_cpu_name()}), {os.cpu_count()} CPU cores, "
                        f"no GPU, torch {torch.__version__}",
                args=" --extended" if args.extended else "", threads=torch.get_num_threads())
    out_md = ROOT / "docs" / "accuracy-8bit.md"
    if args.ablation:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        section = ablation(base, calib_ids, eval_ids, perplexity)
        text = out_md.read_text() if out_md.exists() else ""
        text = text.split("\n## Where the W8A8 loss comes from")[0].rstrip("\n") + "\n"
        out_md.write_text(text + "\n".join(section) + f"\nAblation measured {meta['date']} on {meta['machine']}.\n")
        return
    llmc_proc = None
    if not args.skip_llmc and not args.only:
        py = os.environ.get("LLMC_PYTHON", "/work/venvs/llmc/bin/python")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        log = open(work / "llmc.log", "w")
        llmc_proc = subprocess.Popen([py, str(Path(__file__).resolve()), "--llmc-worker", "--model", str(model_dir),
                                      "--work", str(work)], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    rows: list[dict] = []
    if args.only:  # keep the previous run's rows (and its date in the header), add the selected variants
        previous = work / "results.jsonl"
        by_label = {}
        for line in previous.read_text().splitlines() if previous.exists() else []:
            row = json.loads(line)
            by_label[row["label"]] = row
        rows = [r for r in by_label.values() if not any(p in r["label"] for p in args.only)]
        meta["date"] = next((r["date"] for r in rows if "date" in r), meta["date"])

    def record(row):
        row.setdefault("date", meta["date"] if not args.only else
                       datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        if args.only:
            row["note"] = (row.get("note", "") + f" (added by --only, {row['date']})").strip()
        rows.append(row)
        print(json.dumps(row), flush=True)
        with (work / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        meta["summary"] = summarize(rows)
        write_report(rows, meta, out_md)

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if not args.only:
        t1 = time.time()
        with torch.no_grad():
            record({"tool": "-", "label": "float", "method": "float", "scheme": "fp32",
                    "ppl": perplexity(base, eval_ids), "quant_s": None, "eval_s": time.time() - t1})
    for label, method, options, act in variants(args.extended or bool(args.only)):
        if args.only and not any(p in label for p in args.only):
            continue
        try:
            record(run_hubquant(base, label, method, options, act, calib_ids, eval_ids, perplexity))
        except Exception as e:  # one failed variant must not hide the others
            record({"tool": "hubquant", "label": label, "method": method, "error": f"{type(e).__name__}: {e}"[:200]})
    if llmc_proc is not None:
        stdout, _ = llmc_proc.communicate()
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        label = f"SmoothQuant (alpha {LLMC_ALPHA}) + GPTQ W8A8"
        if llmc_proc.returncode or not lines:
            err = (work / "llmc.log").read_text().strip().splitlines() or ["?"]
            record({"tool": "llm-compressor", "label": label, "method": "smoothquant", "error": err[-1][:200]})
        else:
            info = json.loads(lines[-1])
            model = AutoModelForCausalLM.from_pretrained(info["out"], device_map="cpu", dtype=torch.float32).eval()
            t1 = time.time()
            with torch.no_grad():
                ppl = perplexity(model, eval_ids)
            record({"tool": "llm-compressor", "label": label, "method": "smoothquant", "scheme": "W8A8", "ppl": ppl,
                    "quant_s": info["quant_s"], "eval_s": time.time() - t1,
                    "note": "checkpoint loaded by transformers 5.24 + compressed-tensors 0.20"})


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
