"""Mixture-of-experts GGUF: llama.cpp's stacked expert tensors and expert metadata keys.

llama.cpp keeps a sparse block's experts as three 3-D tensors per layer, `blk.N.ffn_{gate,up,down}_exps.weight`
of shape [n_expert, rows, cols] (ggml: ne = [cols, rows, n_expert]); each expert's slice is quantized as its own
2-D rows, so the stacked bytes are the experts' packed blocks one after the other, all of one type. hubquant's
model holds the experts as per-expert Linears (`hubquant.moe.unfuse_experts`), whose names this module groups.
The router (`ffn_gate_inp`), the shared-expert gate (`ffn_gate_inp_shexp`, stored 1-D) and the expert score
bias (`exp_probs_b.bias`) stay F32.
"""
from __future__ import annotations

import re

# per-expert projection name (transformers 5 / Hub checkpoints) -> llama.cpp stacked tensor
STACKED = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps", "w3": "ffn_up_exps",
           "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}
_EXPERT_KEY = re.compile(r"^(?P<block>.*\.layers\.(?P<bid>\d+)\..*experts)\.(?P<i>\d+)\.(?P<proj>\w+)\.weight$")



def expert_key(key: str) -> tuple[str, int, int, str] | None:
    """(experts module, layer, expert index, projection) of a per-expert weight key, else None."""
    m = _EXPERT_KEY.match(key)
    if m is None or m["proj"] not in STACKED:
        return None
    return m["block"], int(m["bid"]), int(m["i"]), m["proj"]


def stacked_name(bid: int, proj: str) -> str:
    return f"blk.{bid}.{STACKED[proj]}.weight"


def special_name(key: str) -> str | None:
    """llama.cpp names of MoE tensors the `gguf` name map does not give from the module name."""
    m = re.match(r"^.*\.layers\.(\d+)\..*\.e_score_correction_bias$", key)
    if m:
        return f"blk.{m.group(1)}.exp_probs_b.bias"
    return None


def n_experts(config) -> int:
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        n = getattr(config, key, None)
        if n:
            return int(n)
    return 0


def add_moe_hparams(w, config, gguf_arch: str) -> None:
    """expert_count, expert_used_count, expert feed-forward lengths, shared experts, leading dense blocks,
    routing normalisation, scale and gating function, as llama.cpp's converter writes them."""
    import gguf

    n = n_experts(config)
    if not n:
        return
    w.add_expert_count(n)
    w.add_expert_used_count(int(config.num_experts_per_tok))
    if getattr(config, "moe_intermediate_size", None):
        w.add_expert_feed_forward_length(int(config.moe_intermediate_size))
    if getattr(config, "shared_expert_intermediate_size", None):
        w.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))
    if getattr(config, "n_shared_experts", None):
        w.add_expert_shared_count(int(config.n_shared_experts))
    if getattr(config, "first_k_dense_replace", None) is not None and gguf_arch in ("deepseek2", "glm4moe"):
        w.add_leading_dense_block_count(int(config.first_k_dense_replace))
    if gguf_arch in ("deepseek2", "glm4moe"):
        w.add_expert_weights_scale(float(getattr(config, "routed_scaling_factor", 1.0) or 1.0))
        w.add_expert_weights_norm(bool(getattr(config, "norm_topk_prob", False)))
        scoring = getattr(config, "scoring_func", None) or ("softmax" if config.model_type == "deepseek_v2"
                                                            else "sigmoid")
        w.add_expert_gating_func(getattr(gguf.ExpertGatingFuncType, scoring.upper()))
        if getattr(config, "n_group", None):
            w.add_expert_group_count(int(config.n_group))
            w.add_expert_group_used_count(int(config.topk_group))
    if gguf_arch == "glm4moe":
        w.add_nextn_predict_layers(0)  # the multi-token-prediction layers are not part of transformers' model


def add_mla_hparams(w, config) -> None:
    """DeepSeek's multi-head latent attention, in llama.cpp's non-absorbed layout (`attn_kv_b` whole, one
    KV head per query head): LoRA ranks, key/value head sizes and the rotary part of the key."""
    if getattr(config, "q_lora_rank", None):
        w.add_q_lora_rank(int(config.q_lora_rank))
    w.add_kv_lora_rank(int(config.kv_lora_rank))
    w.add_key_length(int(config.qk_nope_head_dim + config.qk_rope_head_dim))
    w.add_value_length(int(config.v_head_dim))
    w.add_rope_dimension_count(int(config.qk_rope_head_dim))
