"""The format registry: scheme checks, the streaming writer API (per-Linear tensors, shards), the CLI's choices."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubquant.cli import build_parser
from hubquant.errors import UsageError
from hubquant.formats import FORMATS, by_quant_method, get_format, resolve_format
from hubquant.formats.common import ShardWriter, dense_tensors, ignored_linears, save_tensors
from hubquant.methods import METHODS, QuantJob, get_method
from hubquant.quant import QuantScheme, WeightScheme
from tests.helpers import tiny_model

W4 = QuantScheme(weights=WeightScheme(bits=4, group_size=32))
W4_ASYM = QuantScheme(weights=WeightScheme(bits=4, group_size=32, symmetric=False))


def test_scheme_checks_name_the_fix():
    with pytest.raises(UsageError) as e:
        get_format("gptq").check_scheme(W4_ASYM)
    assert "--asym" in e.value.hint
    with pytest.raises(UsageError) as e:
        get_format("awq").check_scheme(W4)
    assert "--asym" in e.value.hint
    with pytest.raises(UsageError):
        get_format("gptq").check_scheme(get_method("fp8").default_scheme)
    for scheme in (W4, W4_ASYM, get_method("fp8").default_scheme, get_method("smoothquant").default_scheme):
        get_format("compressed-tensors").check_scheme(scheme)
    get_format("awq").check_scheme(W4_ASYM)
    get_format("gptq").check_scheme(W4)


def test_resolve_format_per_method():
    assert resolve_format(get_method("awq"), None, get_method("awq").default_scheme).name == "compressed-tensors"
    assert resolve_format(get_method("bnb-nf4"), None, get_method("bnb-nf4").default_scheme).name == "bitsandbytes"
    assert resolve_format(get_method("rtn"), "awq", W4_ASYM).name == "awq"
    with pytest.raises(UsageError) as e:
        resolve_format(get_method("rtn"), "bitsandbytes", W4)
    assert e.value.hint == "choose one of: compressed-tensors, gptq, awq, gguf, mxfp4"
    with pytest.raises(UsageError, match="unknown format"):
        get_format("gguf-ish")
    for m in METHODS.values():
        assert all(f in FORMATS for f in m.formats), m.name


def test_registry_drives_the_cli_choices():
    parser = build_parser()
    convert = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "convert")[1]
    choices = {a.dest: a.choices for a in convert._actions if a.choices}
    assert list(choices["method"]) == list(METHODS) and list(choices["format"]) == list(FORMATS)
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "a/b", "--format", "gguf-ish"])


def test_loader_reads_the_formats_with_a_reader():
    from hubquant.runtime import loader

    assert set(loader.SUPPORTED) == {"compressed-tensors", "gptq", "awq"}
    assert loader.detect_format({"quant_method": "gptq"}) == "gptq" and loader.detect_format(None) == "none"
    assert by_quant_method("bitsandbytes").reader is None and by_quant_method("nope") is None
    for f in FORMATS.values():
        if f.reader:
            assert callable(f.load_reader())
    with pytest.raises(UsageError, match="bitsandbytes"):
        get_format("bitsandbytes").load_reader()


@pytest.mark.parametrize(("method", "fmt", "scheme"), [
    ("rtn", "compressed-tensors", W4), ("rtn", "gptq", W4), ("rtn", "awq", W4_ASYM),
    ("bnb-int8", "bitsandbytes", None),
])
def test_per_linear_tensors_rebuild_the_whole_model_write(tmp_path, method, fmt, scheme):
    """What a layer-at-a-time writer gets from the registry (linear_tensors + quantization_config + ShardWriter)
    is byte for byte what the whole-model writer writes."""
    if method.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    spec, fspec = get_method(method), get_format(fmt)
    scheme = scheme or spec.default_scheme
    model = tiny_model("llama", vocab=1000)
    options = spec.parse_options({})
    quantized = spec.load()(model, QuantJob(scheme=scheme, options=options, progress=False))
    qc = fspec(model, quantized, scheme=scheme, out_dir=tmp_path / "whole", method=method, options=options)
    assert qc == fspec.quantization_config(scheme, options=options, ignored=ignored_linears(model, quantized))
    assert qc["quant_method"] == fspec.quant_method
    # streaming: the float tensors first, then one decoder layer's Linears per add(), tiny shards
    writer = ShardWriter(tmp_path / "stream", max_shard_bytes=200_000)
    writer.add(dense_tensors(model, quantized))
    for i in range(2):
        writer.add({k: v for n, qw in quantized.items() if f".layers.{i}." in n
                    for k, v in fspec.linear_tensors(n, qw, scheme, options=options).items()})
    names = writer.close()
    assert len(names) > 1 and (tmp_path / "stream" / "model.safetensors.index.json").is_file()
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    streamed = {}
    for n in names:
        streamed.update(load_file(tmp_path / "stream" / n))
    assert streamed.keys() == whole.keys()
    assert all(torch.equal(streamed[k].view(torch.uint8), whole[k].view(torch.uint8)) for k in whole)
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(whole) and index["metadata"]["total_size"] == writer.total_bytes


def test_shard_writer_matches_save_file_for_one_shard(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(64, 32, generator=g) for i in range(5)}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert save_tensors(dict(reversed(list(tensors.items()))), tmp_path / "out") == ["model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert not list((tmp_path / "out").glob(".shard-*"))
