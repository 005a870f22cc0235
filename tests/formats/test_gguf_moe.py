"""Mixture-of-experts GGUF of tiny models of real architectures: stacked expert tensors read back with the `gguf`
package (names, 3-D shapes, types, metadata, every expert's dequantized blocks equal to hubquant's dequantized
weight), transformers' `gguf_file=` loader for the architectures it reads (Qwen2-MoE, Qwen3-MoE) with the logits
of hubquant's own dequantized model, per-expert importance from routed tokens, and llama.cpp's expert type rules."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from hubquant import moe  # noqa: E402
from hubquant.formats.gguf import mix  # noqa: E402
from hubquant.formats.gguf.arch import permute_rows, tensor_entries  # noqa: E402
from hubquant.formats.gguf.method import collect_imatrix, run  # noqa: E402
from hubquant.formats.gguf.writer import write  # noqa: E402
from hubquant.methods import QuantJob  # noqa: E402
from hubquant.schemes import QuantScheme, WeightScheme  # noqa: E402

GGUF_ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "mixtral": "llama", "olmoe": "olmoe",
             "deepseek_v3": "deepseek2", "glm4_moe": "glm4moe"}
# expert rows of 256 so the K-quants apply to experts too (a row of 64 falls back to Q5_0/Q8_0)
SIZE = {"qwen2_moe": dict(moe_intermediate_size=256, shared_expert_intermediate_size=256),
        "qwen3_moe": dict(moe_intermediate_size=256), "deepseek_v3": dict(moe_intermediate_size=256),
        "glm4_moe": dict(moe_intermediate_size=256), "mixtral": {}, "olmoe": {}}
CASES = [("qwen2_moe", "Q4_K_M"), ("qwen3_moe", "Q5_K_M"), ("mixtral", "Q4_K_M"), ("olmoe", "Q3_K_M"),
         ("deepseek_v3", "Q4_K_M"), ("glm4_moe", "Q6_K")]
TRANSFORMERS_READS = ("qwen2_moe", "qwen3_moe")  # transformers' GGUF_SUPPORTED_ARCHITECTURES with experts


def _job(calib=None):
    return QuantJob(scheme=QuantScheme(weights=WeightScheme(bits=4, group_size=-1)), calib=calib, progress=False)


def _model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from tests.helpers import tiny_config

    cfg = tiny_config(arch, hidden=256, intermediate=256)
    for k, v in SIZE[arch].items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _calib():
    return torch.randint(0, 49152, (4, 48), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch,preset", CASES)
def test_moe_architecture_writes_reads_and_loads(tmp_path, tokenizer, smollm2_path, arch, preset):
    model = _model(arch)
    base = copy.deepcopy(model)
    moe.unfuse_experts(base)  # per-expert views of the same float weights (same logits)
    quantized = run(model, _job(_calib()), mode="imatrix", preset=preset, log=lambda m: None)
    qc = write(model, quantized, out_dir=tmp_path, options={"gguf_type": preset, "tokenizer_dir": str(smollm2_path),
                                                            "name": arch})
    reader = gguf.GGUFReader(tmp_path / qc["files"][0])
    cfg, ga = model.config, GGUF_ARCH[arch]

    def field(key):
        return reader.fields[key].contents()

    n_exp = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or cfg.n_routed_experts
    assert field("general.architecture") == ga
    assert field(f"{ga}.expert_count") == n_exp and field(f"{ga}.expert_used_count") == cfg.num_experts_per_tok
    if getattr(cfg, "moe_intermediate_size", None):
        assert field(f"{ga}.expert_feed_forward_length") == cfg.moe_intermediate_size
    if arch == "qwen2_moe":
        assert field(f"{ga}.expert_shared_feed_forward_length") == cfg.shared_expert_intermediate_size
    if arch in ("deepseek_v3", "glm4_moe"):
        assert field(f"{ga}.leading_dense_block_count") == cfg.first_k_dense_replace == 1
        assert field(f"{ga}.expert_shared_count") == cfg.n_shared_experts
        assert field(f"{ga}.expert_gating_func") == int(gguf.ExpertGatingFuncType.SIGMOID)
        assert field(f"{ga}.expert_weights_norm") is True
    if arch == "deepseek_v3":
        assert field(f"{ga}.attention.kv_lora_rank") == cfg.kv_lora_rank
        assert field(f"{ga}.attention.key_length") == cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        assert field(f"{ga}.rope.dimension_count") == cfg.qk_rope_head_dim

    tensors = {t.name: t for t in reader.tensors}
    moe_layer = cfg.num_hidden_layers - 1  # the last layer is sparse in every case (DeepSeek/GLM: first is dense)
    for proj in ("gate", "up", "down"):
        t = tensors[f"blk.{moe_layer}.ffn_{proj}_exps.weight"]
        assert int(t.shape[-1]) == n_exp  # ggml order: [cols, rows, n_expert]
    router = tensors[f"blk.{moe_layer}.ffn_gate_inp.weight"]
    assert router.tensor_type == gguf.GGMLQuantizationType.F32 and int(router.shape[-1]) == n_exp
    if arch in ("qwen2_moe", "deepseek_v3", "glm4_moe"):
        assert f"blk.{moe_layer}.ffn_down_shexp.weight" in tensors
    if arch == "qwen2_moe":
        gate = tensors[f"blk.{moe_layer}.ffn_gate_inp_shexp.weight"]
        assert gate.tensor_type == gguf.GGMLQuantizationType.F32 and len(gate.shape) == 1
    if arch in ("deepseek_v3", "glm4_moe"):
        bias = tensors[f"blk.{moe_layer}.exp_probs_b.bias"]
        assert np.array_equal(bias.data, model.model.layers[moe_layer].mlp.gate.e_score_correction_bias.numpy())
        assert "blk.0.ffn_down.weight" in tensors and "blk.0.ffn_down_exps.weight" not in tensors

    # every tensor: quantized ones dequantize (gguf.quants) to hubquant's dequantized weights exactly, experts
    # stacked in expert order; each expert's error against the float base is bounded
    params, base_params = dict(model.named_parameters()), dict(base.named_parameters())
    entries = tensor_entries(model)
    assert {e.gguf for e in entries} == set(tensors)
    stacked = 0
    for e in entries:
        t = tensors[e.gguf]
        if not e.quantizable:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, e.gguf
            continue
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(e.shape)
        if e.experts:
            stacked += 1
            assert len({quantized[m].extra["gguf_type"] for m in e.experts}) == 1
            ours = np.stack([params[f"{m}.weight"].detach().numpy() for m in e.experts])
            ref = np.stack([base_params[f"{m}.weight"].detach().numpy() for m in e.experts])
            assert t.tensor_type.name == quantized[e.experts[0]].extra["gguf_type"]
        else:
            ours, ref = params[e.param].detach().numpy(), base_params[e.param].detach().numpy()
            if e.permute_heads:
                ours = permute_rows(ours, e.permute_heads)
                ref = permute_rows(ref, e.permute_heads)
        assert np.array_equal(deq, ours), e.gguf
        sqnr = 10 * np.log10((ref ** 2).sum() / ((ref - deq) ** 2).sum())
        assert sqnr > 9.0, (e.gguf, sqnr)
    assert stacked == 3 * sum(1 for _ in moe.expert_modules(model))

    if arch not in TRANSFORMERS_READS:
        return
    from transformers import AutoModelForCausalLM

    # transformers reads no expert feed-forward lengths from GGUF metadata: the config comes with the file
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=qc["files"][0], config=base.config,
                                                  dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logits, got = model(ids).logits, loaded(ids).logits
        base_logits = base(ids).logits
    torch.testing.assert_close(got, ref_logits, atol=1e-4, rtol=1e-4)
    agree = (got.argmax(-1) == base_logits.argmax(-1)).float().mean().item()
    assert agree > 0.5, agree  # the quantized variant still mostly picks the base model's next token


def test_expert_importance_comes_from_routed_tokens():
    """Each expert's importance is the activation energy of the tokens its router sends to it: experts differ,
    and the routed sums over all experts of a layer add up to k times the layer's input energy (top-k routing)."""
    model = _model("qwen3_moe")
    moe.unfuse_experts(model)
    calib = _calib()
    routed = collect_imatrix(copy.deepcopy(model), calib, progress=False)
    with moe.policy_in_force(moe.RoutingPolicy(calibrate_all_experts=True)):
        every = collect_imatrix(copy.deepcopy(model), calib, progress=False)
    layer = "model.layers.1.mlp.experts"
    gates = [routed[f"{layer}.{i}.gate_proj"] for i in range(8) if f"{layer}.{i}.gate_proj" in routed]
    assert len(gates) >= 2 and not torch.allclose(gates[0], gates[1])
    total = sum(gates)
    all_tokens = every[f"{layer}.0.gate_proj"]  # with calibrate_all, every expert saw every token
    assert torch.allclose(every[f"{layer}.5.gate_proj"], all_tokens)
    if len(gates) == 8:  # each token goes to k=2 experts: routed energies sum to twice the layer's input energy
        torch.testing.assert_close(total, 2 * all_tokens, rtol=1e-4, atol=1e-3)


