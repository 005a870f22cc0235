"""AWQ and SmoothQuant on the mixture-of-experts architectures whose scaling map is built from each layer's structure
(hubquant.moe_scaling), side by side with RTN and naive W8A8 on the same tiny random models.

    python bench/moe/scaling.py            # every derived architecture, CPU, about a minute on 2 shared cores
    python bench/moe/scaling.py gpt_oss    # the named model types only (gpt-oss: its map is built the same way)

Per architecture: expert projections quantized / present (AWQ), scale moves kept and dropped (over the distinct
layer structures; experts' up -> down moves included), logits SQNR against the float model for RTN and AWQ
(W4A16, groups of 32) and for W8A8 and SmoothQuant (int8 weights and per-token activations), and the SQNR between
hubquant's AWQ model and the variant plain transformers loads (`hubquant.load` for the model types transformers
cannot load per-expert tensors of: gpt-oss). Prints a markdown table with date and hardware.
"""
from __future__ import annotations

import datetime
import platform
import re
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import hubquant  # noqa: E402
from hubquant import moe, moe_scaling  # noqa: E402
from hubquant.formats.compressed_tensors import write  # noqa: E402
from hubquant.modeling import quantizable_linears  # noqa: E402
from hubquant.quant import sqnr_db  # noqa: E402
from tests.helpers import NEW_MOE_ARCHS  # noqa: E402
from tests.test_moe import logits, moe_model, quantize, scheme_of, write_and_load  # noqa: E402


def run_method(arch: str, method: str):
    model = moe_model(arch)
    ref = logits(model)
    moe.unfuse_experts(model)
    quantized, _ = quantize(model, method)
    return model, quantized, sqnr_db(ref, logits(model))


def row(arch: str) -> str:
    _, _, rtn = run_method(arch, "rtn")
    _, _, w8a8 = run_method(arch, "w8a8")
    model, quantized, awq = run_method(arch, "awq")
    experts = set(moe.expert_linear_names(model))
    assert set(quantized) == set(quantizable_linears(model))
    rec = moe_scaling.record(model)
    kept = sum(len(v) for v in rec.kept.values())
    n_exp = sum(1 for v in rec.kept.values() for m in v if ".experts." in m.smooth)
    dropped = sorted({re.sub(r"experts\.\d+\.", "experts.*.", d.split(":")[0].split(" -> ")[0])
                      for v in rec.dropped.values() for d in v})
    with tempfile.TemporaryDirectory() as tmp:
        if arch in moe.NO_TRANSFORMERS_MAPPING:
            write(model, quantized, scheme=scheme_of("awq"), out_dir=tmp, method="awq")
            loaded, _ = hubquant.load(tmp, device="cpu", dtype=torch.float32, progress=False)
        else:
            loaded, _ = write_and_load(model, quantized, "awq", Path(tmp))
        load_db = sqnr_db(logits(model), logits(loaded))
    _, _, sq = run_method(arch, "smoothquant")
    return (f"| `{arch}` | {len(experts & set(quantized))}/{len(experts)} | {kept} ({n_exp} expert) | "
            f"{', '.join(f'`{d}`' for d in dropped) or '-'} | {rtn:.2f} | {awq:.2f} | {w8a8:.2f} | {sq:.2f} | "
            f"{'identical' if load_db == float('inf') else f'{load_db:.0f}'} |")


def main() -> None:
    torch.set_num_threads(1)
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"1 thread; `python {' '.join(['bench/moe/scaling.py', *sys.argv[1:]])}`\n")
    print("| `model_type` | experts quantized (AWQ) | moves kept | norms / moves dropped | RTN dB | AWQ dB | "
          "W8A8 dB | SmoothQuant dB | AWQ variant vs hubquant dB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch in sys.argv[1:] or NEW_MOE_ARCHS:
        print(row(arch), flush=True)


if __name__ == "__main__":
    main()
