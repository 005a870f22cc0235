"""GPU check of GPTQ's true-sequential default (one command for the device machine):

    python bench/accuracy/gptq_gpu_seq.py --layers 8            # Llama-3-8B shape, 8 decoder layers

1. quality on the GPU: the real SmolLM2-135M (hubquant.assets) quantized with the accuracy benchmark's data
   (bench/accuracy/ppl.py: 32 x 512 `fortunes` tokens, one batch: the single-forward path; and 64 copies of those
   windows, 2 batches: the pass-per-group path), true_sequential True and False, perplexity on the 16 x 512 lee-news
   windows (CPU reference: 36.006 true-sequential, 36.155 not).
2. speed: Llama-3-8B-shaped random bf16 model, `--layers` decoder layers, 128 x 2048 random calibration ids
   (16 batches of 16384 tokens), GPTQ W4 g128 with true_sequential True (the new default) and False (the old default),
   each timed after a warm-up layer; prints a table, writes $OUT/gptq_gpu_seq.json when OUT is set.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _quantize(model, calib, opts, device):
    from hubquant.methods import QuantJob, get_method
    from hubquant.quant import QuantScheme, WeightScheme

    scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=128 if model.config.hidden_size % 128 == 0 else 64))
    torch.cuda.synchronize()
    t = time.time()
    out = get_method("gptq").load()(model, QuantJob(scheme=scheme, calib=calib, device=device, progress=False,
                                                     options=opts))
    torch.cuda.synchronize()
    return out, time.time() - t




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hubquant.assets import smollm2_dir

    sys.path.insert(0, str(Path(__file__).parent))
    from ppl import perplexity, prepare_data

    rows = []
    # 1. SmolLM2 on the GPU: one batch (single forward per layer) and 2 batches (one pass per group)
    model_dir = smollm2_dir()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    work = Path(os.environ.get("OUT") or "/tmp") / "gptq_gpu_seq_data"
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, model_dir, calib=("fortunes", 32, 512), eval_windows=16, eval_len=512)
    calib1, eval_ids = data["calib_ids"], data["eval_ids"]
    base.cuda()
    ppl_float = perplexity(base, eval_ids.cuda())
    base.cpu()
    for calib in (calib1, calib1.repeat(2, 1)):
        for ts in (True, False):
            m = copy.deepcopy(base)
            _, sec = _quantize(m, calib, {"true_sequential": ts}, "cuda")
            m.cuda()
            rows.append({"case": f"SmolLM2 {calib.shape[0]}x512 true_seq={ts}", "seconds": sec,
                         "ppl": perplexity(m, eval_ids.cuda()), "ppl_float": ppl_float})
            del m
    # 2. Llama-3-8B shape, random weights
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    calib = torch.randint(0, cfg.vocab_size, (128, 2048), generator=torch.Generator().manual_seed(0))
    for ts in (True, False, True, False):  # interleaved, twice each
        m = copy.deepcopy(model)
        torch.cuda.reset_peak_memory_stats()
        _, sec = _quantize(m, calib, {"true_sequential": ts}, "cuda")
        rows.append({"case": f"Llama-3-8B shape, {args.layers} layers, 128x2048, true_seq={ts}", "seconds": sec,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        del m
    out = os.environ.get("OUT")
    if out:
        Path(out, "gptq_gpu_seq.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| case | quantize s | lee-news perplexity (bf16 model) | peak GiB |\n|---|---|---|---|")
    for r in rows:
        nll = f"{r['ppl']:.3f} ({r['ppl_float']:.3f})" if "ppl" in r else ""
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else ""
        print(f"| {r['case']} | {r['seconds']:.1f} | {nll} | {peak} |")


if __name__ == "__main__":
    main()
