"""Batch-1 decode speed of a Llama-3-8B-shaped random-weight model, loaded through hubquant.load.

    python bench/decode/run.py --out decode.json            # on a CUDA machine
    python bench/decode/report.py decode.json               # -> docs/decode.md

For each variant (bf16, compressed-tensors W4A16 group 128, W8A8 int8, FP8 dynamic) the same seeded float
weights are quantized on the GPU (hubquant_kernels' RTN kernel for W4), written as a checkpoint exactly as
FORMATS.md describes, loaded with hubquant.load, checked (the decoder's logits against the transformers forward
of the same loaded model), and decoded greedily with hubquant.runtime.decode.GraphDecoder (static KV cache,
one CUDA graph per step). tokens/s is the median over repeats of the decode phase (prefill excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

os.environ.setdefault("HUBQUANT_TUNE_CACHE", "0")  # each mode re-tunes (gemv1 vs gemv2): never from disk
from hubquant.runtime import load  # noqa: E402
from hubquant.runtime.decode import GraphDecoder  # noqa: E402
from hubquant.runtime.synth import write_variant  # noqa: E402
from hubquant_kernels import _common  # noqa: E402

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1024}
VARIANTS = ("bf16", "ct-w4a16", "ct-w8a8", "ct-fp8")
DEVICE = "cuda"


def float_tensors(cfg, layers: int, seed: int = 0):
    """(name, tensor) of a random Llama state dict on the GPU, generated lazily, the same for every variant."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, device=DEVICE) * 0.02).to(torch.bfloat16)

    yield "model.embed_tokens.weight", rnd(v, h)
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                            ("mlp.down_proj", (h, inter))):
            yield f"{p}.{name}.weight", rnd(*shape)
        yield f"{p}.input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16, device=DEVICE)
        yield f"{p}.post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16, device=DEVICE)
    yield "model.norm.weight", torch.ones(h, dtype=torch.bfloat16, device=DEVICE)
    yield "lm_head.weight", rnd(v, h)


def modes(args, kind: str) -> list[str]:
    """Decoder setups to time for a variant: 'default', or with --compare the earlier code beside the new."""
    if not args.compare:
        return ["default"]
    return ["unfused", "fused"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="decode_results.json")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--compare", action="store_true",
                    help="time the unfused decoder (the model's own modules) beside the fused one, per variant")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager (no graph) timing")
    ap.add_argument("--smoke", action="store_true", help="tiny dims on CPU: checks the script, times nothing useful")
    args = ap.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("bench/decode needs a CUDA GPU", file=sys.stderr)
        return 2
    from transformers import LlamaConfig

    dims = {**LLAMA3_8B, **(TINY if args.smoke else {}), "num_hidden_layers": args.layers}
    cfg = LlamaConfig(**dims, dtype="bfloat16").to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    linears = {f"model.layers.{i}.{n}" for i in range(args.layers) for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")} | {"lm_head"}
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 40e9 else Path(tempfile.gettempdir())
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
           "torch": torch.__version__, "layers": args.layers, "new_tokens": args.tokens,
           "prompt_tokens": args.prompt, "config": {k: cfg.get(k) for k in dims}, "variants": {}}
    out = Path(args.out)
    ids = torch.randint(0, cfg["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(1))
    for kind in args.variants.split(","):
        row = {}
        res["variants"][kind] = row
        d = base / f"hq-decode-{kind}"
        try:
            t0 = time.time()
            write_variant(d, cfg, float_tensors(cfg, args.layers), linears, kind, group_size=128,
                          keep_dequantized=False)
            row["write_s"] = round(time.time() - t0, 1)
            row["checkpoint_bytes"] = sum(f.stat().st_size for f in d.glob("*.safetensors"))
            t0 = time.time()
            model, _ = load(d, device=DEVICE, progress=False, log=row.setdefault("notes", []).append)
            row["load_s"] = round(time.time() - t0, 1)
            row["gpu_weight_bytes"] = sum(b.numel() * b.element_size() for b in
                                          list(model.parameters()) + list(model.buffers()))
            with torch.no_grad():
                ref = model(ids.to(DEVICE)).logits[0, -1].float()
            for mode in modes(args, kind):
                dec = GraphDecoder(model, max_len=args.prompt + args.tokens + 8, fuse=mode == "fused")
                r_ = row if mode == "default" else row.setdefault("modes", {}).setdefault(mode, {})
                with torch.no_grad():
                    mine = dec.forward(ids.to(DEVICE), torch.arange(args.prompt, device=DEVICE))[0].float()
                r_["decoder_vs_transformers_rel_err"] = float((mine - ref).norm() / ref.norm())
                if mode == "unfused":
                    unfused_logits = mine
                elif args.compare:  # the fused decoder against the unfused one, same weights and prompt
                    r_["fused_vs_unfused_rel_err"] = float((mine - unfused_logits).norm() / unfused_logits.norm())
                runs = []
                for _ in range(args.repeats + 1):  # the first run captures the graph and tunes the kernels
                    r = dec.generate(ids, args.tokens)
                    runs.append(r.tokens_per_second)
                r_["tokens_per_s_runs"] = runs[1:]
                r_["tokens_per_s"] = sorted(runs[1:])[len(runs[1:]) // 2]
                r_["prefill_s"] = r.prefill_seconds
                r_["first_tokens"] = r.tokens[:8]
                if not args.no_eager:
                    eager = dec.generate(ids, min(16, args.tokens), use_graph=False)
                    r_["eager_tokens_per_s"] = eager.tokens_per_second
                r_["fused_decoder"] = dec.fused is not None
                r_["chosen_kernels"] = {repr(k): v for k, v in _common.chosen().items()}
                print(f"{kind:10s} {mode:14s} {r_['tokens_per_s']:8.1f} tok/s (graph)  "
                      f"{r_.get('eager_tokens_per_s', float('nan')):7.1f} tok/s (eager)  decoder-vs-HF rel err "
                      f"{r_['decoder_vs_transformers_rel_err']:.2e}  ckpt {row['checkpoint_bytes'] / 1e9:.2f} GB  "
                      f"write {row['write_s']} s  load {row['load_s']} s", flush=True)
                del dec
                out.write_text(json.dumps(res, indent=1, default=str))
            del model
        except Exception as e:  # noqa: BLE001  (keep the other variants' numbers)
            import traceback

            row["error"] = traceback.format_exc()[-2000:]
            print(f"{kind}: FAILED {e!r}", flush=True)
        finally:
            shutil.rmtree(d, ignore_errors=True)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            res["chosen_kernels"] = {repr(k): v for k, v in _common.chosen().items()}
            out.write_text(json.dumps(res, indent=1, default=str))
    if args.compare:  # ratios against the same decoder's bf16 (fused vs fused, unfused vs unfused)
        for kind, row in res["variants"].items():
            for mode, r_ in row.get("modes", {}).items():
                bf = res["variants"].get("bf16", {}).get("modes", {}).get(mode, {}).get("tokens_per_s")
                if bf and r_.get("tokens_per_s"):
                    print(f"{kind:10s} {mode:8s} {r_['tokens_per_s']:8.1f} tok/s  {r_['tokens_per_s'] / bf:.2f}x bf16 "
                          f"({mode})  fused vs unfused logits {r_.get('fused_vs_unfused_rel_err', float('nan')):.2e}")
        return 0
    bf = res["variants"].get("bf16", {}).get("tokens_per_s")
    if bf:
        for kind, row in res["variants"].items():
            if row.get("tokens_per_s"):
                print(f"{kind:14s} {row['tokens_per_s'] / bf:.2f}x bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
