"""Random-weight Llama-shaped checkpoints of a chosen size, written one tensor at a time (never the whole model
in memory): safetensors shards, config.json and the SmolLM2 tokenizer (its 49152-token vocabulary)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# TinyLlama-1.1B's decoder layer (hidden 2048, MLP 5632, 32 heads, 4 KV heads): 88 MB a layer in bf16
LAYER_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4)
VOCAB = 49152


def llama_config(layers: int, shape: dict | None = None, vocab: int = VOCAB):
    from transformers import LlamaConfig

    return LlamaConfig(**(shape or LAYER_SHAPE), num_hidden_layers=layers, vocab_size=vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
                       architectures=["LlamaForCausalLM"])


def layers_for(target_bytes: float, shape: dict | None = None, vocab: int = VOCAB) -> int:
    """Decoder layers that bring a bf16 model of this shape closest to `target_bytes`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m1 = AutoModelForCausalLM.from_config(llama_config(1, shape, vocab), dtype=torch.bfloat16)
    per_layer = sum(p.numel() for p in m1.model.layers[0].parameters()) * 2
    rest = sum(p.numel() for p in m1.parameters()) * 2 - per_layer
    return max(1, round((target_bytes - rest) / per_layer))


def write_checkpoint(folder: Path, layers: int, *, shape: dict | None = None, vocab: int = VOCAB, seed: int = 0,
                     max_shard_bytes: int = 2 * 1024**3) -> int:
    """Write the model into `folder` (shards of at most `max_shard_bytes`); returns its weight bytes."""
    from transformers import AutoModelForCausalLM

    from hubquant.assets import smollm2_dir
    from hubquant.formats.shards import ShardWriter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = llama_config(layers, shape, vocab)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder)
    total = 0
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            t = torch.randn(p.shape, generator=gen) * (0.02 if "embed" in name else p.shape[-1] ** -0.5)
        writer.add(name, t.to(torch.bfloat16))
        total += p.numel() * 2
        del t
    writer.finish(max_shard_bytes=max_shard_bytes)
    config.save_pretrained(folder)
    tok = smollm2_dir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok / f).is_file():
            (folder / f).write_bytes((tok / f).read_bytes())
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# random Llama-shaped weights\n")
    json.loads((folder / "config.json").read_text())  # written and readable
    return total
