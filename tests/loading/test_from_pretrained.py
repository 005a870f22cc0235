"""Every variant hubquant writes by default loads with plain `AutoModelForCausalLM.from_pretrained(path)` (no
arguments but the device) in transformers + compressed-tensors (+ bitsandbytes), on CPU and, when there is one, on
a CUDA GPU, and computes what hubquant's simulated model computes. scripts/test.sh runs this folder twice: with the
newest versions and with pyproject's floors. Nothing here imports more than torch, transformers, accelerate,
compressed-tensors and pytest (bitsandbytes where present), so that it also runs on a bare GPU machine."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hubquant.formats import get_format
from hubquant.methods import METHODS, QuantJob
from hubquant.quant import QuantScheme, WeightScheme, sqnr_db
from tests.helpers import tiny_model

VOCAB = 512


def _asym(bits: int, group: int) -> QuantScheme:
    return QuantScheme(weights=WeightScheme(bits=bits, group_size=group, symmetric=False))


# id -> (method, scheme, format): each method's default, and the --asym variants of the weight-only methods
CASES = {
    "rtn": ("rtn", None, "compressed-tensors"),
    "gptq": ("gptq", None, "compressed-tensors"),
    "awq": ("awq", None, "compressed-tensors"),
    "rtn-asym-g64": ("rtn", _asym(4, 64), "compressed-tensors"),
    "rtn-asym-channel": ("rtn", _asym(4, -1), "compressed-tensors"),
    "rtn-w8-asym": ("rtn", _asym(8, -1), "compressed-tensors"),
    "w8a8": ("w8a8", None, "compressed-tensors"),
    "smoothquant": ("smoothquant", None, "compressed-tensors"),
    "fp8": ("fp8", None, "compressed-tensors"),
    "bnb-int8": ("bnb-int8", None, "bitsandbytes"),
    "bnb-nf4": ("bnb-nf4", None, "bitsandbytes"),
}
# weight-only and simulated-activation variants compute exactly what hubquant's model computes (measured: inf dB
# for compressed-tensors); bitsandbytes' own kernels round differently (measured 40-50 dB)
MIN_SQNR_DB = {"bnb-int8": 35, "bnb-nf4": 35}
# on a GPU, float32 GEMMs sum in another order: activations quantized on the fly may round across a step
ACT_QUANT_CUDA_MIN_DB = {"w8a8": 40, "smoothquant": 40, "fp8": 40}
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")])]


def _write(case: str, out_dir):
    method, scheme, fmt = CASES[case]
    spec = METHODS[method]
    scheme = scheme or spec.default_scheme
    model = tiny_model("llama", vocab=VOCAB)  # float32: both sides compute alike, so SQNR measures the files
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    # gptq/awq defaults are written by their format code with RTN weights: the files' layout is what is checked
    run = METHODS["rtn"].load() if method in ("gptq", "awq") else spec.load()
    quantized = run(model, QuantJob(scheme=scheme, calib=calib, progress=False))
    qc = get_format(fmt)(model, quantized, scheme=scheme, out_dir=out_dir, method=method, options={})
    return model, quantized, qc


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_plain_from_pretrained(case, device, tmp_path):
    if CASES[case][2] == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    model, quantized, qc = _write(case, tmp_path)
    # what a user types: no arguments on CPU, device_map="cuda" on a GPU
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **({"device_map": device} if device != "cpu" else {}))
    assert loaded.dtype == torch.float32  # the dtype config.json records
    assert {p.device.type for p in loaded.parameters()} == {device}
    state = loaded.state_dict()
    for name in quantized:
        w = state.get(f"{name}.weight")
        if w is not None and w.is_floating_point() and w.dtype != torch.float8_e4m3fn:  # dequantized on load
            assert torch.equal(w.cpu(), model.get_submodule(name).weight), name
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # hubquant's simulated model on CPU is the reference for both devices
        got, ours = loaded(ids.to(device)).logits.float().cpu(), model(ids).logits.float()
    floor = ACT_QUANT_CUDA_MIN_DB.get(case, 60) if device == "cuda" else MIN_SQNR_DB.get(case, 60)
    assert sqnr_db(ours, got) > floor
    assert (got.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


def test_asymmetric_ints_ask_transformers_to_dequantize(tmp_path):
    _, _, qc = _write("awq", tmp_path)
    assert qc["dequantize"] is True
    for case in ("rtn", "w8a8", "fp8", "rtn-w8-asym"):
        _, _, qc = _write(case, tmp_path / case)
        assert "dequantize" not in qc, case


def test_upstream_still_needs_the_dequantize_key(tmp_path):
    """The reason for `"dequantize": true` (docs/formats.md). Without it, transformers 5.16 + compressed-tensors 0.18
    still load packed asymmetric zero points; transformers 5.24 + compressed-tensors 0.20 allocate them unpacked and
    refuse the file. When the newest versions stop refusing, this fails: drop the key for those versions."""
    import compressed_tensors
    import transformers
    from packaging.version import Version

    model, quantized, _ = _write("awq", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["quantization_config"]["dequantize"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    newest = (Version(transformers.__version__) >= Version("5.24")
              and Version(compressed_tensors.__version__) >= Version("0.20"))
    if newest:
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(tmp_path)
        return
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # older versions run it compressed, correctly
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert sqnr_db(model(ids).logits.float(), loaded(ids).logits.float()) > 60
