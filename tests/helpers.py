"""Test helpers: tiny random models of real architectures and Hub-style folders of them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

# architecture -> (config class name, extra config kwargs)
TINY_ARCHS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "gemma": ("GemmaConfig", {"head_dim": 32}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "gemma2": ("Gemma2Config", {"head_dim": 32, "sliding_window": 16}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 32, "sliding_window": 16}),
    # mixtures of experts: 4-8 experts of intermediate size 64, top-2 routing
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "head_dim": 32}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "shared_expert_intermediate_size": 128}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    # multi-head latent attention (q_a/q_b/kv_a/kv_b), a dense first layer, a shared expert
    "deepseek_v3": ("DeepseekV3Config", {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                         "n_shared_experts": 1, "first_k_dense_replace": 1, "q_lora_rank": 64,
                                         "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
                                         "v_head_dim": 32, "n_group": 2, "topk_group": 1}),
    "olmoe": ("OlmoeConfig", {"num_experts": 8, "num_experts_per_tok": 2}),
    "glm4_moe": ("Glm4MoeConfig", {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                   "n_shared_experts": 1, "first_k_dense_replace": 1, "head_dim": 32, "n_group": 1,
                                   "topk_group": 1}),
    # biased, interleaved, clamped-SwiGLU experts, attention sinks, sliding and full layers
    "gpt_oss": ("GptOssConfig", {"num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 32,
                                 "sliding_window": 16, "rope_parameters": {"rope_type": "default",
                                                                           "rope_theta": 150000.0}}),
    # current releases whose experts hubquant.moe_arch finds from transformers' conversion mapping
    "qwen3_next": ("Qwen3NextConfig", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                       "shared_expert_intermediate_size": 64, "head_dim": 32,
                                       "linear_key_head_dim": 32, "linear_value_head_dim": 32,
                                       "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                                       "layer_types": ["linear_attention", "full_attention"]}),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                             "shared_expert_intermediate_size": 64, "head_dim": 32,
                                             "linear_key_head_dim": 32, "linear_value_head_dim": 32,
                                             "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                                             "layer_types": ["linear_attention", "full_attention"]}),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", {"moe_num_experts": 8, "moe_k": 2, "moe_intermediate_size": 64,
                                            "moe_num_shared_experts": 1, "moe_layer_start_index": 1}),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", {"num_experts": 8, "moe_topk": 2, "head_dim": 32}),
    "minimax_m2": ("MiniMaxM2Config", {"num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 32}),
    "exaone_moe": ("ExaoneMoeConfig", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                       "num_shared_experts": 1, "first_k_dense_replace": 1, "head_dim": 32,
                                       "sliding_window": 16}),
    "dots1": ("Dots1Config", {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                              "n_shared_experts": 1, "first_k_dense_replace": 1, "head_dim": 32}),
    "deepseek_v32": ("DeepseekV32Config", {"n_routed_experts": 8, "num_experts_per_tok": 2,
                                           "moe_intermediate_size": 64, "n_shared_experts": 1,
                                           "first_k_dense_replace": 1, "q_lora_rank": 64, "kv_lora_rank": 32,
                                           "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 32,
                                           "head_dim": 16, "n_group": 2, "topk_group": 1, "index_n_heads": 2,
                                           "index_head_dim": 32, "index_topk": 8, "num_key_value_heads": 4}),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", {"n_routed_experts": 8, "num_experts_per_tok": 2,
                                            "moe_intermediate_size": 64, "n_shared_experts": 1,
                                            "first_k_dense_replace": 1, "q_lora_rank": 64, "kv_lora_rank": 32,
                                            "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 32}),
    "flex_olmo": ("FlexOlmoConfig", {"num_experts": 8, "num_experts_per_tok": 2, "pad_token_id": 0,
                                     "eos_token_id": 1, "bos_token_id": None}),
    "phimoe": ("PhimoeConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}
MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "glm4_moe", "olmoe", "gpt_oss")
# the architectures whose experts are found in transformers' conversion mapping (tests/test_moe_arch.py)
NEW_MOE_ARCHS = ("qwen3_next", "qwen3_5_moe", "ernie4_5_moe", "hunyuan_v1_moe", "minimax_m2", "exaone_moe", "dots1",
                 "deepseek_v32", "glm4_moe_lite", "flex_olmo", "phimoe")


def tiny_config(arch: str = "llama", *, hidden: int = 128, intermediate: int = 256, layers: int = 2,
                vocab: int = 49152):
    import transformers

    cls_name, extra = TINY_ARCHS[arch]
    cls = getattr(transformers, cls_name)
    kw = dict(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    kw.update(extra)
    return cls(**kw)


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    """A random-weight causal LM of a real architecture (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=torch.float32)
    with torch.no_grad():  # transformers initializes these to zero; random ones show where they go
        for name, p in model.named_parameters():
            if name.endswith(("_proj_bias", "self_attn.sinks")):
                p.normal_(0, 0.02 if "bias" in name else 1.0)
    return model.eval()


