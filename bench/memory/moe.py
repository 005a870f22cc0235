"""Peak resident memory of `hubquant convert` on a mixture-of-experts model at three depths: streamed (one decoder
layer at a time) RTN and GPTQ at every size, and in memory (the whole model loaded) at the smallest, side by side,
evaluation skipped.

    python bench/memory/moe.py                        # 4, 9 and 19 layers (1.0, 2.1, 4.1 GB); docs/moe.md, JSON
    python bench/memory/moe.py --layers 2 --no-doc    # quick look
    python bench/memory/moe.py --doc-from bench/memory/results/moe-DATE.json   # its table into docs/moe.md

The model has Qwen3-MoE's layout with random bf16 weights (per-expert checkpoint tensors, as the Hub's Qwen3-MoE
checkpoints store them; SmolLM2's 49152-token tokenizer), written one tensor at a time into a local folder and
converted from it by `python -m hubquant.cli convert` in a child process; the peak is that process's VmHWM
(bench/memory/peak.py). Each size's folder is deleted before the next is written. The smallest size is also
converted in memory: "same bytes" compares the two paths' safetensors.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.memory.peak import run_cli, safetensors_sha256  # noqa: E402
from bench.memory.run import hardware  # noqa: E402

# Qwen3-30B-A3B's proportions at a quarter of its width: 64 experts of 512 (top-8), 16 query / 4 KV heads of 64
SHAPE = dict(hidden_size=1024, moe_intermediate_size=512, intermediate_size=3072, num_experts=64,
             num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64)
VOCAB = 49152
COMMON = ["--calib-dataset", "fortunes", "--group-size", "128", "--skip-eval", "--quiet"]
CASES = {"rtn": ["--method", "rtn"], "gptq": ["--method", "gptq", "--num-samples", "16", "--seq-len", "512"]}
CASE_TEXT = {"rtn": "RTN", "gptq": "GPTQ (16 x 512 calibration tokens)"}
MARK_BEGIN, MARK_END = "<!-- BENCH:moe-memory:begin -->", "<!-- BENCH:moe-memory:end -->"


def config(layers: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**SHAPE, num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=4096,
                          tie_word_embeddings=False, norm_topk_prob=True, dtype="bfloat16",
                          architectures=["Qwen3MoeForCausalLM"])


def skeleton(layers: int):
    """The model on the meta device with per-expert Linears: its state_dict names are the checkpoint's."""
    from transformers import AutoModelForCausalLM

    from hubquant import moe

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config(layers), dtype=torch.bfloat16)
    moe.unfuse_experts(model)
    return model


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> tuple[int, int]:
    """Write the model one tensor at a time; returns (weight bytes, expert bytes of one layer)."""
    from hubquant.assets import smollm2_dir
    from hubquant.formats.shards import ShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    model = skeleton(layers)
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder)
    total = experts = 0
    for name, p in model.state_dict().items():
        if "rotary" in name:
            continue
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("mlp.gate.weight"):  # a router with preferences: uneven expert loads
            t = torch.randn(p.shape, generator=gen) * 0.5 / p.shape[-1] ** 0.5
        else:
            t = torch.randn(p.shape, generator=gen) * (0.02 if "embed" in name else p.shape[-1] ** -0.5)
        writer.add(name, t.to(torch.bfloat16))
        total += p.numel() * 2
        experts += p.numel() * 2 if name.startswith("model.layers.0.mlp.experts.") else 0
    writer.finish(max_shard_bytes=2 * 1024**3)
    config(layers).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_dir() / f).is_file():
            (folder / f).write_bytes((smollm2_dir() / f).read_bytes())
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# random Qwen3-MoE-shaped weights\n")
    return total, experts


def convert(folder: Path, case: str, streaming: str, out: Path, env: dict) -> dict:
    args = ["convert", str(folder), *CASES[case], "--streaming", streaming, "--output-dir", str(out), *COMMON]
    t0 = time.time()
    log = out.parent / f"{out.name}.log"
    rc, peak = run_cli(args, env=env, cwd=ROOT, log=log)
    if rc != 0:
        raise RuntimeError(f"hubquant {' '.join(args)} failed:\n{log.read_text(errors='replace')[-3000:]}")
    prov = json.loads((out / "hubquant.json").read_text())
    moe = prov.get("moe", {})
    return {"case": case, "streaming": streaming, "peak_rss_bytes": peak, "wall_s": round(time.time() - t0, 1),
            "sha256": safetensors_sha256(out), "size_bytes": prov.get("metrics", {}).get("size_bytes"),
            "expert_linears": moe.get("expert_linears"),
            "expert_linears_quantized": moe.get("expert_linears_quantized"),
            "command": "hubquant " + " ".join(args[:1] + ["MODEL"] + args[2:]).replace(str(out), "OUT")}