def test_low_token_experts_are_quantized_without_importance():
    model = _model("mixtral")
    with moe.policy_in_force(moe.RoutingPolicy(min_expert_tokens=10 ** 9)) as outer:
        q = run(model, _job(_calib()), mode="imatrix", preset="Q4_K_M", log=lambda m: None)
    experts = moe.expert_linear_names(model)
    assert experts and all(not q[n].extra["imatrix"] for n in experts)
    assert all(q[n].extra["imatrix"] for n in q if n not in experts and "layers" in n)
    assert len(outer.fallback_linears) == len(experts) and outer.counts  # the pipeline's policy gets the record
    model = _model("mixtral")
    q = run(model, _job(_calib()), mode="gptq", preset="Q4_K_M", log=lambda m: None)
    assert sum(q[n].extra["imatrix"] for n in experts) > 0  # GPTQ'd experts: the routed tokens' Hessian


def test_expert_type_rules_follow_llama_cpp():
    names = []
    for i in range(8):
        names += [(f"blk.{i}.attn_k.weight", 256), (f"blk.{i}.attn_v.weight", 256),
                  (f"blk.{i}.attn_output.weight", 256), (f"blk.{i}.ffn_down_exps.weight", 256),
                  (f"blk.{i}.ffn_down_shexp.weight", 256), (f"blk.{i}.ffn_gate_exps.weight", 256)]
    eight = mix.plan(names, "Q4_K_M", mix.ModelShape(n_layer=8, n_gqa=4, tied_embeddings=False, n_expert=8))
    assert eight["blk.3.attn_v.weight"] == eight["blk.3.attn_k.weight"] == "Q8_0"
    assert eight["blk.3.attn_output.weight"] == "Q5_K"
    # ffn_down of every kind follows the layer in its name: more bits in the first/last eighth and every third
    assert [eight[f"blk.{i}.ffn_down_exps.weight"] for i in range(8)] == \
           ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert all(eight[f"blk.{i}.ffn_down_shexp.weight"] == eight[f"blk.{i}.ffn_down_exps.weight"] for i in range(8))
    assert eight["blk.3.ffn_gate_exps.weight"] == "Q4_K"
    sixty_four = mix.plan(names, "Q2_K", mix.ModelShape(n_layer=8, n_gqa=1, tied_embeddings=False, n_expert=64))
    assert sixty_four["blk.0.attn_v.weight"] == "Q3_K" and sixty_four["blk.0.attn_output.weight"] == "Q3_K"
    # DeepSeek's attention: kv_b is an attn_v tensor, kv_a_mqa is not attn_k
    mla = mix.plan([("blk.0.attn_kv_b.weight", 512), ("blk.0.attn_kv_a_mqa.weight", 256)], "Q4_K_M",
                   mix.ModelShape(n_layer=1, n_gqa=1, tied_embeddings=False, n_expert=8))
    assert mla == {"blk.0.attn_kv_b.weight": "Q8_0", "blk.0.attn_kv_a_mqa.weight": "Q4_K"}