def tiny_vl_config(arch: str):
    """A tiny vision-language config (2 text layers of hidden 128, a 1-layer vision tower) of a real architecture."""
    import transformers

    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=False)
    vision = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2)
    if arch == "qwen2_5_vl":
        return transformers.Qwen2_5_VLConfig(
            text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}},
            vision_config={**vision, "depth": 1, "num_heads": 2, "out_hidden_size": 128, "fullatt_block_indexes": [0]},
            architectures=["Qwen2_5_VLForConditionalGeneration"], tie_word_embeddings=False)
    vis = {**vision, "num_hidden_layers": 1, "image_size": 32, "patch_size": 8}
    if arch == "gemma3":
        return transformers.Gemma3Config(text_config={**text, "head_dim": 32, "sliding_window": 16}, vision_config=vis,
                                         mm_tokens_per_image=4, architectures=["Gemma3ForConditionalGeneration"])
    if arch == "llava":
        return transformers.LlavaConfig(text_config={**text, "model_type": "llama"},
                                        vision_config={**vis, "model_type": "clip_vision_model"},
                                        architectures=["LlavaForConditionalGeneration"])
    if arch == "glm4v_moe":  # a mixture-of-experts language model (dense first layer, shared expert)
        moe = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
                   first_k_dense_replace=1, rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                                             "rope_type": "default", "mrope_section": [2, 3, 3]})
        return transformers.Glm4vMoeConfig(
            text_config={**text, **moe}, vision_config={**vision, "depth": 1, "num_heads": 2, "out_hidden_size": 128,
                                                         "patch_size": 8, "image_size": 32},
            architectures=["Glm4vMoeForConditionalGeneration"], tie_word_embeddings=False)
    if arch == "qwen3_5_moe":  # hybrid linear attention + MoE language model
        return transformers.Qwen3_5MoeConfig(
            text_config={**text, **TINY_ARCHS["qwen3_5_moe"][1]},
            vision_config={**vision, "depth": 1, "num_heads": 2, "out_hidden_size": 128, "num_position_embeddings": 64,
                           "patch_size": 8},
            architectures=["Qwen3_5MoeForConditionalGeneration"], tie_word_embeddings=False)
    raise KeyError(arch)


def save_tiny_vl_repo(path: Path, arch: str, tokenizer, seed: int = 0) -> Path:
    """A tiny vision-language model as a Hub-style folder, with a preprocessor_config.json and a card whose
    pipeline_tag is image-text-to-text."""
    import json

    from hubquant.modeling import auto_class

    torch.manual_seed(seed)
    config = tiny_vl_config(arch)
    auto_class(config).from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "tiny", "size": 32}))
    (path / "README.md").write_text("---\nlicense: apache-2.0\npipeline_tag: image-text-to-text\n---\n# tiny vl\n")
    return path




def save_tiny_repo(path: Path, arch: str, tokenizer, seed: int = 0, dtype=torch.bfloat16, **kw) -> Path:
    """Write a tiny model as a Hub-style folder: safetensors, config, tokenizer, generation config, card."""
    model = tiny_model(arch, seed=seed, **kw).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "README.md").write_text(f"---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny {arch}\n")
    return path


def run_cli(args: list[str], env: dict, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    """`hubquant ARGS` in a child process (the way a user meets it), output captured."""
    return subprocess.run([sys.executable, "-m", "hubquant.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
