"""One hubquant variant of the accuracy benchmark, in its own process: load -> quantize -> save -> perplexity.

Prints one JSON line. Run by bench/accuracy/run.py.
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


def _preset_variant(model, args, work: Path):
    """rtn/gptq with a --scheme preset through the method registry; written as compressed-tensors."""
    from hubquant.formats import get_format
    from hubquant.methods import QuantJob, get_method

    spec = get_method(args.method)
    scheme = spec.resolve_scheme(preset=args.scheme)
    calib = torch.load(work / "calib_ids.pt") if spec.needs_calibration(scheme) else None
    quantized = spec.load()(model, QuantJob(scheme=scheme, calib=calib, progress=False,
                                            options=json.loads(args.options)))
    get_format("compressed-tensors")(model, quantized, scheme=scheme, out_dir=work / f"hq-{args.method}-{args.scheme}",
                                     method=args.method, options=json.loads(args.options))
    return quantized, scheme


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--method", choices=["float", "rtn", "rtn-asym", "gptq", "awq"], required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--scheme", help="a --scheme preset (NVFP4A16, MXFP4A16, NVFP4...) for rtn/gptq instead of --bits")
    ap.add_argument("--options", default="{}", help="method options, JSON (e.g. '{\"true_sequential\": false}')")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from hubquant.formats import get_format
    from hubquant.methods import QuantJob
    from hubquant.modeling import quantizable_linears
    from hubquant.quant import QuantScheme, WeightScheme, rtn_quantize

    work = Path(args.work)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    if args.scheme:
        quantized, scheme = _preset_variant(model, args, work)
    elif args.method != "float":
        sym = args.method not in ("awq", "rtn-asym")
        scheme = QuantScheme(weights=WeightScheme(bits=args.bits, group_size=args.group_size, symmetric=sym))
        calib = torch.load(work / "calib_ids.pt")
        if args.method.startswith("rtn"):
            quantized = {}
            for name, lin in quantizable_linears(model).items():
                qw = rtn_quantize(lin.weight.data, scheme.weights)
                lin.weight.data.copy_(qw.dequantize(lin.weight.dtype))
                quantized[name] = qw
        else:
            from hubquant.methods import get_method

            quantized = get_method(args.method).load()(model, QuantJob(scheme=scheme, calib=calib, progress=False,
                                                                       options=json.loads(args.options)))
        fmt = args.method if (args.method in ("gptq", "awq") and args.bits == 4) else "compressed-tensors"
        method_name = "rtn" if args.method.startswith("rtn") else args.method
        out = work / f"hq-{args.method}-w{args.bits}"
        get_format(fmt)(model, quantized, scheme=scheme, out_dir=out, method=method_name, options={})
    t_quant = time.time() - t0
    eval_ids = torch.load(work / "eval_ids.pt")
    t1 = time.time()
    ppl = perplexity(model, eval_ids)
    print(json.dumps({"tool": "hubquant", "method": args.method, "bits": args.bits, "scheme": args.scheme, "ppl": ppl,
                      "quant_s": t_quant, "eval_s": time.time() - t1, "peak_rss_mib": peak_rss_mib()}), flush=True)


if __name__ == "__main__":
    main()
