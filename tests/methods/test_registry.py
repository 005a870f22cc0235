"""The method registry: options parsed one way for every method, scheme overrides, calibration need, architectures."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from hubquant.errors import UnsupportedError, UsageError
from hubquant.methods import METHODS, get_method
from hubquant.methods.awq import apply_scale
from hubquant.methods.gptq import GptqOptions
from hubquant.methods.scaling import ARCHITECTURES, fold
from hubquant.methods.smoothing import architecture_groups
from tests.helpers import tiny_model


@pytest.mark.parametrize("name", list(METHODS))
def test_unknown_option_lists_the_known_ones(name):
    spec = get_method(name)
    with pytest.raises(UsageError) as e:
        spec.parse_options({"no_such_option": 1})
    assert "no_such_option" in e.value.message and name in e.value.message
    known = spec.options_class().keys()
    assert all(k in e.value.hint for k in known), (known, e.value.hint)
    assert spec.parse_options(None) == spec.parse_options({}) == spec.options_class()()


@pytest.mark.parametrize(("name", "key", "value", "fix"), [
    ("gptq", "damp", "lots", "number"),
    ("gptq", "damp", -0.1, "> 0"),
    ("gptq", "actorder", "maybe", "true or false"),
    ("gptq", "block_size", 0, ">= 1"),
    ("awq", "grid", 2.5, "whole number"),
    ("smoothquant", "alpha", 2, "[0, 1]"),
    ("smoothquant", "smooth", "some", "all, norms"),
    ("smoothquant", "alpha_grid", [0.5, 1.5], "[0, 1]"),
    ("w8a8", "weights", "awq", "rtn, gptq"),
    ("fp8", "alpha", "most", "[0, 1]"),
    ("bnb-nf4", "compute_dtype", "int4", "bfloat16"),
    ("bnb-int8", "threshold", -1, ">= 0"),
])
def test_bad_value_names_the_fix(name, key, value, fix):
    with pytest.raises(UsageError) as e:
        get_method(name).parse_options({key: value})
    assert key in str(e.value) and fix in str(e.value), str(e.value)


def test_key_value_strings_parse_like_the_cli():
    opts = get_method("gptq").parse_options(["damp=0.05", "actorder=false", "block_size=64"])
    assert opts == GptqOptions(damp=0.05, actorder=False, block_size=64)
    assert get_method("gptq").parse_options(opts) is opts
    sq = get_method("smoothquant").parse_options(['alpha={"mlp.up_proj": 0.9, "default": 0.8}', "smooth=norms"])
    assert sq.alpha == (("default", 0.8), ("mlp.up_proj", 0.9)) and sq.smooth == "norms"
    assert get_method("smoothquant").parse_options(["alpha=search"]).alpha == "search"
    with pytest.raises(UsageError, match="KEY=VALUE"):
        get_method("gptq").parse_options(["damp"])
    with pytest.raises(UsageError, match="GptqOptions"):
        get_method("awq").parse_options(opts)  # another method's options object


def test_needs_calibration_follows_scheme_and_options():
    fp8, w8a8 = get_method("fp8"), get_method("w8a8")
    assert get_method("gptq").needs_calibration() and not get_method("rtn").needs_calibration()
    assert not fp8.needs_calibration(fp8.default_scheme, {})
    for o in ({"alpha": 0.8}, {"smooth": "norms"}, {"weights": "gptq"}):
        assert fp8.needs_calibration(fp8.default_scheme, o), o
    assert not fp8.needs_calibration(fp8.default_scheme, {"alpha_grid": [0.5]})  # a grid alone smooths nothing
    assert fp8.needs_calibration(fp8.resolve_scheme(activations="static"))
    assert w8a8.needs_calibration(w8a8.default_scheme, {"weights": "gptq"})
    assert not w8a8.needs_calibration(w8a8.default_scheme)


def test_resolve_scheme_applies_overrides_and_refuses_the_rest():
    rtn = get_method("rtn")
    assert rtn.resolve_scheme().name == "W4A16-G128"
    assert rtn.resolve_scheme(bits=8).weights.group_size == -1  # 8-bit defaults to per channel
    assert rtn.resolve_scheme(bits=4, group_size=64, symmetric=False).name == "W4A16-ASYM-G64"
    static = get_method("fp8").resolve_scheme(activations="static")
    assert static.name == "FP8-STATIC" and static.activations.strategy == "tensor"
    with pytest.raises(UsageError, match="fixed scheme"):
        get_method("bnb-nf4").resolve_scheme(bits=8)
    with pytest.raises(UsageError) as e:
        get_method("smoothquant").resolve_scheme(bits=4)
    assert "--bits 8" in e.value.hint
    with pytest.raises(UsageError, match="weight-only"):
        rtn.resolve_scheme(activations="static")
    for method, kw, flag in (("smoothquant", {"group_size": 32}, "--group-size 32"),
                             ("w8a8", {"bits": 8, "symmetric": False}, "--asym")):
        with pytest.raises(UsageError, match=f"per output channel.*{flag}"):  # before any download
            get_method(method).resolve_scheme(**kw)
    assert get_method("smoothquant").resolve_scheme(group_size=-1).name == "W8A8"
    assert get_method("awq").takes_scheme_overrides(4) and not get_method("fp8").takes_scheme_overrides(4)
    assert not get_method("smoothquant").takes_scheme_overrides(4) and get_method("w8a8").takes_scheme_overrides(8)


def test_check_architecture_before_download():
    gpt2, llama = SimpleNamespace(model_type="gpt2"), SimpleNamespace(model_type="llama")
    with pytest.raises(UnsupportedError) as e:
        get_method("awq").check_architecture(gpt2)
    assert "gptq" in e.value.hint and "rtn" in e.value.hint
    with pytest.raises(UnsupportedError) as e:
        get_method("smoothquant").check_architecture(gpt2)
    assert "w8a8" in e.value.hint
    get_method("fp8").check_architecture(gpt2)  # no smoothing: any architecture
    with pytest.raises(UnsupportedError):
        get_method("fp8").check_architecture(gpt2, {"alpha": 0.5})
    for name in METHODS:
        get_method(name).check_architecture(llama)


def test_variant_names():
    gptq, bnb = get_method("gptq"), get_method("bnb-nf4")
    assert gptq.variant_name(gptq.default_scheme, "compressed-tensors") == "W4A16-G128-GPTQ"
    assert gptq.variant_name(gptq.default_scheme, "gptq") == "W4A16-G128-GPTQ-gptq"
    assert bnb.variant_name(bnb.default_scheme, "bitsandbytes") == "BNB-NF4"


def test_smoothing_checks_the_model_against_its_table():
    model = tiny_model("llama", vocab=1000, layers=1)
    assert len(architecture_groups(model)) == 4 and len(architecture_groups(model, smooth="norms")) == 2
    model.config.model_type = "gemma2"  # the table names pre_feedforward_layernorm, which a Llama layer lacks
    with pytest.raises(UnsupportedError) as e:
        architecture_groups(model)
    assert "pre_feedforward_layernorm" in e.value.message and "w8a8" in e.value.hint


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_fold_both_roundings_agree_in_float32(arch):
    """AWQ's rounding (Linears in their own dtype) and SmoothQuant's (float64, rounded once) give the same float32
    bits for RMSNorm models: one multiply or divide is correctly rounded either way."""
    model = tiny_model(arch, vocab=1000, layers=1)
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(0)
    for m in ARCHITECTURES[arch]:
        first = layer.get_submodule(m.balance[0])
        smooth = layer.get_submodule(m.smooth)
        if isinstance(smooth, torch.nn.Linear) and smooth.out_features != first.in_features:
            continue  # grouped KV heads: AWQ leaves this mapping out
        s = torch.rand(first.in_features, generator=g) * 3 + 0.2
        a, b = copy.deepcopy(layer), copy.deepcopy(layer)
        apply_scale(a, m, s)
        fold(b, m, s, dtype=torch.float64)
        for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb), (m, name)
