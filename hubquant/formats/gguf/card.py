"""The GGUF section of the model card: quality of this file, which preset fits which memory budget, and the
llama.cpp / Ollama commands."""
from __future__ import annotations

import torch

from hubquant.formats.gguf import mix
from hubquant.formats.gguf.arch import tensor_entries
from hubquant.formats.gguf.blocks import TYPES

_BITS = {**{k: v.bits for k, v in TYPES.items()}, "F16": 16.0, "F32": 32.0}
KV_CONTEXT = 4096  # context length of the memory estimate (f16 KV cache)


def describe(qc: dict) -> str:
    counts = qc.get("tensor_types", {})
    mix_text = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    imatrix = " with an importance matrix" if qc.get("imatrix") else ""
    return f"GGUF {qc.get('gguf_type')}{imatrix} (llama.cpp block types per tensor: {mix_text})"


def preset_sizes(model: torch.nn.Module) -> dict[str, int]:
    """Estimated file bytes of every preset for this model (tensor types from the preset's mix)."""
    entries = tensor_entries(model)
    quant = [e for e in entries if e.quantizable]
    numel = {e.gguf: int(torch.Size(e.shape).numel()) for e in entries}
    from hubquant.formats.gguf.method import model_shape

    out = {}
    for preset in mix.PRESETS:
        types = mix.plan([(e.gguf, e.shape[-1]) for e in quant], preset, model_shape(model.config))
        bits = sum(numel[e.gguf] * (_BITS[types[e.gguf]] if e.quantizable else 32.0) for e in entries)
        out[preset] = int(bits / 8)
    return out


def kv_cache_bytes(config, context: int = KV_CONTEXT) -> int:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv * head_dim * context * 2


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def card_section(model: torch.nn.Module, qc: dict, metrics: dict, repo: str) -> str:
    """Markdown for the card (see the module docstring)."""
    preset = qc.get("gguf_type", mix.DEFAULT_PRESET)
    files = qc.get("files", [])
    first = files[0] if files else f"MODEL-{preset}.gguf"
    lines = ["## GGUF", ""]
    lines.append(f"`{first}`" + (f" (+ {len(files) - 1} more shards; llama.cpp loads them from the first)"
                                 if len(files) > 1 else "") + f": {describe(qc)}.")
    if metrics.get("perplexity"):
        lines += ["", "| file | type | perplexity | vs base | top-1 agreement |", "|---|---|---|---|---|",
                  f"| `{first}` | {preset} | {metrics['perplexity']:.3f} | {metrics['ppl_increase_pct']:+.2f}% | "
                  f"{100 * metrics['top1_agreement']:.1f}% |"]
    kv = kv_cache_bytes(model.config)
    lines += ["", f"Which type for which memory budget (file size + f16 KV cache at {KV_CONTEXT} tokens, "
              f"{_gb(kv)}; estimated from this model's tensor shapes):", "",
              "| type | file size | memory needed |", "|---|---|---|"]
    for name, size in preset_sizes(model).items():
        mark = " (this file)" if name == preset else ""
        lines.append(f"| {name}{mark} | {_gb(size)} | {_gb(size + kv)} |")
    lines += ["", "Run it:", "", "```bash",
              f"llama-cli -hf {repo}:{preset} -p \"Hello\"            # llama.cpp, downloads from the Hub",
              f"llama-server -m {first} -c {KV_CONTEXT}            # local file, OpenAI-compatible server",
              f"ollama run hf.co/{repo}:{preset}", "```", "",
              "In Python: `AutoModelForCausalLM.from_pretrained(REPO, gguf_file=\"" + first + "\")` "
              "(transformers dequantizes to float)."]
    return "\n".join(lines)
