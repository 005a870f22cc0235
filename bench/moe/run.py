"""MoE conversion time and per-expert coverage on a Qwen3-MoE-shaped model (random weights), side by side per method.

    python bench/moe/run.py                      # CPU, small scale (a few minutes on 2 shared cores)
    python bench/moe/run.py --preset gpu --work $OUT   # one GPU: Qwen3-30B-A3B layer shapes, 2 layers (< 4 min)
    python bench/moe/run.py --doc-from RESULTS.json     # write a results.json (e.g. the GPU run's) into docs/moe.md

Per method (rtn, gptq, awq, fp8, and rtn/gptq with the MXFP4A16 scheme by default; METHOD:SCHEME picks a scheme
preset): quantize time (routing pass + method + low-token rule), write time,
expert projections quantized / expert projections present, routed calibration tokens per expert (min / median /
max, experts under the threshold), logits SQNR of hubquant's dequantized model against the float model, and
(with --check-load, default on for the CPU preset) that plain transformers loads the variant and computes the
same logits. Writes the table with date, hardware and command into docs/moe.md (between the BENCH markers) and
the raw numbers to WORK/results.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Qwen3-30B-A3B: hidden 2048, 128 experts of intermediate 768, top-8, 32 query / 4 KV heads of 128, 48 layers
PRESETS = {
    "cpu": dict(hidden=256, moe_intermediate=96, experts=32, top_k=4, layers=2, heads=4, kv_heads=2, head_dim=64,
                vocab=4096, samples=16, seq_len=128, group_size=32, check_load=True),
    "gpu": dict(hidden=2048, moe_intermediate=768, experts=128, top_k=8, layers=2, heads=32, kv_heads=4,
                head_dim=128, vocab=32768, samples=32, seq_len=512, group_size=128, check_load=False),
}
MARK_BEGIN, MARK_END = "<!-- BENCH:moe:begin -->", "<!-- BENCH:moe:end -->"


def build(p: dict, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """The random-weight model, in host memory. Its weights are drawn on `device` (a GPU draws the 2.8 GB of the
    GPU preset in well under a second; transformers' initialization on the CPU takes minutes there)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(hidden_size=p["hidden"], moe_intermediate_size=p["moe_intermediate"],
                         intermediate_size=4 * p["hidden"], num_experts=p["experts"], num_experts_per_tok=p["top_k"],
                         num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                         num_key_value_heads=p["kv_heads"], head_dim=p["head_dim"], vocab_size=p["vocab"],
                         max_position_embeddings=4096, tie_word_embeddings=False, norm_topk_prob=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():  # a router with some preference, as trained ones have: uneven expert loads
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5 / p["hidden"] ** 0.5)
    return model.to("cpu")