def table(res: dict) -> str:
    rows = res["rows"]
    sha = {(r["layers"], r["case"], r["streaming"]): r["sha256"] for r in rows}
    sizes = sorted({(r["layers"], r["model_bytes"]) for r in rows})
    lines = [f"Measured {res['date']} on {res['hardware']}, shared with other jobs (wall times are noisy), by "
             f"`{res['command']}`.",
             "",
             f"Models: Qwen3-MoE layout, hidden {SHAPE['hidden_size']}, {SHAPE['num_experts']} experts of "
             f"{SHAPE['moe_intermediate_size']} (top-{SHAPE['num_experts_per_tok']}), {VOCAB}-token vocabulary "
             f"(untied lm_head), random bf16 weights, {res['layer_expert_bytes'] / 1e6:.0f} MB of experts per layer; "
             f"{', '.join(f'{n} layers: {b / 1e9:.2f} GB' for n, b in sizes)}. Per-expert checkpoint tensors in a "
             "local folder, converted by the CLI in a child process (W4A16, group 128, compressed-tensors, "
             "evaluation skipped). Peak RSS is the process's VmHWM. Raw numbers: "
             f"`{res['json']}`.",
             "",
             "| model | case | path | peak RSS GB | % of model | wall s | expert projections quantized | same bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["case"] != "rtn", r["streaming"] != "on", r["layers"])):
        other = sha.get((r["layers"], r["case"], "off" if r["streaming"] == "on" else "on"))
        same = "-" if other is None else ("yes" if other == r["sha256"] else "NO")
        lines.append(f"| {r['layers']} layers, {r['model_bytes'] / 1e9:.2f} GB | {CASE_TEXT[r['case']]} | "
                     f"{'streamed' if r['streaming'] == 'on' else 'in memory'} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} | {100 * r['peak_rss_bytes'] / r['model_bytes']:.0f}% | "
                     f"{r['wall_s']:.0f} | {r['expert_linears_quantized']} of {r['expert_linears']} | {same} |")
    return "\n".join(lines)


def write_doc(res: dict) -> None:
    doc = ROOT / "docs" / "moe.md"
    text = doc.read_text()
    block = f"{MARK_BEGIN}\n{table(res)}\n{MARK_END}"
    if MARK_BEGIN in text:
        head, _, rest = text.partition(MARK_BEGIN)
        text = head + block + rest.partition(MARK_END)[2]
    else:
        text = text.rstrip() + "\n\n## Peak host memory\n\n" + block + "\n"
    doc.write_text(text)


def measure(work: Path, layers: int, args, env: dict) -> tuple[list[dict], int]:
    """Write the `layers`-deep model, convert it (streamed; in memory too with `args.paths`), delete it."""
    rows = []
    try:
        nbytes, expert_bytes = write_checkpoint(work / "model", layers)
        print(f"model: {layers} layers, {nbytes / 1e9:.2f} GB ({expert_bytes / 1e6:.0f} MB of experts a layer)")
        for case in args.cases:
            for mode in args.paths:
                out = work / f"out-{case}-{mode}"
                r = {"layers": layers, "model_bytes": nbytes, **convert(work / "model", case, mode, out, env)}
                rows.append(r)
                print(f"{case:5s} {'streamed' if mode == 'on' else 'in memory':9s} peak RSS "
                      f"{r['peak_rss_bytes'] / 1e9:.2f} GB ({100 * r['peak_rss_bytes'] / nbytes:.0f}% of the model), "
                      f"{r['wall_s']} s", flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work / "model", ignore_errors=True)
    return rows, expert_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="4,9,19",
                   help="model depths, comma-separated (default 4,9,19: 1.0, 2.1 and 4.1 GB)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--paths", nargs="+", default=["on", "off"], choices=["on", "off"],
                   help="on: streamed at every size, off: in memory at the smallest size (default both)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the conversions (default 1)")
    p.add_argument("--work", default=None, help="scratch folder (default: the system temp folder)")
    p.add_argument("--json", default=None, help="default bench/memory/results/moe-DATE.json")
    p.add_argument("--no-doc", action="store_true", help="leave docs/moe.md alone")
    p.add_argument("--doc-from", help="write this results JSON into docs/moe.md and stop")
    args = p.parse_args()
    if args.doc_from:
        write_doc(json.loads(Path(args.doc_from).read_text()))
        return
    depths = sorted({int(n) for n in args.layers.split(",")})
    now = datetime.datetime.now(datetime.timezone.utc)
    out_json = Path(args.json or ROOT / "bench/memory/results" / f"moe-{now:%Y-%m-%d}.json")
    work = Path(tempfile.mkdtemp(prefix="hubquant-moemem-", dir=args.work))
    env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    env.pop("HF_TOKEN", None)
    rows = []
    try:
        for i, layers in enumerate(depths):
            paths = args.paths if i == 0 else [m for m in args.paths if m == "on"]
            if paths:
                got, expert_bytes = measure(work, layers, argparse.Namespace(cases=args.cases, paths=paths), env)
                rows += got
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "hardware": hardware(),
           "command": "python bench/memory/moe.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
           "model": {**SHAPE, "vocab": VOCAB}, "layer_expert_bytes": expert_bytes,
           "json": out_json.relative_to(ROOT).as_posix() if out_json.is_relative_to(ROOT) else str(out_json),
           "rows": rows}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    if not args.no_doc:
        write_doc(res)


if __name__ == "__main__":
    main()
