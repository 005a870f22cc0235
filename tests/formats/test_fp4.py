"""NVFP4 / MXFP4 variants: bytes equal to compressed-tensors' own compressor, the config is its preset, and
transformers + compressed-tensors loads them to the weights and logits hubquant computes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hubquant import fp4
from hubquant.formats import get_format
from hubquant.methods import QuantJob, get_method
from hubquant.quant import sqnr_db
from tests.helpers import tiny_model

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

# preset -> (method, minimum weight SQNR in dB on the tiny model's Linears)
VARIANTS = {"NVFP4A16": ("rtn", 19.0), "MXFP4A16": ("rtn", 17.0), "NVFP4": ("rtn", 19.0),
            "NVFP4A16-gptq": ("gptq", 14.0), "MXFP4A16-gptq": ("gptq", 13.0)}


def _write(preset: str, method: str, out, calib):
    model = tiny_model("llama").to(torch.bfloat16)
    float_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    spec = get_method(method)
    scheme = spec.resolve_scheme(preset=preset)
    job = QuantJob(scheme=scheme, calib=calib if spec.needs_calibration(scheme) else None, progress=False)
    quantized = spec.load()(model, job)
    qc = get_format("compressed-tensors")(model, quantized, scheme=scheme, out_dir=out, method=method)
    return model, float_weights, quantized, qc


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    torch.manual_seed(0)
    calib = torch.randint(0, 49152, (4, 64))
    out = {}
    for key, (method, _) in VARIANTS.items():
        d = tmp_path_factory.mktemp(key)
        out[key] = (d, *_write(key.split("-")[0], method, d, calib))
    return out


def _ct_reference(weights: dict[str, torch.Tensor], preset: str) -> dict[str, dict[str, torch.Tensor]]:
    """compressed-tensors' observer math (generate_gparam, calculate_qparams, fused q/k/v and gate/up global scales
    as llm-compressor sets them) and its compressor, per Linear."""
    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    nv = preset.startswith("NV")
    gscales = {n: generate_gparam(w.amin().reshape(1), w.amax().reshape(1)) for n, w in weights.items()} if nv else {}
    for n in list(gscales):
        parent, _, leaf = n.rpartition(".")
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            if leaf in group:
                gscales[n] = torch.min(torch.cat([generate_gparam(weights[f"{parent}.{m}"].amin().reshape(1),
                                                                  weights[f"{parent}.{m}"].amax().reshape(1))
                                                  for m in group])).reshape(1)
    out = {}
    compressor = NVFP4PackedCompressor if nv else MXFP4PackedCompressor
    for n, w in weights.items():
        g = w.reshape(w.shape[0], -1, args.group_size)
        scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gscales.get(n))
        sd = {"weight": w, "weight_scale": scale.to(w.dtype)}  # the module's weight_scale has the weight's dtype
        if nv:
            sd["weight_global_scale"] = gscales[n]
        out[n] = compressor.compress(sd, scheme)
    return out


@pytest.mark.parametrize("preset", ["NVFP4A16", "MXFP4A16"])
def test_bytes_equal_compressed_tensors_compressor(variants, preset):
    out_dir, _, float_weights, quantized, _ = variants[preset]
    written = load_file(out_dir / "model.safetensors")
    ref = _ct_reference({n: float_weights[n] for n in quantized}, preset)
    assert len(ref) == 14
    for name, tensors in ref.items():
        for key, want in tensors.items():
            got = written[f"{name}.{key}"]
            assert got.dtype == want.dtype and got.shape == want.shape, (name, key)
            assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)), (name, key)
    if preset == "NVFP4A16":  # vLLM's fused q/k/v and gate/up read one global scale
        g = [written[f"model.layers.0.self_attn.{p}_proj.weight_global_scale"] for p in "qkv"]
        assert torch.equal(g[0], g[1]) and torch.equal(g[0], g[2])
        own = [fp4.global_scale(float_weights[f"model.layers.0.self_attn.{p}_proj"]) for p in "qkv"]
        assert torch.equal(g[0], torch.min(torch.cat(own)).reshape(1)) and len(set(map(float, own))) == 3


def test_rounding_and_packing_match_compressor_on_edge_values():
    """Ties, values below the smallest step (negative ones keep the sign bit), -0.0, clamping, fp16/fp32 weights."""
    steps = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 0.1, -0.1, -0.25, -0.75, -5.0, -9.0, 0.0, -0.0])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = (torch.randn(8, 64) * 0.05).to(dtype)
        w[0, :16] = steps.to(dtype) * w[0, :16].abs().max() / 6
        w[1, :16] = 0
        for preset in ("NVFP4A16", "MXFP4A16"):
            ref = _ct_reference({"x.lin": w}, preset)["x.lin"]
            mine = fp4.quantize(w, "nvfp4" if preset.startswith("NV") else "mxfp4")
            assert torch.equal(fp4.pack_codes(mine.qweight), ref["weight_packed"]), (dtype, preset)
            assert torch.equal(mine.scale.view(torch.uint8), ref["weight_scale"].view(torch.uint8)), (dtype, preset)


@pytest.mark.parametrize("key", list(VARIANTS))
def test_config_is_compressed_tensors_preset(variants, key):
    preset = key.split("-")[0]
    _, _, _, _, qc = variants[key]
    config = json.loads((variants[key][0] / "config.json").read_text())["quantization_config"]
    assert config == json.loads(json.dumps(qc))
    parsed = QuantizationConfig.model_validate(config)
    group = parsed.config_groups["group_0"]
    want = preset_name_to_scheme(preset, ["Linear"])
    fields = ("num_bits", "type", "strategy", "group_size", "symmetric", "dynamic", "scale_dtype")
    for part in ("weights", "input_activations"):
        a, b = getattr(group, part), getattr(want, part)
        assert (a is None) == (b is None), part
        if a is not None:
            assert {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}, part
    assert config["format"] == ("nvfp4-pack-quantized" if preset.startswith("NV") else "mxfp4-pack-quantized")
    assert config["ignore"] == ["lm_head"]
    assert (group.weights.actorder is not None) == key.endswith("gptq")


@pytest.mark.parametrize("key", list(VARIANTS))
def test_transformers_loads_the_weights_hubquant_computed(variants, key):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import hubquant

    out_dir, model, float_weights, quantized, _ = variants[key]
    dense = AutoModelForCausalLM.from_pretrained(out_dir, quantization_config=CompressedTensorsConfig(
        run_compressed=False))
    min_sqnr = VARIANTS[key][1]
    for name, qw in quantized.items():
        ours = qw.dequantize(torch.float32)
        theirs = dense.get_submodule(name).weight.float()
        assert torch.allclose(theirs, ours, rtol=2**-8, atol=0), name  # equal up to bf16 rounding
        assert sqnr_db(float_weights[name].float(), ours) > min_sqnr, name
    # logits: transformers running the compressed checkpoint (NVFP4: activations quantized too) vs hubquant.load
    # vs the model the method left in memory (what the pipeline evaluates)
    compressed = AutoModelForCausalLM.from_pretrained(out_dir)
    loaded, _ = hubquant.load(out_dir, device="cpu", progress=False)
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, c = (m(ids).logits.float() for m in (compressed, loaded, model))
    assert sqnr_db(a, b) > 40.0
    assert sqnr_db(a, c) > (20.0 if key == "NVFP4" else 35.0)


def test_gptq_on_the_fp4_grid_beats_rtn_with_the_same_block_scales():
    from hubquant.methods.fp4 import gptq_quantize
    from hubquant.methods.gptq import prepare_hessian

    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    x = torch.randn(2048, 32) @ torch.randn(32, 256) + 0.3 * torch.randn(2048, 256)  # correlated inputs
    h = 2 * x.T @ x / x.shape[0]
    for kind in ("nvfp4", "mxfp4"):
        rtn = fp4.quantize(w, kind)
        prep = prepare_hessian(h, fp4.weight_scheme(kind), damp=0.01, actorder=True)
        (gq,) = gptq_quantize([w], prep, kind, gscales=[rtn.global_scale])
        assert torch.equal(gq.scale.view(torch.uint8), rtn.scale.view(torch.uint8))  # block scales fixed
        err_rtn = (x @ (w - rtn.dequantize()).T).pow(2).mean()
        err_gptq = (x @ (w - gq.dequantize()).T).pow(2).mean()
        assert err_gptq < 0.5 * err_rtn, (kind, float(err_gptq), float(err_rtn))
