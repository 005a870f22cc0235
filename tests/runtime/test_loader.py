"""hubquant.load on every variant kind: checkpoints written by hand from FORMATS.md (hubquant.runtime.synth) and
by hubquant's own compressed-tensors writer; weights must come back exactly, logits close to the float model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hubquant.errors import CorruptFileError, NotFoundError, UnsupportedError
from hubquant.runtime import load, synth
from hubquant.runtime.modules import W4A16Linear, W8A8Linear
from tests.helpers import tiny_model

# kind -> max relative logits error against the float model holding the dequantized weights
TOL = {"bf16": 1e-6, "ct-w4a16": 0.02, "ct-w4a16-asym": 0.02, "gptq": 0.02, "gptq-actorder": 0.02, "awq": 0.02,
       "ct-w8a8": 0.05, "ct-fp8": 0.1, "ct-fp8-static": 0.1}


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", vocab=512).to(torch.bfloat16)


def _reference(base, tmp_path, deq):
    """The float model as transformers loads it (bf16), holding the dequantized weights."""
    from transformers import AutoModelForCausalLM

    d = tmp_path / "float-ref"
    synth.write_model_variant(base, d, "bf16")
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    for name, w in deq.items():
        ref.get_submodule(name).weight.data = w.to(torch.bfloat16)
    return ref


@pytest.mark.parametrize("kind", synth.KINDS)
def test_every_kind_loads_exactly(tmp_path, base, kind):
    deq = synth.write_model_variant(base, tmp_path, kind, group_size=32)
    model, tok = load(tmp_path, device="cpu", dtype=torch.bfloat16, progress=False)
    assert tok is None
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, (W4A16Linear, W8A8Linear))}
    assert len(qmods) == (0 if kind == "bf16" else 14)  # 2 layers x 7 Linears; lm_head stays float
    assert model.hubquant_format["format"] == json.loads((tmp_path / "config.json").read_text()).get(
        "quantization_config", {}).get("quant_method", "none")
    for name, mod in qmods.items():
        if isinstance(mod, W4A16Linear):
            assert torch.equal(mod.dequantized_weight(torch.float32), deq[name]), name
            assert (mod.perm is not None) == (kind == "gptq-actorder")
        else:
            assert mod.fp8 == kind.startswith("ct-fp8")
            assert (mod.input_scale is not None) == (kind == "ct-fp8-static")
            w = (mod.qweight.float() * mod.w_scale[:, None]).to(torch.float32)
            assert torch.allclose(w, deq[name], rtol=0, atol=0), name
    # logits against the float model that holds exactly the dequantized weights
    ref_model = _reference(base, tmp_path, deq)
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = _rel(model(ids).logits.float(), ref_model(ids).logits.float())
    assert err < TOL[kind], err


def test_qwen2_bias_and_tied_embeddings(tmp_path):
    base = tiny_model("qwen2", vocab=512).to(torch.bfloat16)  # q/k/v carry biases
    deq = synth.write_model_variant(base, tmp_path / "q", "ct-w4a16-asym", group_size=64)
    model, _ = load(tmp_path / "q", device="cpu", dtype=torch.bfloat16, progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, W4A16Linear) and torch.equal(q.bias, base.model.layers[0].self_attn.q_proj.bias)
    ref = _reference(base, tmp_path, deq)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(model(ids).logits.float(), ref(ids).logits.float()) < 0.02

    from transformers import AutoModelForCausalLM

    from tests.helpers import tiny_config

    cfg = tiny_config("llama", vocab=512)
    cfg.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    synth.write_model_variant(tied, tmp_path / "t", "ct-w8a8")
    model, _ = load(tmp_path / "t", device="cpu", progress=False)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


SCHEMES = {
    "w4-g32-sym": {"weights": {"bits": 4, "group_size": 32, "symmetric": True}},
    "w4-g64-asym": {"weights": {"bits": 4, "group_size": 64, "symmetric": False}},
    "w4-channel": {"weights": {"bits": 4, "group_size": -1, "symmetric": True}},
    "w8a8": {"weights": {"bits": 8, "group_size": -1}, "activations": {}},
}


@pytest.mark.parametrize("scheme_id", list(SCHEMES))
def test_round_trip_with_hubquant_writer(tmp_path, scheme_id):
    """RTN + hubquant.formats.compressed_tensors.write -> hubquant.load: the same weights the method produced."""
    from hubquant.formats import compressed_tensors as ct
    from hubquant.methods import QuantJob, get_method
    from hubquant.quant import ActivationScheme, QuantScheme, WeightScheme

    spec = SCHEMES[scheme_id]
    scheme = QuantScheme(weights=WeightScheme(**spec["weights"]),
                         activations=ActivationScheme(**spec["activations"]) if "activations" in spec else None)
    model = tiny_model("llama", vocab=512).to(torch.bfloat16)
    quantized = get_method("rtn").load()(model, QuantJob(scheme=scheme, progress=False))
    ct.write(model, quantized, scheme=scheme, out_dir=tmp_path, method="rtn")
    loaded, _ = load(tmp_path, device="cpu", dtype=torch.bfloat16, progress=False)
    for name, qw in quantized.items():
        mod = loaded.get_submodule(name)
        if scheme.weights.bits == 4:
            assert isinstance(mod, W4A16Linear)
            assert torch.equal(mod.dequantized_weight(torch.float32), qw.dequantize(torch.float32)), name
        else:
            assert isinstance(mod, W8A8Linear) and torch.equal(mod.qweight, qw.qweight)
    if scheme.activations is None:  # weight-only: the method's model holds exactly these weights
        ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            out, ref = loaded(ids).logits.float(), model(ids).logits.float()
        # position 0 (no rotation) is identical; later positions differ only by the rotary table, which the
        # in-memory model holds in bf16 after .to(bf16) and a loaded model keeps in fp32 (as transformers does)
        assert torch.equal(out[:, 0], ref[:, 0])
        assert _rel(out, ref) < 1e-2


def test_load_errors(tmp_path, base):
    with pytest.raises(NotFoundError):
        load(tmp_path / "missing", device="cpu")
    pk = tmp_path / "pickle"
    pk.mkdir()
    base.config.to_json_file(pk / "config.json")
    torch.save({}, pk / "pytorch_model.bin")
    with pytest.raises(UnsupportedError, match="pickled"):
        load(pk, device="cpu")
    d = tmp_path / "hqq"  # a quant_method hubquant.load has no reader for (bitsandbytes: test_every_writer.py)
    synth.write_model_variant(base, d, "bf16")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "hqq", "nbits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="hqq"):
        load(d, device="cpu")
    # a checkpoint missing a tensor the model needs
    from safetensors.torch import load_file, save_file

    d2 = tmp_path / "broken"
    synth.write_model_variant(base, d2, "ct-w4a16", group_size=32)
    f = next(d2.glob("*.safetensors"))
    t = load_file(f)
    del t["model.norm.weight"]
    save_file(t, f)
    with pytest.raises(CorruptFileError, match="model.norm.weight"):
        load(d2, device="cpu", progress=False)


@pytest.mark.parametrize("fmt,symmetric,group", [("gptq", True, 32), ("gptq", False, 64), ("awq", False, 32),
                                                  ("gptq", True, -1)])
def test_round_trip_with_gptq_awq_writers(tmp_path, fmt, symmetric, group):
    """RTN + hubquant's gptq/awq writers -> hubquant.load: exactly the weights the method produced."""
    from hubquant.formats import get_format
    from hubquant.methods import QuantJob, get_method
    from hubquant.quant import QuantScheme, WeightScheme

    scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=group, symmetric=symmetric))
    model = tiny_model("llama", vocab=512).to(torch.float16)
    quantized = get_method("rtn").load()(model, QuantJob(scheme=scheme, progress=False))
    qc = get_format(fmt)(model, quantized, scheme=scheme, out_dir=tmp_path, method="rtn", options={})
    loaded, _ = load(tmp_path, device="cpu", dtype=torch.float16, progress=False)
    assert loaded.hubquant_format["format"] == qc["quant_method"] == fmt
    for name, qw in quantized.items():
        mod = loaded.get_submodule(name)
        assert isinstance(mod, W4A16Linear)
        assert (mod.zeros is None) == symmetric, name
        assert torch.equal(mod.dequantized_weight(torch.float32), qw.dequantize(torch.float32)), name


