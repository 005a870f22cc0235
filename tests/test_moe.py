"""Mixture-of-experts: every method quantizes every expert (never a router), the per-expert compressed-tensors
checkpoint loads with plain transformers and computes what hubquant's dequantized model computes, and
calibrated methods see per-expert routed tokens with a stated rule for experts that got too few."""
from __future__ import annotations

import json

import pytest
import torch

from hubquant import moe, moe_pipeline
from hubquant.errors import UnsupportedError, UsageError
from hubquant.methods import QuantJob, get_method
from hubquant.modeling import quantizable_linears
from hubquant.quant import QuantScheme, WeightScheme, sqnr_db
from tests.helpers import MOE_ARCHS, tiny_model

VOCAB = 512
W4 = WeightScheme(bits=4, group_size=32, symmetric=True)


def moe_model(arch: str, seed: int = 0):
    return tiny_model(arch, seed=seed, vocab=VOCAB, hidden=128, intermediate=256)


def calib_ids(n: int = 8, seq: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq), generator=g)


EVAL_IDS = calib_ids(2, 48, seed=7)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(EVAL_IDS).logits.float()


def scheme_of(method: str) -> QuantScheme:
    spec = get_method(method)
    if spec.default_scheme.weights.type == "float" or spec.default_scheme.weights.bits == 8:
        return spec.default_scheme
    return QuantScheme(weights=WeightScheme(bits=4, group_size=32, symmetric=True))  # moe.checkpoint_scheme


def quantize(model, method: str, **options):
    job = QuantJob(scheme=scheme_of(method), calib=calib_ids() if get_method(method).needs_calibration() else None,
                   options=options, progress=False)
    return moe_pipeline.quantize_with_policy(model, job, get_method(method).load(), log=lambda m: None)


