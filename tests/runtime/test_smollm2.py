"""The real SmolLM2-135M-Instruct (bf16 weights carrying Q4_1 rounding from its GGUF source) through
hubquant's RTN/FP8 methods, its compressed-tensors writer and hubquant.load on CPU: the loaded checkpoint
scores the perplexity (held-out news text) of the method's in-memory variant."""
from __future__ import annotations

import pytest
import torch

from hubquant.runtime import load
from hubquant.runtime.modules import W4A16Linear, W8A8Linear

# kind -> max relative perplexity difference between the loaded checkpoint and the method's in-memory variant.
# Weight-only: the same weights, so the same numbers. FP8: the loader quantizes activations with its own kernel
# (reference) path, the method with its fake-quant hooks; measured 0.9% apart on these windows.
GATES = {"w4a16-g64": 1e-4, "fp8": 0.02}


@pytest.fixture(scope="module")
def setup(smollm2_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from hubquant.evaluate import build_eval_set, reference
    from hubquant.textdata import load_texts

    ev = build_eval_set(tokenizer, load_texts("lee-news").texts, spec="lee-news", description="lee-news",
                        n_windows=2, seq_len=256)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    return base, ev, reference(base, ev, n_prompts=2, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(GATES))
def test_smollm2_variants_through_loader(tmp_path, smollm2_path, setup, kind):
    import copy

    from hubquant.evaluate import compare
    from hubquant.formats import compressed_tensors as ct
    from hubquant.methods import QuantJob, get_method
    from hubquant.quant import ActivationScheme, QuantScheme, WeightScheme

    base, ev, ref = setup
    schemes = {
        "w4a16-g64": ("rtn", QuantScheme(weights=WeightScheme(bits=4, group_size=64, symmetric=True))),
        "fp8": ("fp8", QuantScheme(weights=WeightScheme(bits=8, group_size=-1, type="float"),
                                   activations=ActivationScheme(type="float"))),
    }
    method, scheme = schemes[kind]
    model = copy.deepcopy(base)
    quantized = get_method(method).load()(model, QuantJob(scheme=scheme, progress=False))
    ct.write(model, quantized, scheme=scheme, out_dir=tmp_path, method=method)
    in_memory = compare(model, ev, ref, progress=False)  # the method's own fake-quantized model
    del model
    loaded, _ = load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    n_q = sum(isinstance(m, (W4A16Linear, W8A8Linear)) for m in loaded.modules())
    assert n_q == 30 * 7  # every Linear of the 30 decoder layers; embeddings / tied lm_head stay float
    res = compare(loaded, ev, ref, progress=False)
    print(f"{kind}: ppl {ref.perplexity:.3f} -> loaded {res.perplexity:.3f} (+{res.ppl_increase_pct:.1f}%), "
          f"in-memory variant {in_memory.perplexity:.3f}; top-1 agreement {res.top1_agreement:.3f}")
    assert abs(res.perplexity / in_memory.perplexity - 1) < GATES[kind]
    assert res.top1_agreement > 0.6 and res.perplexity < 1.5 * ref.perplexity
