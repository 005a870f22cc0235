"""The static-cache decoder gives the same greedy tokens as transformers' generate (CPU, float32)."""
from __future__ import annotations

import pytest
import torch

from hubquant.errors import UnsupportedError
from hubquant.runtime import load, synth
from hubquant.runtime.decode import GraphDecoder, supports
from tests.helpers import tiny_model


@pytest.mark.parametrize("arch,kind", [("llama", "ct-w4a16"), ("qwen2", "gptq"), ("mistral", "ct-w8a8")])
def test_greedy_tokens_match_transformers(tmp_path, arch, kind):
    base = tiny_model(arch, vocab=512)
    synth.write_model_variant(base, tmp_path, kind, group_size=32)
    model, _ = load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    assert supports(model)
    ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(3))
    want = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 7:].tolist()
    dec = GraphDecoder(model, max_len=32)
    got = dec.generate(ids, 12)
    assert got.tokens == want
    assert got.new_tokens == 11 and got.tokens_per_second > 0
    # the decoder's logits equal the transformers forward of the same model
    with torch.no_grad():
        ref = model(ids).logits[0, -1]
        mine = dec._forward(ids, torch.arange(7))[0]
    assert float((mine - ref).norm() / ref.norm()) < 1e-5


def test_unsupported_architecture_and_cache_size(tmp_path):
    base = tiny_model("phi3", vocab=512)
    with pytest.raises(UnsupportedError, match="phi3"):
        GraphDecoder(base)
    dec = GraphDecoder(tiny_model("llama", vocab=512), max_len=8)
    with pytest.raises(UnsupportedError, match="exceed"):
        dec.generate(torch.zeros(1, 6, dtype=torch.long), 4)


@pytest.mark.parametrize("arch,kind", [("llama", "ct-w4a16"), ("qwen2", "gptq"), ("mistral", "ct-w8a8"),
                                       ("llama", "float")])
def test_fused_decoder_matches_unfused(tmp_path, arch, kind):
    """fuse=True (q/k/v and gate/up concatenated, add+RMSNorm, SiLU*up, rotary+cache fused) decodes the same."""
    from hubquant.runtime.decode import _Cat

    base = tiny_model(arch, vocab=512)
    if kind == "float":
        model = base
    else:
        synth.write_model_variant(base, tmp_path, kind, group_size=32)
        model, _ = load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(4))
    plain = GraphDecoder(model, max_len=32, fuse=False)
    fused = GraphDecoder(model, max_len=32)  # fused is the default
    assert not any(isinstance(f.qkv, _Cat) or isinstance(f.gate_up, _Cat) for f in fused.fused)
    a0, f0 = model.model.layers[0].self_attn, fused.fused[0]
    if kind in ("float", "ct-w8a8"):  # row views of the fused weights, no second copy
        w_name = "weight" if kind == "float" else "qweight"
        fw = getattr(f0.qkv, w_name)
        assert getattr(a0.k_proj, w_name).data_ptr() == fw[a0.q_proj.out_features:].data_ptr()
    else:  # W4A16 [K/8, N]: column views
        q_out = a0.q_proj.out_features
        assert a0.k_proj.qweight.data_ptr() == f0.qkv.qweight[:, q_out:].data_ptr()
        assert a0.k_proj.scales.data_ptr() == f0.qkv.scales[:, q_out:].data_ptr()
    assert fused.generate(ids, 10).tokens == plain.generate(ids, 10).tokens
    with torch.no_grad():
        a = plain.forward(ids, torch.arange(7))
        b = fused.forward(ids, torch.arange(7))
    assert float((a - b).norm() / a.norm()) < 1e-5
    # the caches hold the same keys and values
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(plain.k + plain.v, fused.k + fused.v))


def test_fuse_linears_outputs_side_by_side(tmp_path):
    from hubquant.runtime.fuse import fuse_linears

    base = tiny_model("llama", vocab=512)
    synth.write_model_variant(base, tmp_path, "ct-w4a16", group_size=32)
    model, _ = load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    a = model.model.layers[0].self_attn
    x = torch.randn(3, a.q_proj.in_features, generator=torch.Generator().manual_seed(0))
    f = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
    assert f.out_features == a.q_proj.out_features + 2 * a.k_proj.out_features
    with torch.no_grad():
        assert torch.equal(f(x), torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1))
    assert fuse_linears([a.q_proj, torch.nn.Linear(a.q_proj.in_features, 8)]) is None  # mixed kinds


@pytest.mark.parametrize("fuse", [True, False])
def test_batched_decoder_matches_one_sequence_at_a_time(tmp_path, fuse):
    """batch=3: every sequence decodes the tokens its own batch-1 decoder gives (float32, CPU)."""
    base = tiny_model("llama", vocab=512)
    synth.write_model_variant(base, tmp_path, "ct-w4a16", group_size=32)
    model, _ = load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    ids = torch.randint(0, 512, (3, 6), generator=torch.Generator().manual_seed(5))
    got = GraphDecoder(model, max_len=24, fuse=fuse, batch=3).generate(ids, 8)
    assert got.batch == 3 and len(got.all_tokens) == 3 and got.tokens == got.all_tokens[0]
    for row, toks in zip(ids, got.all_tokens):
        assert toks == GraphDecoder(model, max_len=24, fuse=fuse).generate(row[None], 8).tokens
    with pytest.raises(UnsupportedError, match="batch 3"):
        GraphDecoder(model, max_len=24, batch=3).generate(ids[:2], 4)
