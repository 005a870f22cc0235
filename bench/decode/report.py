"""Turn bench/decode/run.py results into docs/decode.md.

    python bench/decode/report.py RESULTS.json --notes bench/decode/notes.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAMES = {"bf16": "bf16 (float checkpoint)", "ct-w4a16": "W4A16 (compressed-tensors pack-quantized, sym, g128)",
         "ct-w8a8": "W8A8 int8 (compressed-tensors int-quantized, dynamic per-token)",
         "ct-fp8": "FP8 (compressed-tensors float-quantized, dynamic per-token)"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--notes")
    ap.add_argument("--out", default=str(ROOT / "docs" / "decode.md"))
    args = ap.parse_args()
    r = json.loads(Path(args.results).read_text())
    v = r["variants"]
    bf = v.get("bf16", {}).get("tokens_per_s")
    lines = ["# Batch-1 decode speed through hubquant.load", "",
             (f"{r['date']}, {r['gpu']}, torch {r['torch']}. Llama-3-8B shapes (hidden 4096, MLP 14336, "
             f"{r['layers']} layers, 32 heads / 8 KV heads, vocab 128256), random weights (seeded, identical float "
             f"weights for every variant), {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens, greedy. "
             "Command: `python bench/decode/run.py --out decode.json --repeats 2`; raw results: "
             f"`bench/decode/results/{Path(args.results).name}`."), ""]
    if args.notes:
        lines += [Path(args.notes).read_text().strip(), ""]
    lines += [("| variant | tokens/s (CUDA graph) | x bf16 | ms/token | tokens/s (eager) | checkpoint GB | "
              "weights on GPU GB | decoder vs transformers logits (rel. err) | load s |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for kind, row in v.items():
        if "error" in row:
            lines.append(f"| {NAMES.get(kind, kind)} | failed: see results | | | | | | | |")
            continue
        t = row["tokens_per_s"]
        lines.append(f"| {NAMES.get(kind, kind)} | {t:.1f} | {t / bf:.2f} | {1e3 / t:.2f} | "
                     f"{row['eager_tokens_per_s']:.1f} | {row['checkpoint_bytes'] / 1e9:.2f} | "
                     f"{row['gpu_weight_bytes'] / 1e9:.2f} | {row['decoder_vs_transformers_rel_err']:.1e} | "
                     f"{row['load_s']} |")
    goal = v.get("ct-w4a16", {}).get("tokens_per_s")
    if goal and bf:
        lines += ["", (f"Goal W4A16 >= 2.5x bf16: measured {goal / bf:.2f}x — "
                  f"{'met' if goal / bf >= 2.5 else 'not met'}.")]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
