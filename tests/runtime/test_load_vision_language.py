"""hubquant.load builds a vision-language variant with the class its base uses (AutoModelForImageTextToText), the
vision tower float and bit-identical to the base's, the language model on hubquant's quantized modules, and
computes what hubquant's own quantized model computes."""
from __future__ import annotations

import pytest
import torch

import hubquant
from hubquant import moe
from hubquant.formats.compressed_tensors import write
from hubquant.quant import sqnr_db
from hubquant.runtime.modules import W4A16Linear
from tests.helpers import tiny_vl_config
from tests.test_moe import logits, quantize, scheme_of

# (architecture, method, min logits SQNR of the loaded variant against hubquant's model, dB): weight-only runs the
# same weights; W8A8 quantizes activations per token in each implementation's own arithmetic
CASES = [("qwen2_5_vl", "rtn", 60), ("glm4v_moe", "awq", 60), ("qwen3_5_moe", "gptq", 60),
         ("glm4v_moe", "smoothquant", 30)]


@pytest.mark.parametrize("arch,method,min_db", CASES, ids=[f"{a}-{m}" for a, m, _ in CASES])
def test_load_builds_the_vision_language_class_with_a_float_vision_tower(arch, method, min_db, tmp_path):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(tiny_vl_config(arch), dtype=torch.float32).eval()
    vision = {n: p.detach().clone() for n, p in model.named_parameters() if ".visual." in n or "vision" in n}
    moe.unfuse_experts(model)
    quantized, _ = quantize(model, method)
    assert quantized and all(n.startswith("model.language_model.") for n in quantized)
    deq = logits(model)
    write(model, quantized, scheme=scheme_of(method), out_dir=tmp_path, method=method)
    loaded, _ = hubquant.load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    assert type(loaded) is type(model)
    params = dict(loaded.named_parameters())
    assert vision and all(torch.equal(params[n], p) for n, p in vision.items())  # float, bit-identical
    assert loaded.hubquant_format["quantized_linears"] == len(quantized)
    if scheme_of(method).activations is None:
        assert any(isinstance(m, W4A16Linear) for m in loaded.modules())
    assert sqnr_db(deq, logits(loaded)) > min_db