def write_and_load(model, quantized, method, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from hubquant.formats.compressed_tensors import write

    qc = write(model, quantized, scheme=scheme_of(method), out_dir=tmp_path, method=method)
    kw = {}
    if not scheme_of(method).weights.symmetric:  # transformers runs asymmetric int4 only decompressed
        kw["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    return AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, **kw).eval(), qc


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_per_expert_linears_compute_what_the_fused_experts_compute(arch):
    model = moe_model(arch)
    ref = logits(model)
    n = moe.unfuse_experts(model)
    assert n >= 1
    # same weights, split matmuls: equal up to fp32 summation order (bit-equal with one thread)
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-6)
    experts = moe.expert_linear_names(model)
    names = quantizable_linears(model)
    assert experts and set(experts) <= set(names)
    assert not [n for n in names if n.endswith((".gate", "shared_expert_gate"))]  # routers stay float


# (arch, method, min logits SQNR in dB vs float). Qwen3-MoE runs every method; the others GPTQ (routing +
# Hessians through their own blocks: shared experts, MLA, dense first layers) or RTN.
CASES = [
    ("qwen3_moe", "rtn", 12.0), ("qwen3_moe", "gptq", 12.0), ("qwen3_moe", "awq", 12.0),
    ("qwen3_moe", "smoothquant", 25.0), ("qwen3_moe", "w8a8", 25.0), ("qwen3_moe", "fp8", 20.0),
    ("qwen2_moe", "gptq", 12.0), ("mixtral", "gptq", 12.0), ("deepseek_v3", "gptq", 12.0),
    ("glm4_moe", "rtn", 12.0), ("deepseek_v3", "awq", 12.0), ("mixtral", "smoothquant", 25.0),
]


INT8_ACTS = ("smoothquant", "w8a8")  # int8 experts: transformers 5.24 decompresses only packed or FP8 experts


def check_int8_experts(model, tmp_path):
    """Each expert's int-quantized tensors, decompressed by compressed-tensors' own compressor, are the weights
    hubquant's dequantized model runs."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    group = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    comp = BaseCompressor.get_value_from_registry(qc["format"])
    tensors = load_file(tmp_path / "model.safetensors")
    lins = quantizable_linears(model)
    checked = 0
    for name in moe.expert_linear_names(model):
        key = moe.checkpoint_name(model, name)
        sd = {"weight": tensors[f"{key}.weight"], "weight_scale": tensors[f"{key}.weight_scale"]}
        w = comp.decompress(sd, group)["weight"]
        assert torch.equal(w.float(), lins[name].weight.float()), name
        checked += 1
    return qc, checked


@pytest.mark.parametrize("arch,method,min_sqnr", CASES, ids=[f"{a}-{m}" for a, m, _ in CASES])
def test_method_quantizes_every_expert_and_transformers_loads_it(arch, method, min_sqnr, tmp_path):
    model = moe_model(arch)
    ref = logits(model)
    moe.unfuse_experts(model)
    wanted = set(quantizable_linears(model))
    quantized, policy = quantize(model, method)
    assert set(quantized) == wanted  # every expert projection, attention, shared experts; no router
    deq = logits(model)
    if method in INT8_ACTS:
        from hubquant.formats.compressed_tensors import write

        write(model, quantized, scheme=scheme_of(method), out_dir=tmp_path, method=method)
        qc, checked = check_int8_experts(model, tmp_path)
        assert checked == len(moe.expert_linear_names(model)) and sqnr_db(ref, deq) > min_sqnr
        assert [n for n in qc["ignore"] if n.endswith(".gate")]
        return
    loaded, qc = write_and_load(model, quantized, method, tmp_path)
    ignore = qc["ignore"]
    routers = [n for n in ignore if n.endswith(".gate")]
    assert routers, ignore  # routers are named in the ignore list for loaders (vLLM) that build them as Linears
    from safetensors import safe_open

    keys = set(safe_open(tmp_path / "model.safetensors", "pt").keys())
    block = "block_sparse_moe" if arch == "mixtral" else "mlp"
    proj = "w1" if arch == "mixtral" else "gate_proj"
    last = len(model.model.layers) - 1
    stored = "weight_packed" if scheme_of(method).weights.bits == 4 else "weight"
    assert f"model.layers.{last}.{block}.experts.0.{proj}.{stored}" in keys
    assert f"model.layers.{last}.{block}.experts.0.{proj}.weight_scale" in keys
    assert not any(k.startswith(f"model.layers.{last}.{block}.gate.weight_") for k in keys)  # router float
    for name, experts in moe.expert_modules(model).items():  # transformers fused our dequantized experts again
        fused = loaded.get_submodule(name)
        for i, mlp in enumerate(experts):
            gate, up, down = mlp.projections()
            assert torch.equal(fused.gate_up_proj[i].float(), torch.cat([gate.weight, up.weight]).float())
            assert torch.equal(fused.down_proj[i].float(), down.weight.float())
    out = logits(loaded)
    if scheme_of(method).activations is None:
        assert sqnr_db(deq, out) > 60, "the loaded variant must compute what hubquant's dequantized model computes"
        assert (out.argmax(-1) == deq.argmax(-1)).float().mean() > 0.99
    else:  # FP8 activations: transformers runs dequantized experts on unquantized inputs, hubquant (and vLLM) not
        assert sqnr_db(deq, out) > 25
    assert sqnr_db(ref, out) > min_sqnr
    if get_method(method).needs_calibration():
        s = policy.summary()
        assert s["experts"] == sum(m.num_experts for m in moe.expert_modules(model).values())


def test_routing_counts_are_the_routers_choices():
    model = moe_model("qwen3_moe")
    moe.unfuse_experts(model)
    _, policy = quantize(model, "gptq")
    top_k = model.config.num_experts_per_tok
    assert len(policy.counts) == 2
    for counts in policy.counts.values():
        assert len(counts) == 8 and sum(counts) == calib_ids().numel() * top_k


def test_low_token_experts_fall_back_to_rtn_and_are_reported(tmp_path):
    model = moe_model("qwen3_moe")
    moe.unfuse_experts(model)
    quantized, policy = quantize(model, "gptq", min_expert_tokens=10**6)  # every expert is "too rare"
    experts = moe.expert_linear_names(model)
    assert set(experts) <= set(quantized)
    assert set(policy.fallback_linears) == set(experts)
    s = policy.summary()
    assert s["below_threshold"] == s["experts"] and s["rule"].startswith("round-to-nearest")
    from hubquant.methods.rtn import quantize_linears
    name = next(iter(experts))
    # the fallback is exactly round-to-nearest of the float weight (GPTQ would differ)
    ref = moe_model("qwen3_moe")
    moe.unfuse_experts(ref)
    lin = dict(quantizable_linears(ref))[name]
    rtn = quantize_linears({name: lin}, QuantJob(scheme=scheme_of("gptq"), progress=False))[name]
    assert torch.equal(rtn.qweight, quantized[name].qweight)
    section = moe.card_section(model, quantized, policy)
    assert "round-to-nearest for experts under the threshold" in section and "`model.layers.0.mlp.gate`" in section


def test_calibrate_all_experts_feeds_every_expert_without_changing_the_output():
    model = moe_model("qwen3_moe")
    moe.unfuse_experts(model)
    ref = logits(model)
    for m in moe.expert_modules(model).values():
        m.calibrate_all = True
    seen = {}
    hooks = [lin.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].shape[0]))
             for n, lin in quantizable_linears(model).items() if n in moe.expert_linear_names(model)]
    out = logits(model)
    for h in hooks:
        h.remove()
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert len(seen) == len(moe.expert_linear_names(model)) and set(seen.values()) == {EVAL_IDS.numel()}
    quantized, policy = quantize(moe_model_unfused(), "gptq", calibrate_all_experts="true")
    assert policy.summary()["calibrate_all_experts"] and not policy.fallback_linears


def moe_model_unfused(arch="qwen3_moe"):
    model = moe_model(arch)
    moe.unfuse_experts(model)
    return model


def test_moe_options_are_checked_with_every_methods_own():
    spec = get_method("gptq")
    assert spec.parse_options({"calibrate_all_experts": "true", "damp": 0.05}).damp == 0.05
    assert spec.parse_options(["min_expert_tokens=4", "damp=0.05"]).damp == 0.05
    with pytest.raises(UsageError):  # before any download: the plan parses the options
        spec.parse_options({"calibrate_all_experts": "maybe"})


def test_bad_moe_options_are_usage_errors():
    with pytest.raises(UsageError):
        quantize(moe_model_unfused(), "gptq", calibrate_all_experts="maybe")
    with pytest.raises(UsageError):
        quantize(tiny_model("llama", vocab=VOCAB), "gptq", calibrate_all_experts=True)


def test_unknown_fused_experts_stop_with_exit_5_naming_what_is_supported():
    model = moe_model("qwen3_moe")
    model.config.model_type = "made_up_moe"  # fused experts whose checkpoint names hubquant does not know
    with pytest.raises(UnsupportedError) as e:
        moe.unfuse_experts(model)
    assert e.value.exit_code == 5 and "qwen3_moe" in e.value.hint and "gpt_oss" in e.value.hint


def test_provenance_report_counts_experts():
    model = moe_model_unfused("qwen2_moe")
    quantized, policy = quantize(model, "rtn")
    rep = moe.report(model, quantized, policy)
    assert rep["expert_linears"] == rep["expert_linears_quantized"] == 2 * 4 * 3
    assert rep["float_modules"]["router"] == 4  # two routers and two shared-expert gates
    json.dumps(rep)


@pytest.mark.parametrize("arch,method", [("mixtral", "rtn"), ("qwen3_moe", "w8a8")])
def test_hubquant_loader_reads_per_expert_variants(arch, method, tmp_path):
    import hubquant
    from hubquant.formats.compressed_tensors import write

    model = moe_model_unfused(arch)
    quantized, _ = quantize(model, method)
    deq = logits(model)
    write(model, quantized, scheme=scheme_of(method), out_dir=tmp_path, method=method)
    loaded, _ = hubquant.load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    assert loaded.hubquant_format["quantized_linears"] == len(quantized)
    out = logits(loaded)
    # weight-only: the same weights; W8A8: hubquant's loader quantizes activations per token like the evaluation
    assert sqnr_db(deq, out) > (60 if scheme_of(method).activations is None else 25)


def test_bitsandbytes_and_asym_experts_are_refused_with_the_reason():
    model = moe_model_unfused()
    with pytest.raises(UnsupportedError) as e:
        moe.checkpoint_scheme(model, get_method("bnb-nf4").default_scheme, "bitsandbytes", asym_requested=False)
    assert e.value.exit_code == 5
    asym = get_method("awq").default_scheme
    with pytest.raises(UsageError):
        moe.checkpoint_scheme(model, asym, "compressed-tensors", asym_requested=True)
    sym = moe.checkpoint_scheme(model, asym, "compressed-tensors", asym_requested=False, log=lambda m: None)
    assert sym.weights.symmetric and sym.weights.group_size == asym.weights.group_size
    dense = tiny_model("llama", vocab=VOCAB)
    assert moe.checkpoint_scheme(dense, asym, "compressed-tensors", asym_requested=True) is asym


def test_written_experts_are_checked_against_the_evaluated_model(tmp_path):
    from safetensors.torch import load_file, save_file

    from hubquant.errors import QualityGateError
    from hubquant.formats.compressed_tensors import write

    model = moe_model_unfused("mixtral")
    quantized, _ = quantize(model, "rtn")
    write(model, quantized, scheme=scheme_of("rtn"), out_dir=tmp_path, method="rtn")
    assert moe_pipeline.verify_written(model, quantized, scheme_of("rtn"), tmp_path, sample=1000) == 2 * 4 * 3 + 1
    tensors = load_file(tmp_path / "model.safetensors")
    a, b = (f"model.layers.1.block_sparse_moe.experts.{i}.w2.weight_packed" for i in (0, 1))
    tensors[a], tensors[b] = tensors[b], tensors[a]  # two experts swapped: loads fine, computes garbage
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(QualityGateError) as e:
        moe_pipeline.verify_written(model, quantized, scheme_of("rtn"), tmp_path, sample=1000)
    assert e.value.exit_code == 6
