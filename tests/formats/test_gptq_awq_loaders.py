"""The ecosystem's own loaders read hubquant's gptq / awq checkpoints: GPTQModel (which transformers 5.x uses
for both formats) in a separate virtualenv, since it pins its own stack. Skipped where that venv is absent
(set HUBQUANT_GPTQMODEL_PYTHON to its python). The loaded model's logits must match hubquant's in-memory
dequantized model."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from hubquant.formats import awq as awq_fmt
from hubquant.formats import gptq as gptq_fmt
from hubquant.modeling import quantizable_linears
from hubquant.quant import QuantScheme, WeightScheme, rtn_quantize
from tests.helpers import tiny_model

PY = os.environ.get("HUBQUANT_GPTQMODEL_PYTHON", "/work/venvs/gptqm/bin/python")
pytestmark = pytest.mark.skipif(not Path(PY).exists(), reason="no GPTQModel virtualenv (HUBQUANT_GPTQMODEL_PYTHON)")

LOADER = r"""
import json, sys, torch
path, ids = sys.argv[1], json.loads(sys.argv[2])
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float16)
with torch.no_grad():
    logits = model(torch.tensor(ids)).logits.float()
kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
print(json.dumps({"logits": logits.tolist(), "kinds": kinds}))
"""


def _variant(tmp_path, fmt: str):
    model = tiny_model("llama", vocab=1000, hidden=256, intermediate=512).to(torch.float16)
    scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=128, symmetric=(fmt == "gptq")))
    quantized = {}
    for name, lin in quantizable_linears(model).items():
        qw = rtn_quantize(lin.weight.data, scheme.weights)
        lin.weight.data = qw.dequantize(torch.float16)
        quantized[name] = qw
    writer = gptq_fmt.write if fmt == "gptq" else awq_fmt.write
    writer(model, quantized, scheme=scheme, out_dir=tmp_path, method=fmt, options={})
    return model


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_transformers_with_gptqmodel_loads_the_checkpoint(tmp_path, fmt):
    model = _variant(tmp_path, fmt)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    p = subprocess.run([PY, "-c", LOADER, str(tmp_path), json.dumps(ids.tolist())], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert any(k != "Linear" for k in out["kinds"]), out["kinds"]  # quantized modules (e.g. TorchCpuAvx512Linear)
    with torch.no_grad():
        ref = model.float()(ids).logits
    got = torch.tensor(out["logits"])
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())
