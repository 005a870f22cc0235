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


def shard_count(size: int, split_size: int) -> int:
    """Files a GGUF of `size` bytes is written as under `split_size` (0: one file); an estimate for other presets
    (gguf-split cuts between tensors, so a shard can hold a little less than the limit)."""
    return 1 if not split_size or size <= split_size else -(-size // split_size)


def _files_text(stem: str, n: int) -> str:
    return f"`{stem}.gguf`" if n == 1 else f"`{stem}-00001-of-{n:05d}.gguf` .. `-{n:05d}-of-{n:05d}` ({n} files)"


def quality_lines(qc: dict, metrics: dict, first: str) -> list[str]:
    """The quality table: perplexity of the base and of this file on held-out text, and agreement."""
    if not metrics.get("perplexity"):
        return []
    preset = qc.get("gguf_type", mix.DEFAULT_PRESET)
    imatrix = "importance matrix" if qc.get("imatrix") else "no importance matrix"
    tokens = f" ({metrics['eval_tokens']} tokens)" if metrics.get("eval_tokens") else ""
    return ["", f"Quality on held-out text{tokens}, measured on the dequantized weights this file holds:", "",
            "| model | type | perplexity | vs base | top-1 agreement | mean KL |", "|---|---|---|---|---|---|",
            f"| base (float) | - | {metrics['base_perplexity']:.3f} | - | 100% | 0 |",
            f"| `{first}` | {preset} ({qc.get('method', 'rtn')}, {imatrix}) | {metrics['perplexity']:.3f} | "
            f"{metrics['ppl_increase_pct']:+.2f}% | {100 * metrics['top1_agreement']:.1f}% | "
            f"{metrics.get('mean_kl', float('nan')):.4f} |"]


def card_section(model: torch.nn.Module, qc: dict, metrics: dict, repo: str, *, split_size: int = 0) -> str:
    """Markdown for the card (see the module docstring). split_size: the --gguf-split-size in bytes."""
    preset = qc.get("gguf_type", mix.DEFAULT_PRESET)
    files = qc.get("files", [])
    first = files[0] if files else f"MODEL-{preset}.gguf"
    stem = first.rsplit("-00001-of-", 1)[0].removesuffix(".gguf").removesuffix(f"-{preset}")
    lines = ["## GGUF", ""]
    lines.append(f"`{first}`" + (f" (+ {len(files) - 1} more shards; llama.cpp loads them from the first)"
                                 if len(files) > 1 else "") + f": {describe(qc)}.")
    ex = qc.get("experts")
    if ex:
        mix_text = ", ".join(f"{k} x{v}" for k, v in sorted(ex["stacked_types"].items()))
        lines += ["", f"Experts: stacked per layer as llama.cpp reads them (`blk.N.ffn_{{gate,up,down}}_exps`, "
                  f"[experts, rows, cols], one type per stack: {mix_text}); routers stay F32. "
                  + (f"Each expert's importance matrix comes from the calibration tokens routed to it; "
                     f"{ex['without_imatrix']} of {ex['projections']} expert projections saw too few routed tokens "
                     "and were quantized without one (llama.cpp's plain weighting)." if qc.get("imatrix")
                     else "No importance matrix: every expert quantized with llama.cpp's plain weighting.")]
    lines += quality_lines(qc, metrics, first)
    kv = kv_cache_bytes(model.config)
    lines += ["", f"Which type for which memory budget (file size + f16 KV cache at {KV_CONTEXT} tokens, "
              f"{_gb(kv)}; other types estimated from this model's tensor shapes; this repo holds the "
              f"{preset} file{'s' if len(files) > 1 else ''}):", "",
              "| type | files | file size | memory needed |", "|---|---|---|---|"]
    for name, size in preset_sizes(model).items():
        if name == preset:
            lines.append(f"| **{name}** (this repo) | {', '.join(f'`{f}`' for f in files) or f'`{first}`'} | "
                         f"{_gb(size)} | {_gb(size + kv)} |")
        else:
            lines.append(f"| {name} | {_files_text(f'{stem}-{name}', shard_count(size, split_size))} | "
                         f"{_gb(size)} | {_gb(size + kv)} |")
    pattern = f"{first.rsplit('-00001-of-', 1)[0].removesuffix('.gguf')}*.gguf"
    lines += ["", "Download and run it:", "", "```bash",
              f"hf download {repo} --include \"{pattern}\" --local-dir .",
              f"llama-cli -hf {repo}:{preset} -p \"Hello\"            # llama.cpp, downloads from the Hub",
              f"llama-server -m {first} -c {KV_CONTEXT}            # local file, OpenAI-compatible server"]
    if len(files) > 1:
        merged = f"{stem}-{preset}.gguf"
        lines += [f"llama-gguf-split --merge {first} {merged}   # one file, for tools that read no shards",
                  f"echo 'FROM ./{merged}' > Modelfile && ollama create {stem.lower()} -f Modelfile && "
                  f"ollama run {stem.lower()}"]
    else:
        lines.append(f"ollama run hf.co/{repo}:{preset}")
    lines += ["```", "", "In Python: `AutoModelForCausalLM.from_pretrained(REPO, gguf_file=\"" + first + "\")` "
              "(transformers dequantizes to float)."]
    return "\n".join(lines)
