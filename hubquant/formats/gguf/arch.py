"""What llama.cpp expects of each architecture: GGUF architecture name, tensor names (through the `gguf`
package's TensorNameMap; experts stacked as hubquant.formats.gguf.experts says), the Llama q/k row permutation,
Gemma's norm offset, hyperparameters and tokenizer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hubquant.errors import UnsupportedError
from hubquant.formats.gguf import experts as moe_gguf


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # gguf.MODEL_ARCH_NAMES value, e.g. "llama"
    permute_qk: bool = False  # llama.cpp's rotary layout for Llama-converted checkpoints
    norm_plus_one: bool = False  # Gemma RMSNorm computes x * (1 + w); llama.cpp stores 1 + w


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", permute_qk=True),
    "mistral": ArchSpec("llama", permute_qk=True),
    "qwen2": ArchSpec("qwen2"),
    "qwen3": ArchSpec("qwen3"),
    "gemma": ArchSpec("gemma", norm_plus_one=True),
    "gemma2": ArchSpec("gemma2", norm_plus_one=True),
    "phi3": ArchSpec("phi3"),
    # mixtures of experts (llama.cpp's Mixtral is its llama architecture with stacked experts)
    "mixtral": ArchSpec("llama", permute_qk=True),
    "qwen2_moe": ArchSpec("qwen2moe"),
    "qwen3_moe": ArchSpec("qwen3moe"),
    "olmoe": ArchSpec("olmoe"),
    "deepseek_v2": ArchSpec("deepseek2"),
    "deepseek_v3": ArchSpec("deepseek2"),
    "glm4_moe": ArchSpec("glm4moe"),
}

# tokenizer.ggml.pre names llama.cpp knows for the byte-level BPE tokenizers of these families
_PRE_BY_FAMILY = {"qwen2": "qwen2", "qwen3": "qwen2"}


def arch_of(config) -> ArchSpec:
    mt = config.model_type
    if mt not in ARCHS:
        raise UnsupportedError(f"--format gguf does not know the architecture '{mt}'",
                               hint=f"GGUF output supports {', '.join(sorted(ARCHS))}; use another --format")
    return ARCHS[mt]


@dataclass
class TensorEntry:
    """One tensor of the GGUF file and where it comes from."""

    gguf: str  # "blk.0.attn_q.weight"
    param: str  # the model's state-dict key
    module: str  # the owning module's name ("model.layers.0.self_attn.q_proj")
    shape: tuple[int, ...]
    quantizable: bool  # a 2-D weight llama.cpp quantizes (norms, routers and 1-D tensors stay F32)
    permute_heads: int = 0  # > 0: rows permuted for llama.cpp's rotary layout, with this many heads
    experts: tuple[str, ...] = ()  # stacked experts: each expert's Linear, in expert order (module: the group)


def _name_map(spec: ArchSpec, n_layers: int):
    import gguf

    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.gguf_arch)
    return gguf.get_tensor_name_map(arch, n_layers)


def tie_if_needed(model: torch.nn.Module) -> None:
    """Gemma's llama.cpp graph has no output tensor (it reads the token embeddings): an untied lm_head equal to
    the embeddings is tied; a different one cannot be written."""
    config = model.config
    spec = arch_of(config)
    if getattr(config, "tie_word_embeddings", False):
        return
    nmap = _name_map(spec, config.num_hidden_layers)
    head = model.get_output_embeddings()
    if head is None or nmap.get_name("lm_head") is not None:
        return
    emb = model.get_input_embeddings()
    if not torch.equal(head.weight, emb.weight):
        raise UnsupportedError(f"--format gguf: llama.cpp's {spec.gguf_arch} reads the output from the token "
                               "embeddings, but this checkpoint's lm_head differs from them",
                               hint="use --format compressed-tensors for this checkpoint")
    head.weight = emb.weight
    config.tie_word_embeddings = True


def tensor_entries(model: torch.nn.Module) -> list[TensorEntry]:
    """Every tensor the GGUF holds, in llama.cpp's order (embeddings, layers, output norm, output)."""
    config = model.config
    spec = arch_of(config)
    nmap = _name_map(spec, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    entries = []
    stacks: dict[tuple[str, str], list[tuple[int, str, tuple[int, ...], int]]] = {}
    for key, t in model.state_dict().items():
        if "rotary_emb" in key or (tied and key == "lm_head.weight"):
            continue
        module, _, suffix = key.rpartition(".")
        ex = moe_gguf.expert_key(key)
        if ex is not None:
            block, bid, i, proj = ex
            stacks.setdefault((block, proj), []).append((i, module, tuple(t.shape), bid))
            continue
        special = moe_gguf.special_name(key)
        if special is not None:
            entries.append(TensorEntry(special, key, module, tuple(t.shape), False))
            continue
        name = nmap.get_name(module)
        if name is None:
            raise UnsupportedError(f"--format gguf: no llama.cpp name for tensor {key}",
                                   hint="this checkpoint has tensors llama.cpp's architecture does not define")
        heads = 0
        if spec.permute_qk and suffix == "weight" and name.endswith(("attn_q", "attn_k")):
            heads = config.num_attention_heads if name.endswith("attn_q") else config.num_key_value_heads
        quantizable = (t.dim() >= 2 and suffix == "weight" and not name.endswith("_norm")
                       and "ffn_gate_inp" not in name)
        shape = tuple(t.shape)
        if name.endswith("ffn_gate_inp_shexp"):  # [1, hidden] -> [hidden], as llama.cpp reads it
            shape = shape[-1:]
        entries.append(TensorEntry(f"{name}.{suffix}", key, module, shape, quantizable, heads))
    for (block, proj), members in stacks.items():
        members.sort()
        if [m[0] for m in members] != list(range(len(members))):
            raise UnsupportedError(f"--format gguf: experts of {block} are not numbered 0..{len(members) - 1}",
                                   hint="report the model: its experts cannot be stacked")
        _, _, shape, bid = members[0]
        entries.append(TensorEntry(moe_gguf.stacked_name(bid, proj), f"{block}.*.{proj}.weight",
                                   f"{block}.*.{proj}", (len(members), *shape), True,
                                   experts=tuple(m[1] for m in members)))
    return sorted(entries, key=_order)


def _order(e: TensorEntry):
    if e.gguf.startswith("token_embd"):
        return (0, 0, e.gguf)
    if e.gguf.startswith("blk."):
        return (1, int(e.gguf.split(".")[1]), e.gguf)
    return (2, 0, e.gguf)


def permute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, the two rotary halves interleaved (rows are independent,
    so quantized rows permute like float rows). transformers' GGUF loader applies the inverse."""
    rows = a.shape[0]
    return a.reshape(n_head, 2, rows // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def float_tensor(e: TensorEntry, t: torch.Tensor, spec: ArchSpec) -> np.ndarray:
    """An unquantized tensor as llama.cpp stores it (F32), with the architecture's transforms applied."""
    a = t.detach().float().cpu().numpy().reshape(e.shape)
    if spec.norm_plus_one and e.gguf.endswith("norm.weight"):
        a = a + 1.0
    if e.permute_heads:
        a = permute_rows(a, e.permute_heads)
    return np.ascontiguousarray(a, dtype=np.float32)


def _rope(config) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def _llama3_rope_factors(theta: float, dim: int, p: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling (llama.cpp reads them as `rope_freqs.weight`)."""
    factor = p.get("factor", 8.0)
    low, high = p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old = p.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi / (1.0 / theta ** (i / dim))
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def add_hparams(w, config, spec: ArchSpec) -> dict[str, np.ndarray]:
    """Architecture keys of the GGUF header; returns extra F32 tensors some rope variants need."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(config.vocab_size)
    theta, rp = _rope(config)
    w.add_rope_freq_base(theta)
    rot = int(head_dim * rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0))
    if getattr(config, "kv_lora_rank", None):  # DeepSeek's latent attention
        moe_gguf.add_mla_hparams(w, config)
        rot = int(config.qk_rope_head_dim)
        if rp.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * float(rp["mscale_all_dim"]))
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(rot)
    moe_gguf.add_moe_hparams(w, config, spec.gguf_arch)
    extra: dict[str, np.ndarray] = {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp.get("original_max_position_embeddings", config.max_position_embeddings)))
    elif kind == "llama3":
        extra["rope_freqs.weight"] = _llama3_rope_factors(theta, rot, rp)
    elif kind in ("longrope", "su"):
        extra["rope_factors_long.weight"] = np.asarray(rp["long_factor"], dtype=np.float32)
        extra["rope_factors_short.weight"] = np.asarray(rp["short_factor"], dtype=np.float32)
        orig = getattr(config, "original_max_position_embeddings", None) or rp["original_max_position_embeddings"]
        orig = int(orig)
        w.add_rope_scaling_orig_ctx_len(orig)
        scale = config.max_position_embeddings / orig
        w.add_rope_scaling_attn_factors(1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig)))
    if spec.gguf_arch == "gemma2":
        w.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        w.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
        w.add_sliding_window(int(config.sliding_window))
    elif spec.gguf_arch == "phi3" and getattr(config, "sliding_window", None):
        w.add_sliding_window(int(config.sliding_window))
    return extra


