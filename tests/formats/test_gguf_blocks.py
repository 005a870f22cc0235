"""GGUF block numerics: our bytes read back by the `gguf` package's dequantizers (the oracle) equal our own
dequantization bit for bit; each type's SQNR; the importance matrix and GPTQ lower the error they target;
llama.cpp's per-tensor type mixes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from hubquant.formats.gguf import mix  # noqa: E402
from hubquant.formats.gguf.blocks import TYPES, quantize  # noqa: E402
from hubquant.formats.gguf.packing import pack, row_bytes  # noqa: E402

# SQNR floor (dB) on Gaussian weights with an outlier; measured values sit ~1 dB above
SQNR_MIN = {"Q8_0": 42.0, "Q6_K": 33.0, "Q5_1": 27.0, "Q5_K": 27.0, "Q5_0": 25.5, "Q4_K": 21.5, "Q4_1": 20.5,
            "Q4_0": 20.0, "Q3_K": 15.0, "Q2_K": 9.5}


def _weights(rows=64, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3, 5] = 0.5  # an outlier
    w[7] = 0.0  # a row of zeros (zero scales)
    imp = torch.rand(cols, generator=g) * 10
    return w, imp


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()))


@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_bytes_dequantize_to_our_values(qtype, with_imatrix):
    w, imp = _weights()
    grid = quantize(w, qtype, imp if with_imatrix else None)
    data = pack(grid)
    assert data.dtype == np.uint8 and data.shape == (64, row_bytes(qtype, 512))
    oracle = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, qtype))
    ours = grid.dequantize().numpy()
    assert np.array_equal(oracle, ours)
    assert _sqnr(w.numpy(), ours) > SQNR_MIN[qtype]
    assert np.all(ours[7] == 0)


@pytest.mark.parametrize("qtype", [t for t in TYPES if t != "Q8_0"])
def test_importance_lowers_weighted_error(qtype):
    w, imp = _weights(rows=128, seed=1)
    err = {}
    for name, i in (("plain", None), ("imatrix", imp)):
        d = quantize(w, qtype, i).dequantize() - w
        err[name] = float((d * d * imp).sum())
    assert err["imatrix"] < err["plain"] * 0.99, err


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q6_K", "Q3_K"])
def test_gptq_lowers_output_error(qtype):
    from hubquant.formats.gguf.gptq import gptq_grid
    from hubquant.methods.gptq import prepare_hessian
    from hubquant.schemes import WeightScheme

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2048, 256, generator=g) @ (torch.randn(256, 256, generator=g) * 0.1 + torch.eye(256))
    x[:, :8] *= 10
    w = torch.randn(64, 256, generator=g) * 0.02
    xtx = x.T @ x
    prep = prepare_hessian(2 * xtx / x.shape[0], WeightScheme(bits=4, group_size=-1), damp=0.01, actorder=True)

    def out_err(grid):
        return float(((x @ (grid.dequantize() - w).T) ** 2).sum())

    rtn = out_err(quantize(w, qtype, torch.diagonal(xtx)))
    grid = gptq_grid(w, prep, qtype, torch.diagonal(xtx))
    assert out_err(grid) < 0.6 * rtn
    oracle = gguf.quants.dequantize(pack(grid), getattr(gguf.GGMLQuantizationType, qtype))
    assert np.array_equal(oracle, grid.dequantize().numpy())  # codes stay on the stored grid


def _names(n_layer: int):
    out = [("token_embd.weight", 4096)]
    for i in range(n_layer):
        out += [(f"blk.{i}.attn_q.weight", 4096), (f"blk.{i}.attn_k.weight", 4096), (f"blk.{i}.attn_v.weight", 4096),
                (f"blk.{i}.attn_output.weight", 4096), (f"blk.{i}.ffn_gate.weight", 4096),
                (f"blk.{i}.ffn_up.weight", 4096), (f"blk.{i}.ffn_down.weight", 14336)]
    return out + [("output.weight", 4096)]


def test_q4_k_m_mix_matches_llama_cpp():
    shape = mix.ModelShape(n_layer=32, n_gqa=4, tied_embeddings=False)
    t = mix.plan(_names(32), "Q4_K_M", shape)
    more = [i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2]  # use_more_bits
    assert [i for i in range(32) if t[f"blk.{i}.attn_v.weight"] == "Q6_K"] == more
    assert [i for i in range(32) if t[f"blk.{i}.ffn_down.weight"] == "Q6_K"] == more
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"
    assert {t[f"blk.{i}.attn_q.weight"] for i in range(32)} == {"Q4_K"}
    q3 = mix.plan(_names(32), "Q3_K_M", shape)
    assert [q3[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert q3["blk.0.ffn_down.weight"] == "Q5_K" and q3["blk.5.ffn_down.weight"] == "Q4_K"
    assert q3["blk.5.attn_output.weight"] == "Q4_K" and q3["blk.5.attn_q.weight"] == "Q3_K"
    q2 = mix.plan(_names(32), "Q2_K", shape)
    assert q2["blk.5.attn_v.weight"] == "Q4_K" and q2["blk.5.ffn_down.weight"] == "Q3_K"
    assert mix.plan(_names(32), "Q8_0", shape)["output.weight"] == "Q8_0"


def test_row_length_fallbacks_and_tied_output():
    shape = mix.ModelShape(n_layer=30, n_gqa=3, tied_embeddings=True)
    names = [("token_embd.weight", 576), ("blk.0.attn_q.weight", 576), ("blk.0.ffn_down.weight", 1536),
             ("blk.0.attn_v.weight", 576)]
    assert mix.plan(names, "Q4_K_M", shape) == {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q5_0",
                                                "blk.0.ffn_down.weight": "Q6_K", "blk.0.attn_v.weight": "Q8_0"}
    assert mix.plan(names, "Q5_K_M", shape)["blk.0.attn_q.weight"] == "Q5_1"
    assert mix.plan(names, "Q2_K", shape)["blk.0.attn_q.weight"] == "Q4_0"
    assert mix.plan([("blk.0.attn_q.weight", 100)], "Q4_0", shape)["blk.0.attn_q.weight"] == "F16"
    with pytest.raises(Exception, match="--gguf-type"):
        mix.check_preset("Q9_9")
