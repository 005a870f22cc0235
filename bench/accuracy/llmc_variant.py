"""One llm-compressor variant of the accuracy benchmark, run with llm-compressor's own virtualenv
(torch==2.13.0 + llmcompressor; it pins transformers 5.17 and compressed-tensors 0.19).

load -> oneshot(GPTQModifier | AWQModifier + QuantizationModifier) -> save_compressed -> perplexity of the
in-memory (fake-quantized) model. Prints one JSON line. Run by bench/accuracy/run.py.
On a machine without CUDA, AWQ's unconditional Tensor.pin_memory() fails: we replace it with the identity.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ppl import peak_rss_mib, perplexity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--method", choices=["gptq", "awq"], required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *a, **k: self
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(args.work)
    calib = torch.load(work / "calib_ids.pt")
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    weights = {"num_bits": args.bits, "type": "int", "strategy": "group", "group_size": args.group_size,
               "symmetric": args.method == "gptq"}
    if args.method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        weights["actorder"] = "static"
        recipe = [GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                               ignore=["lm_head"], block_size=128, dampening_frac=0.01)]
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe = [AWQModifier(duo_scaling=True, n_grid=20),
                  QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                       ignore=["lm_head"])]
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    model.save_pretrained(work / f"llmc-{args.method}-w{args.bits}", save_compressed=True)
    t_quant = time.time() - t0
    eval_ids = torch.load(work / "eval_ids.pt")
    t1 = time.time()
    ppl = perplexity(model, eval_ids)
    print(json.dumps({"tool": "llm-compressor", "method": args.method, "bits": args.bits, "ppl": ppl,
                      "quant_s": t_quant, "eval_s": time.time() - t1, "peak_rss_mib": peak_rss_mib()}), flush=True)


if __name__ == "__main__":
    main()
