"""W8A8 int8 (naive, SmoothQuant, static) and FP8 (dynamic, static) as compressed-tensors checkpoints, loaded
by transformers + compressed-tensors on CPU: weights equal our dequantized weights, and the loader's forward
(which fake-quantizes activations) equals our simulated model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hubquant.formats.compressed_tensors import write
from hubquant.methods import METHODS, QuantJob
from hubquant.quant import ActivationScheme, QuantScheme, sqnr_db
from tests.helpers import tiny_model

INT8, FP8 = METHODS["smoothquant"].default_scheme, METHODS["fp8"].default_scheme


def _static(s: QuantScheme) -> QuantScheme:
    return QuantScheme(weights=s.weights, activations=ActivationScheme(type=s.activations.type, dynamic=False,
                                                                        strategy="tensor"))


CASES = [  # method, scheme, compressed-tensors format, weight dtype, tensors per Linear
    ("w8a8", INT8, "int-quantized", torch.int8, {"weight", "weight_scale"}),
    ("smoothquant", INT8, "int-quantized", torch.int8, {"weight", "weight_scale"}),
    ("smoothquant", _static(INT8), "int-quantized", torch.int8, {"weight", "weight_scale", "input_scale"}),
    ("fp8", FP8, "float-quantized", torch.float8_e4m3fn, {"weight", "weight_scale"}),
    ("fp8", _static(FP8), "float-quantized", torch.float8_e4m3fn, {"weight", "weight_scale", "input_scale"}),
]


@pytest.mark.parametrize("method,scheme,fmt,wdtype,names", CASES, ids=[f"{c[0]}-{c[1].name}" for c in CASES])
def test_compressed_tensors_round_trip(method, scheme, fmt, wdtype, names, tmp_path):
    pytest.importorskip("compressed_tensors")
    model = tiny_model("qwen2", vocab=1000)  # q/k/v biases and GQA: the smoothing folds must survive saving
    calib = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(1))
    q = METHODS[method].load()(model, QuantJob(scheme=scheme, calib=calib, progress=False))
    qc = write(model, q, scheme=scheme, out_dir=tmp_path, method=method, options={})
    assert qc["format"] == fmt
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert acts["dynamic"] == scheme.activations.dynamic and acts["type"] == scheme.activations.type
    tensors = load_file(tmp_path / "model.safetensors")
    prefix = "model.layers.0.self_attn.k_proj."
    assert {k[len(prefix):] for k in tensors if k.startswith(prefix)} == names | {"bias"}
    assert tensors[prefix + "weight"].dtype == wdtype
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    state = loaded.state_dict()
    for name in q:
        w = state[f"{name}.weight"]
        if w.dtype in (torch.int8, torch.float8_e4m3fn):  # kept compressed: dequantize as the loader's forward does
            w = w.float() * state[f"{name}.weight_scale"].float()
        assert torch.equal(w.float(), model.get_submodule(name).weight.float()), name
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ours = loaded(ids).logits.float(), model(ids).logits.float()
    assert sqnr_db(ours, got) > 60  # measured: identical (inf dB)
