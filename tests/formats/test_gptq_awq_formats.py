"""gptq and awq checkpoints unpack, with unpackers written here from shared/FORMATS.md (not hubquant's packers),
to exactly the dequantized weights of the QuantizedWeight; file layout, names, dtypes and configs."""
import json

import pytest
import torch
from safetensors.torch import load_file

from hubquant.errors import UnsupportedError
from hubquant.formats import awq as awq_fmt
from hubquant.formats import gptq as gptq_fmt
from hubquant.quant import QuantScheme, WeightScheme, rtn_quantize
from tests.helpers import tiny_model

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _u32(t):
    return [[int(v) & 0xFFFFFFFF for v in row] for row in t.tolist()]


def unpack_along_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """[n*bits/32, cols] words -> [n, cols] values: per column, the words (row 0 first) form a little-endian
    bitstream and value i sits at bit bits*i (for 2/4/8 bits: row r holds values r*(32/b)+j at bit b*j)."""
    words = _u32(packed)
    cols = len(words[0])
    out = torch.empty(n, cols, dtype=torch.int64)
    for c in range(cols):
        stream = 0
        for r, row in enumerate(words):
            stream |= row[c] << (32 * r)
        for i in range(n):
            out[i, c] = (stream >> (bits * i)) & ((1 << bits) - 1)
    return out


def unpack_gptq(t: dict, name: str, bits: int, in_f: int, out_f: int, v1: bool) -> torch.Tensor:
    q = unpack_along_rows(t[f"{name}.qweight"], bits, in_f)                  # [in, out]
    ng = t[f"{name}.scales"].shape[0]
    z = unpack_along_rows(t[f"{name}.qzeros"].T.contiguous(), bits, out_f).T  # [ng, out]
    if v1:
        z = z + 1
    g = t[f"{name}.g_idx"].long()
    assert g.shape == (in_f,) and int(g.max()) == ng - 1
    w = t[f"{name}.scales"].float()[g] * (q - z[g]).float()                  # [in, out]
    return w.T


def unpack_awq(t: dict, name: str) -> torch.Tensor:
    def unpack(words):
        rows, wc = words.shape
        out = torch.empty(rows, wc * 8, dtype=torch.int64)
        u = _u32(words)
        for r in range(rows):
            for c in range(wc):
                for i in range(8):
                    out[r, 8 * c + AWQ_ORDER[i]] = (u[r][c] >> (4 * i)) & 0xF
        return out
    q, z, s = unpack(t[f"{name}.qweight"]), unpack(t[f"{name}.qzeros"]), t[f"{name}.scales"].float()
    gs = q.shape[0] // s.shape[0]
    g = torch.arange(q.shape[0]) // gs
    return ((q - z[g]).float() * s[g]).T


def _qw(bits, group, sym, out_f=64, in_f=96, seed=0):
    w = (torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.02).bfloat16()
    return rtn_quantize(w, WeightScheme(bits=bits, group_size=group, symmetric=sym))


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (8, -1, True), (2, 32, True), (3, 32, True),
                                            (4, 32, False)])
