"""bitsandbytes checkpoints: the same tensors and config transformers itself saves, and loadable by it."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from hubquant.formats.bnb import write  # noqa: E402
from hubquant.methods import METHODS, QuantJob  # noqa: E402
from hubquant.quant import sqnr_db  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402

CASES = {
    "bnb-int8": BitsAndBytesConfig(load_in_8bit=True),
    "bnb-nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16),
}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bnb") / "float"
    tiny_model("llama", vocab=1000).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("method", list(CASES))
def test_checkpoint_matches_transformers_and_loads(method, float_dir, tmp_path):
    # transformers quantizes the float model on load (bitsandbytes' CPU backend) and saves it: the reference
    ref = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=CASES[method], device_map="cpu",
                                               dtype=torch.bfloat16)
    ref.save_pretrained(tmp_path / "ref")
    del ref
    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.bfloat16)
    float_model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.bfloat16)
    spec = METHODS[method]
    q = spec.load()(model, QuantJob(scheme=spec.default_scheme, progress=False))
    qc = write(model, q, scheme=spec.default_scheme, out_dir=tmp_path / "ours", method=method, options={})

    ours, theirs = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert set(ours) == set(theirs)
    different = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert different == []  # byte-identical tensors, names, dtypes and shapes
    ref_qc = json.loads((tmp_path / "ref" / "config.json").read_text())["quantization_config"]
    assert qc == ref_qc == CASES[method].to_dict()
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"] == ref_qc

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    kind = "Linear8bitLt" if method == "bnb-int8" else "Linear4bit"
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == kind
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, sim, ref_logits = (m(ids).logits.float() for m in (loaded, model, float_model))
    # our simulation (dequantized weights + hooks) predicts what bitsandbytes computes
    assert sqnr_db(got, sim) > 35
    assert sqnr_db(ref_logits, got) > (33 if method == "bnb-int8" else 14)