def test_convert_moe_gguf_end_to_end(hub_env, local_hub, tokenizer, tmp_path):
    """`hubquant convert --method imatrix --format gguf` of a Qwen3-MoE: stacked experts in the file, the
    routing statistics in the card, and transformers' GGUF loader computes what the pipeline evaluated."""
    from transformers import AutoModelForCausalLM

    from hubquant.convert import ConvertOptions, convert

    folder = tmp_path / "src"
    _model("qwen3_moe").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    local_hub.hub.publish_folder("alice/tiny-qwen3-moe", folder)
    out = tmp_path / "variant"
    logs = []
    res = convert(ConvertOptions(repo_id="alice/tiny-qwen3-moe", method="imatrix", format="gguf", gguf_type="Q4_K_M",
                                 output_dir=str(out), num_samples=4, seq_len=64, eval_windows=2, eval_seq_len=64,
                                 progress=False), log=logs.append)
    name = "tiny-qwen3-moe-Q4_K_M.gguf"
    reader = gguf.GGUFReader(out / name)
    exps = {t.name: t for t in reader.tensors if "_exps" in t.name}
    assert len(exps) == 3 * 2 and all(int(t.shape[-1]) == 8 for t in exps.values())
    assert not any("round-to-nearest" in m and "expert Linears got no statistics" in m for m in logs)
    assert 0 <= res.metrics["mean_kl"] < 0.05 and abs(res.metrics["ppl_increase_pct"]) < 5
    card = (out / "README.md").read_text()
    import re

    plain = re.search(r"(\d+) of 48 expert projections saw too few routed tokens", card)
    rule = re.search(r"\((\d+) projections by that rule\)", card)  # the routing statistics' own count
    assert plain and rule and plain.group(1) == rule.group(1)
    assert res.metrics["size_bytes"] == (out / name).stat().st_size  # the card's size on disk is the GGUF's
    assert "Experts: stacked per layer" in card and "one type per stack: Q4_K x5, Q6_K x1" in card
    assert "Calibration tokens routed to each expert" in card and "| base (float) |" in card
    # the MoE section speaks GGUF: stacked experts, plain weighting (not RTN) under the threshold, quantized token_embd
    assert "round-to-nearest" not in card and "stored per expert" not in card and "plain weighting" in card
    assert "token embeddings are quantized" in card and "Float: embeddings and norms" not in card
    assert "**GGUF Q4_K_M " in card and "W4A16" not in card
    cfg = AutoModelForCausalLM.from_pretrained(folder).config
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, config=cfg, dtype=torch.float32).eval()
    src = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        agree = (loaded(ids).logits.argmax(-1) == src(ids).logits.argmax(-1)).float().mean().item()
    assert agree > 0.5


def test_fused_qkv_follows_the_attn_v_rules():
    """llama.cpp's categories put a fused attn_qkv (Phi-3) with attn_v: more bits where use_more_bits says."""
    qkv = mix.plan([(f"blk.{i}.attn_qkv.weight", 256) for i in range(8)], "Q4_K_M",
                   mix.ModelShape(n_layer=8, n_gqa=1, tied_embeddings=False))
    assert [qkv[f"blk.{i}.attn_qkv.weight"] for i in range(8)] == \
           ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