def test_load_by_repo_id_from_local_hub(tmp_path, hub_env, base):
    """A repo id is downloaded from the Hub (here hubquant's local Hub) with safetensors only, then loaded."""
    folder = tmp_path / "variant"
    deq = synth.write_model_variant(base, folder, "ct-w4a16", group_size=32)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# tiny W4A16\n")
    torch.save({"not": "loaded"}, folder / "training_args.bin")  # a pickle beside the weights is never fetched
    hub_env.hub.publish_folder("alice/tiny-llama-w4a16-runtime", folder)
    model, _ = load("alice/tiny-llama-w4a16-runtime", device="cpu", dtype=torch.bfloat16, progress=False)
    path = model.hubquant_format["path"]
    assert not list(Path(path).glob("*.bin"))
    q = model.get_submodule("model.layers.1.mlp.down_proj")
    assert torch.equal(q.dequantized_weight(torch.float32), deq["model.layers.1.mlp.down_proj"])
    with pytest.raises(NotFoundError):
        load("alice/no-such-variant", device="cpu")


@pytest.mark.parametrize("bits", [3, 8])
def test_other_bit_widths_fall_back_to_float(tmp_path, bits):
    """GPTQ/compressed-tensors widths without a kernel are dequantized once into float Linears (same weights)."""
    from hubquant.formats import get_format
    from hubquant.methods import QuantJob, get_method
    from hubquant.quant import QuantScheme, WeightScheme

    scheme = QuantScheme(weights=WeightScheme(bits=bits, group_size=64, symmetric=True))
    for fmt in ("gptq", "compressed-tensors"):
        model = tiny_model("llama", vocab=512).to(torch.float16)
        quantized = get_method("rtn").load()(model, QuantJob(scheme=scheme, progress=False))
        out = tmp_path / fmt
        get_format(fmt)(model, quantized, scheme=scheme, out_dir=out, method="rtn", options={})
        notes = []
        loaded, _ = load(out, device="cpu", dtype=torch.float16, progress=False, log=notes.append)
        assert any("dequantized" in n for n in notes), notes
        for name, qw in quantized.items():
            lin = loaded.get_submodule(name)
            assert type(lin) is torch.nn.Linear
            assert torch.equal(lin.weight, qw.dequantize(torch.float16)), (fmt, name)