def run_method(method: str, p: dict, args, calib, eval_ids, ref_logits, base) -> dict:
    from hubquant import moe, moe_pipeline
    from hubquant.formats.compressed_tensors import write
    from hubquant.methods import QuantJob, get_method
    from hubquant.quant import QuantScheme, WeightScheme, sqnr_db

    dtype = getattr(torch, args.dtype)
    model = copy.deepcopy(base)  # the same weights for every method, drawn once
    moe.unfuse_experts(model)
    label, (method, _, preset) = method, method.partition(":")
    spec = get_method(method)
    scheme = spec.resolve_scheme(preset=preset) if preset else spec.default_scheme
    if not preset and scheme.weights.type != "float" and scheme.weights.bits == 4:
        scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=p["group_size"], symmetric=True))
    job = QuantJob(scheme=scheme, calib=calib if spec.needs_calibration(scheme) else None, device=args.device,
                   options=json.loads(args.options), progress=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    quantized, policy = moe_pipeline.quantize_with_policy(model, job, spec.load(), log=lambda m: None)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t_quant = time.time() - t0
    experts = moe.expert_linear_names(model)
    with torch.no_grad():
        model.to(args.device)
        logits = model(eval_ids.to(args.device)).logits.float().cpu()
        model.to("cpu")
    out = Path(tempfile.mkdtemp(prefix=f"hq-moe-{method}-"))
    t0 = time.time()
    write(model, quantized, scheme=scheme, out_dir=out, method=method)
    t_write = time.time() - t0
    row = {"method": label, "quantize_s": round(t_quant, 2), "write_s": round(t_write, 2),
           "experts_quantized": sum(n in quantized for n in experts), "expert_linears": len(experts),
           "sqnr_db": round(sqnr_db(ref_logits, logits), 2),
           "top1": round(float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()), 4),
           "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}
    if policy is not None and policy.counts:
        s = policy.summary()
        row.update(tokens_min=s["min"], tokens_median=s["median"], tokens_max=s["max"],
                   below_threshold=f"{s['below_threshold']}/{s['experts']}")
    if args.check_load:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
        with torch.no_grad():
            got = loaded(eval_ids).logits.float()
        row["transformers_sqnr_db"] = round(sqnr_db(logits, got), 1)
    return row


def hardware(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads (shared machine)"


def write_doc(res: dict) -> str:
    rows, p = res["rows"], res["preset_params"]
    cols = ["method", "quantize_s", "write_s", "experts_quantized", "expert_linears", "tokens_min", "tokens_median",
            "tokens_max", "below_threshold", "sqnr_db", "top1", "transformers_sqnr_db", "bytes"]
    lines = [f"Run {res['date']} on {res['device']}, torch {res['torch']}; command: `{res['command']}`.",
             f"Model: Qwen3-MoE shape, {p['layers']} layers, hidden {p['hidden']}, {p['experts']} experts of "
             f"intermediate {p['moe_intermediate']}, top-{p['top_k']}, {res['dtype']}, random weights "
             f"({res['base_bytes'] / 1e6:.1f} MB of weights); calibration {p['samples']} x {p['seq_len']} random "
             "tokens. quantize_s covers the routing pass, the method and the low-token rule; tokens_* are calibration "
             "tokens routed to each expert.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    block = "\n".join(lines)
    doc = ROOT / "docs" / "moe.md"
    text = doc.read_text() if doc.exists() else f"# Mixture of experts\n\n{MARK_BEGIN}\n{MARK_END}\n"
    head, _, rest = text.partition(MARK_BEGIN)
    _, _, tail = rest.partition(MARK_END)
    tables = {}  # preset -> its table; a run replaces its own preset's table and keeps the others
    for part in rest.partition(MARK_END)[0].split("### ")[1:]:
        name, _, body = part.partition(" preset\n")
        tables[name.strip()] = body.strip()
    tables[res["preset"]] = block
    section = MARK_BEGIN + "\n" + "\n\n".join(f"### {k} preset\n{v}" for k, v in sorted(tables.items())) \
        + "\n" + MARK_END
    doc.write_text(head + section + tail)
    return block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--methods", help="comma-separated METHOD or METHOD:SCHEME (default: rtn,gptq,awq,fp8,"
                                      "rtn:MXFP4A16,gptq:MXFP4A16 on CPU; rtn,gptq,fp8,rtn:MXFP4A16 on GPU)")
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--options", default="{}", help="method options, JSON (e.g. {\"calibrate_all_experts\": true})")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default=None)
    ap.add_argument("--check-load", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--work", default="/tmp/hubquant-bench-moe")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/moe.md alone")
    ap.add_argument("--doc-from", help="write this results.json into docs/moe.md and stop")
    args = ap.parse_args()
    if args.doc_from:
        print(write_doc(json.loads(Path(args.doc_from).read_text())))
        return
    args.command = "python bench/moe/run.py " + shlex.join(sys.argv[1:])
    p = dict(PRESETS[args.preset])
    args.methods = args.methods or ("rtn,gptq,fp8,rtn:MXFP4A16" if args.preset == "gpu"
                                    else "rtn,gptq,awq,fp8,rtn:MXFP4A16,gptq:MXFP4A16")
    if args.layers:
        p["layers"] = args.layers
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.check_load = p["check_load"] if args.check_load is None else args.check_load
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, p["vocab"], (p["samples"], p["seq_len"]), generator=g)
    eval_ids = torch.randint(0, p["vocab"], (2, 128), generator=g)
    t0 = time.time()
    base = build(p, getattr(torch, args.dtype), device=args.device)
    print(f"model built in {time.time() - t0:.1f} s on {args.device}", flush=True)
    base_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    with torch.no_grad():
        ref = base.to(args.device)(eval_ids.to(args.device)).logits.float().cpu()
        base.to("cpu")
    rows = []
    for method in args.methods.split(","):
        row = run_method(method, p, args, calib, eval_ids, ref, base)
        print(json.dumps(row), flush=True)
        rows.append(row)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {"preset": args.preset, "preset_params": p, "rows": rows, "device": hardware(args.device),
           "date": datetime.date.today().isoformat(), "torch": torch.__version__, "command": args.command,
           "dtype": args.dtype, "base_bytes": base_bytes}
    (work / "results.json").write_text(json.dumps(res, indent=2))
    if not args.no_doc:
        print(write_doc(res))
    med = statistics.median(r["quantize_s"] for r in rows)
    print(f"median quantize time {med:.1f} s over {len(rows)} methods; results in {work / 'results.json'}")


if __name__ == "__main__":
    main()