def _pre_tokenizer(config, n_vocab: int) -> str:
    if config.model_type in _PRE_BY_FAMILY:
        return _PRE_BY_FAMILY[config.model_type]
    if n_vocab >= 128000 and config.model_type == "llama":
        return "llama-bpe"
    if n_vocab == 49152:  # SmolLM / StarCoder-style byte-level BPE
        return "smollm"
    return "default"


def add_tokenizer(w, tok_dir: Path, config) -> None:
    """tokenizer.ggml.* keys: model, pre-tokenizer, tokens, scores, types, merges, special ids, chat template."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

    vocab = None
    for cls in (BpeVocab, SentencePieceVocab, LlamaHfVocab):
        try:
            vocab = cls(tok_dir)
            break
        except (FileNotFoundError, TypeError, ImportError):
            continue
    if vocab is None:
        raise UnsupportedError(f"--format gguf: no tokenizer.json / tokenizer.model llama.cpp can read in {tok_dir}",
                               hint="the base repo needs a byte-level BPE or SentencePiece tokenizer")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    n = max(config.vocab_size, len(tokens))
    for i in range(len(tokens), n):  # rows of the embedding past the tokenizer (padding)
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        w.add_tokenizer_pre(_pre_tokenizer(config, n))
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    # merges, bos/eos/unk/pad ids, add_bos/add_eos, chat template (tokenizer_config.json or chat_template.jinja)
    SpecialVocab(tok_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n).add_to_gguf(w, quiet=True)
