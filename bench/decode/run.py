"""Decode speed (batch 1, and --batches B1,B2,.. sequences side by side) of a Llama-3-8B-shaped random-weight
model, loaded through hubquant.load.

    python bench/decode/run.py --out decode.json            # on a CUDA machine
    python bench/decode/report.py decode.json               # -> docs/decode.md

For each variant (bf16, compressed-tensors W4A16 group 128, W8A8 int8, FP8 dynamic) the same seeded float
weights are quantized on the GPU (hubquant_kernels' RTN kernel for W4), written as a checkpoint exactly as
FORMATS.md describes, loaded with hubquant.load, checked (the decoder's logits against the transformers forward
of the same loaded model), and decoded greedily with hubquant.runtime.decode.GraphDecoder (static KV cache,
one CUDA graph per step). tokens/s is the median over repeats of the decode phase (prefill excluded); with a
batch of B sequences it counts the new tokens of all B. --warm-workers compiles the W4A16 kernels the batched
shapes need in parallel processes first (bench/kernels/warm.py).
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


_UNFUSED_LOGITS: dict[str, torch.Tensor] = {}  # per variant: the unfused decoder's logits (batch 1)


def _decode_mode(args, res, row, kind, mode, batch, model, ids, ref, out) -> None:
    """Time one decoder setup (mode) at one batch size: batch 1 fills the row (or its mode), batch B its
    "batch_B" entry (B different prompts of the same length)."""
    dec = GraphDecoder(model, max_len=args.prompt + args.tokens + 8, fuse=mode != "unfused", batch=batch)
    r_ = row if mode == "default" else row.setdefault("modes", {}).setdefault(mode, {})
    if batch == 1:
        with torch.no_grad():
            mine = dec.forward(ids.to(DEVICE), torch.arange(args.prompt, device=DEVICE))[0].float()
        r_["decoder_vs_transformers_rel_err"] = float((mine - ref).norm() / ref.norm())
        if mode == "unfused":
            _UNFUSED_LOGITS[kind] = mine
        elif kind in _UNFUSED_LOGITS:  # the fused decoder against the unfused one, same weights and prompt
            u = _UNFUSED_LOGITS[kind]
            r_["fused_vs_unfused_rel_err"] = float((mine - u).norm() / u.norm())
        prompts = ids
    else:
        r_ = r_.setdefault(f"batch_{batch}", {})
        prompts = torch.randint(0, res["config"]["vocab_size"], (batch, args.prompt),
                                generator=torch.Generator().manual_seed(batch))
    runs = []
    for _ in range(args.repeats + 1):  # the first run captures the graph and tunes the kernels
        r = dec.generate(prompts, args.tokens)
        runs.append(r.tokens_per_second)
    r_["tokens_per_s_runs"] = runs[1:]
    r_["tokens_per_s"] = sorted(runs[1:])[len(runs[1:]) // 2]
    r_["prefill_s"] = r.prefill_seconds
    r_["first_tokens"] = r.tokens[:8]
    if not args.no_eager and batch == 1:
        eager = dec.generate(prompts, min(16, args.tokens), use_graph=False)
        r_["eager_tokens_per_s"] = eager.tokens_per_second
    r_["fused_decoder"] = dec.fused is not None
    r_["chosen_kernels"] = {repr(k): v for k, v in _common.chosen().items()}
    print(f"{kind:10s} {mode:8s} batch {batch:3d} {r_['tokens_per_s']:9.1f} tok/s (graph, all sequences)  "
          f"{r_.get('eager_tokens_per_s', float('nan')):7.1f} tok/s (eager)  decoder-vs-HF rel err "
          f"{r_.get('decoder_vs_transformers_rel_err', float('nan')):.2e}  ckpt {row['checkpoint_bytes'] / 1e9:.2f} GB"
          f"  write {row['write_s']} s  load {row['load_s']} s", flush=True)
    del dec
    out.write_text(json.dumps(res, indent=1, default=str))


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
    ap.add_argument("--batches", default="1", help="sequences decoded side by side, e.g. 1,8,32")
    ap.add_argument("--warm-workers", type=int, default=0, help="compile W4A16 kernels for the batches first")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
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
           "prompt_tokens": args.prompt, "config": {k: cfg.get(k) for k in dims}, "variants": {},
           "batches": batches, "command": " ".join(sys.argv)}
    out = Path(args.out)
    if args.warm_workers and DEVICE == "cuda" and "ct-w4a16" in args.variants:
        sys.path.insert(0, str(ROOT / "bench" / "kernels"))
        import warm

        h, inter = dims["hidden_size"], dims["intermediate_size"]
        kv = h // dims["num_attention_heads"] * dims["num_key_value_heads"]
        shapes = [(h, h + 2 * kv), (h, h), (h, 2 * inter), (inter, h), (h, kv), (h, inter)]  # (K, N)
        res["warm"] = warm.warm(shapes, sorted(set(batches)), args.warm_workers)
        print(f"compiled in parallel: {res['warm']}", flush=True)
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
                for batch in batches:
                    _decode_mode(args, res, row, kind, mode, batch, model, ids, ref, out)
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
    _print_ratios(res, batches)
    return 0


def _print_ratios(res: dict, batches: list[int]) -> None:
    """Every variant against the same decoder's bf16 at the same batch (fused vs fused, unfused vs unfused)."""
    bf_row = res["variants"].get("bf16", {})
    for kind, row in res["variants"].items():
        for mode, r_ in (row.get("modes") or {"default": row}).items():
            bf_r = bf_row.get("modes", {}).get(mode, {}) if mode != "default" else bf_row
            for b in batches:
                mine = r_ if b == 1 else r_.get(f"batch_{b}", {})
                bf = (bf_r if b == 1 else bf_r.get(f"batch_{b}", {})).get("tokens_per_s")
                if bf and mine.get("tokens_per_s"):
                    print(f"{kind:10s} {mode:8s} batch {b:3d} {mine['tokens_per_s']:9.1f} tok/s  "
                          f"{mine['tokens_per_s'] / bf:.2f}x bf16 ({mode})  fused vs unfused logits "
                          f"{mine.get('fused_vs_unfused_rel_err', float('nan')):.2e}")



if __name__ == "__main__":
    sys.exit(main())
