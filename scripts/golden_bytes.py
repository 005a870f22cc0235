"""sha256 of every file hubquant writes for each method x format on tiny random models (a refactoring guard).

Runs every method with every format it can be written in (plus a few option and scheme variants) through the
methods and format writers directly, seeded, and prints one line per output file:

    <case> <file> <sha256>

Run it before and after a change that must not change numbers and diff the two outputs:

    OMP_NUM_THREADS=1 python scripts/golden_bytes.py > before.txt
    ...change...
    OMP_NUM_THREADS=1 python scripts/golden_bytes.py > after.txt && diff before.txt after.txt

or compare with a recorded run (scripts/golden_bytes.txt: torch 2.13 CPU, transformers 5.24; other versions may
round differently): ``python scripts/golden_bytes.py --check scripts/golden_bytes.txt``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hubquant.formats import get_format  # noqa: E402
from hubquant.methods import QuantJob, get_method  # noqa: E402
from hubquant.schemes import ActivationScheme, QuantScheme, WeightScheme  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402

W4 = WeightScheme(bits=4, group_size=32)
W4_ASYM = WeightScheme(bits=4, group_size=32, symmetric=False)
W8 = WeightScheme(bits=8, group_size=-1)
INT8_DYN = ActivationScheme(bits=8, type="int", dynamic=True, strategy="token")
INT8_STATIC = ActivationScheme(bits=8, type="int", dynamic=False, strategy="tensor")
FP8_W = WeightScheme(bits=8, group_size=-1, type="float")
FP8_DYN = ActivationScheme(bits=8, type="float", dynamic=True, strategy="token")
FP8_STATIC = ActivationScheme(bits=8, type="float", dynamic=False, strategy="tensor")

# (method, format, scheme, options)
CASES: list[tuple[str, str, QuantScheme, dict]] = [
    ("rtn", "compressed-tensors", QuantScheme(weights=W4), {}),
    ("rtn", "compressed-tensors", QuantScheme(weights=W4_ASYM), {}),
    ("rtn", "compressed-tensors", QuantScheme(weights=WeightScheme(bits=3, group_size=32)), {}),
    ("rtn", "compressed-tensors", QuantScheme(weights=W8), {}),
    ("rtn", "gptq", QuantScheme(weights=W4), {}),
    ("rtn", "gptq", QuantScheme(weights=WeightScheme(bits=3, group_size=32)), {}),
    ("rtn", "awq", QuantScheme(weights=W4_ASYM), {}),
    ("gptq", "compressed-tensors", QuantScheme(weights=W4), {}),
    ("gptq", "compressed-tensors", QuantScheme(weights=W4_ASYM), {"true_sequential": False}),
    ("gptq", "gptq", QuantScheme(weights=W4), {}),
    ("awq", "compressed-tensors", QuantScheme(weights=W4_ASYM), {}),
    ("awq", "awq", QuantScheme(weights=W4_ASYM), {}),
    ("awq", "awq", QuantScheme(weights=W4_ASYM), {"clip": False, "duo_scaling": False}),
    ("smoothquant", "compressed-tensors", QuantScheme(weights=W8, activations=INT8_DYN), {}),
    ("smoothquant", "compressed-tensors", QuantScheme(weights=W8, activations=INT8_STATIC), {"smooth": "norms"}),
    ("smoothquant", "compressed-tensors", QuantScheme(weights=W8, activations=INT8_DYN), {"alpha": "search"}),
    ("smoothquant", "compressed-tensors", QuantScheme(weights=W8, activations=INT8_DYN), {"weights": "gptq"}),
    ("w8a8", "compressed-tensors", QuantScheme(weights=W8, activations=INT8_DYN), {}),
    ("w8a8", "compressed-tensors", QuantScheme(weights=W8, activations=INT8_STATIC), {}),
    ("fp8", "compressed-tensors", QuantScheme(weights=FP8_W, activations=FP8_DYN), {}),
    ("fp8", "compressed-tensors", QuantScheme(weights=FP8_W, activations=FP8_STATIC), {}),
    ("fp8", "compressed-tensors", QuantScheme(weights=FP8_W, activations=FP8_DYN), {"alpha": 0.5}),
    ("fp8", "compressed-tensors", QuantScheme(weights=FP8_W, activations=FP8_DYN), {"weights": "gptq"}),
    ("bnb-int8", "bitsandbytes", QuantScheme(weights=W8), {}),
    ("bnb-nf4", "bitsandbytes", QuantScheme(weights=WeightScheme(bits=4, group_size=64)), {}),
    ("bnb-nf4", "bitsandbytes", QuantScheme(weights=WeightScheme(bits=4, group_size=64)),
     {"double_quant": False, "compute_dtype": "float16"}),
]
# (architecture, dtype): float32 and bf16 weights (folds round in the weight dtype), GQA + biases (qwen2),
# Gemma's (1 + w) norms
MODELS = [("llama", torch.float32), ("qwen2", torch.bfloat16), ("gemma", torch.float32)]


def _sha(path: Path) -> str:
    data = path.read_bytes()
    if path.name == "config.json":  # the writing transformers' version is not output we make: leave it out
        cfg = json.loads(data)
        cfg.pop("transformers_version", None)
        data = json.dumps(cfg, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def run_case(model, method: str, fmt: str, scheme: QuantScheme, options: dict, calib, out: Path) -> list[str]:
    torch.manual_seed(0)
    m = copy.deepcopy(model)
    job = QuantJob(scheme=scheme, calib=calib, options=dict(options), progress=False)
    quantized = get_method(method).load()(m, job)
    get_format(fmt)(m, quantized, scheme=scheme, out_dir=out, method=method, options=dict(options))
    return [f"{p.name} {_sha(p)}" for p in sorted(out.iterdir())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run only cases whose label contains this text")
    ap.add_argument("--check", type=Path, help="compare with this recorded output; exit 1 on any difference")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lines = []
    for arch, dtype in MODELS:
        model = tiny_model(arch, vocab=1000).to(dtype)
        calib = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
        for method, fmt, scheme, options in CASES:
            if arch == "gemma" and method not in ("awq", "smoothquant"):
                continue  # Gemma only adds the (1 + w) norm fold
            label = f"{arch}-{str(dtype).removeprefix('torch.')}/{method}/{fmt}/{scheme.name}/" + \
                ",".join(f"{k}={v}" for k, v in sorted(options.items()))
            if args.only and args.only not in label:
                continue
            with tempfile.TemporaryDirectory() as d:
                for line in run_case(model, method, fmt, scheme, options, calib, Path(d)):
                    lines.append(f"{label} {line}")
                    print(lines[-1], flush=True)
    if args.check:
        expected = [x for x in args.check.read_text().splitlines() if not args.only or args.only in x]
        bad = sorted(set(expected) ^ set(lines))
        print(f"{len(lines)} files, {len(bad)} differences from {args.check}", file=sys.stderr)
        for x in bad[:20]:
            print(("missing: " if x in expected else "new: ") + x, file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