def test_gptq_tensors_unpack_exactly(bits, group, sym):
    qw = _qw(bits, group, sym)
    version = "gptq" if sym else "gptq_v2"
    t = {f"l.{k}": v for k, v in gptq_fmt.pack_linear(qw, version=version).items()}
    assert t["l.qweight"].dtype == torch.int32 and t["l.qweight"].shape == (96 * bits // 32, 64)
    ng = 1 if group == -1 else 96 // group
    assert t["l.qzeros"].shape == (ng, 64 * bits // 32) and t["l.scales"].shape == (ng, 64)
    assert t["l.scales"].dtype == torch.float16 and t["l.g_idx"].dtype == torch.int32
    got = unpack_gptq(t, "l", bits, 96, 64, v1=(version == "gptq"))
    assert torch.equal(got, qw.dequantize())


def test_gptq_v1_symmetric_4bit_zero_words():
    t = gptq_fmt.pack_linear(_qw(4, 32, True))
    assert torch.all(t["qzeros"] == 0x77777777)  # z = 8 stored as z - 1 = 7 in every nibble


@pytest.mark.parametrize("sym", [False, True])
def test_awq_tensors_unpack_exactly(sym):
    qw = _qw(4, 32, sym)
    t = {f"l.{k}": v for k, v in awq_fmt.pack_linear(qw).items()}
    assert t["l.qweight"].shape == (96, 8) and t["l.qzeros"].shape == (3, 8) and t["l.scales"].shape == (3, 64)
    assert t["l.qweight"].dtype == torch.int32 and t["l.scales"].dtype == torch.float16
    assert torch.equal(unpack_awq(t, "l"), qw.dequantize())


def test_awq_interleave_bytes():
    qw = _qw(4, 32, False, out_f=8, in_f=32)
    qw.qweight = (torch.arange(8, dtype=torch.int8) - 8).unsqueeze(1).repeat(1, 32)  # output c: code c-8 (unsigned c)
    word = int(awq_fmt.pack_linear(qw)["qweight"][0, 0]) & 0xFFFFFFFF
    assert word == 0x75316420  # nibbles (low first): columns 0, 2, 4, 6, 1, 3, 5, 7


def _quantized_tiny(sym, bits=4):
    model = tiny_model("llama", vocab=1000).to(torch.bfloat16)
    scheme = QuantScheme(weights=WeightScheme(bits=bits, group_size=32, symmetric=sym))
    from hubquant.modeling import quantizable_linears

    quantized = {}
    for name, lin in quantizable_linears(model).items():
        qw = rtn_quantize(lin.weight.data, scheme.weights)
        lin.weight.data = qw.dequantize(torch.bfloat16)
        quantized[name] = qw
    return model, quantized, scheme


def test_gptq_write_checkpoint(tmp_path):
    model, quantized, scheme = _quantized_tiny(True)
    cfg = gptq_fmt.write(model, quantized, scheme=scheme, out_dir=tmp_path, method="gptq", options={"actorder": True})
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq" and cfg["sym"] is True
    assert cfg["desc_act"] is False and cfg["bits"] == 4 and cfg["group_size"] == 32
    disk = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert disk == cfg
    side = json.loads((tmp_path / "quantize_config.json").read_text())
    assert side["bits"] == 4 and side["group_size"] == 32 and side["checkpoint_format"] == "gptq"
    t = load_file(tmp_path / "model.safetensors")
    for name, qw in quantized.items():
        assert f"{name}.weight" not in t
        assert torch.equal(unpack_gptq(t, name, 4, qw.shape[1], qw.shape[0], v1=True), qw.dequantize())
    assert torch.equal(t["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert torch.equal(t["lm_head.weight"], model.lm_head.weight)
    assert t["model.norm.weight"].dtype == torch.bfloat16


def test_awq_write_checkpoint(tmp_path):
    model, quantized, scheme = _quantized_tiny(False)
    cfg = awq_fmt.write(model, quantized, scheme=scheme, out_dir=tmp_path, method="awq", options={})
    assert cfg == {"quant_method": "awq", "zero_point": True, "group_size": 32, "bits": 4, "version": "gemm",
                   "modules_to_not_convert": None}
    t = load_file(tmp_path / "model.safetensors")
    for name, qw in quantized.items():
        assert torch.equal(unpack_awq(t, name), qw.dequantize())
        assert f"{name}.g_idx" not in t


def test_formats_refuse_what_they_cannot_hold(tmp_path):
    model, quantized, scheme = _quantized_tiny(False, bits=8)
    with pytest.raises(UnsupportedError, match="awq"):
        awq_fmt.write(model, quantized, scheme=scheme, out_dir=tmp_path, method="awq", options={})
    fp8 = QuantScheme(weights=WeightScheme(bits=8, group_size=-1, type="float"))
    with pytest.raises(UnsupportedError):
        gptq_fmt.write(model, {}, scheme=fp8, out_dir=tmp_path, method="fp8", options={})
