"""Logits agreement of the fused decoder with the unfused one on trained weights (SmolLM2-135M-Instruct, sliced).

    python bench/decode/trained_logits.py slice --out /tmp/smol-slice        # CPU: cut the slice (~45 MB)
    python bench/decode/trained_logits.py run --slice /tmp/smol-slice --out trained_logits.json   # on a CUDA GPU

The whole model (270 MB in bf16) does not travel to the GPU machine (64 MiB), so `slice` keeps its first
--layers decoder layers (trained weights, unchanged) and a --vocab-row slice of the tied embedding: the rows of
the token ids the evaluation prompts use plus the lowest ids, renumbered; the prompts' ids are stored beside it.
`run` writes each variant (bf16, W8A8 int8, FP8, W4A16 group 64) from the slice with hubquant's synthetic writer,
loads it with hubquant.load and compares, for every prompt (one batch), the last-position logits of
GraphDecoder(fuse=True) with GraphDecoder(fuse=False) and with the transformers forward of the same model, and
each variant's logits with the bf16 model's (the quantization error, for scale).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
    "metal type, oil-based ink and a wooden press adapted from those used to make wine. Within fifty years",
    "To make a simple tomato sauce, warm two tablespoons of olive oil in a heavy pan over medium heat, add a "
    "chopped onion and a pinch of salt, and cook until soft. Then add the garlic and",
    "Photosynthesis is the process by which green plants, algae and some bacteria convert light energy into "
    "chemical energy. In the first stage, light is absorbed by chlorophyll in the",
    "Dear team, thank you all for your hard work on the release this week. Before we plan the next milestone, "
    "I would like everyone to write down the three problems that slowed them down the most, so that",
]
VARIANTS = ("bf16", "ct-w8a8", "ct-fp8", "ct-w4a16")


def make_slice(out: Path, layers: int, vocab: int) -> dict:
    """Cut the slice from the cached model (hubquant.assets.smollm2_dir) into `out`."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    from hubquant.assets import smollm2_dir

    src = smollm2_dir()
    cfg = json.loads((src / "config.json").read_text())
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    ids = [tok.encode(p).ids for p in PROMPTS]
    t = min(len(i) for i in ids)
    ids = [i[:t] for i in ids]  # one length: the decoder runs the prompts as one batch
    used = sorted({x for row in ids for x in row})
    keep = sorted(set(used) | set(range(vocab - len(used))))[:max(vocab, len(used))]
    new_id = {old: i for i, old in enumerate(keep)}
    state = load_file(str(src / "model.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    sliced = {}
    for k, v in state.items():
        if k.startswith("model.layers."):
            if int(k.split(".")[2]) < layers:
                sliced[k] = v.contiguous()
        elif k == "model.embed_tokens.weight":
            sliced[k] = v[torch.tensor(keep)].contiguous()
        elif k != "lm_head.weight":  # tied to the embedding
            sliced[k] = v.contiguous()
    save_file(sliced, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(num_hidden_layers=layers, vocab_size=len(keep), bos_token_id=None, eos_token_id=None,
               pad_token_id=None, unk_token_id=None)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    info = {"source": str(src), "layers": layers, "of_layers": json.loads((src / "config.json").read_text())
            ["num_hidden_layers"], "vocab_rows": len(keep), "prompt_tokens": t,
            "ids": [[new_id[x] for x in row] for row in ids],
            "bytes": (out / "model.safetensors").stat().st_size}
    (out / "slice.json").write_text(json.dumps(info))
    return info


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(fraction of elements that differ, relative error) between two same-shape tensors."""
    return float((a != b).float().mean()), _rel(a, b)


def diagnose(model, ids: torch.Tensor, pos: torch.Tensor, fused_layers: list) -> dict:
    """Where the fused decoder's inputs to each layer op first differ from the unfused one's: every fused kernel and
    fused q/k/v, gate/up module run on the activations the unfused decoder's own modules saw (captured by hooks),
    compared with those modules' outputs. Mean (over layers) fraction of differing elements, and max rel. error."""
    from hubquant.runtime.decode import GraphDecoder
    from hubquant_kernels import fused as kf

    seen: dict[tuple[int, str], tuple] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        mods = {"norm_in": layer.input_layernorm, "norm_post": layer.post_attention_layernorm,
                "q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "v": layer.self_attn.v_proj,
                "gate": layer.mlp.gate_proj, "up": layer.mlp.up_proj, "down": layer.mlp.down_proj}
        for name, mod in mods.items():
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, key=(i, name): seen.__setitem__(key, (a[0].detach().clone(), o.detach().clone()))))
    try:
        with torch.no_grad():
            GraphDecoder(model, max_len=ids.shape[1] + 4, fuse=False, batch=ids.shape[0]).forward(ids, pos)
    finally:
        for h in hooks:
            h.remove()
    rows: dict[str, list[tuple[float, float]]] = {}
    with torch.no_grad():
        for i, f in enumerate(fused_layers):
            for name, norm in (("norm_in", f.norm_in), ("norm_post", f.norm_post)):
                x, ref = seen[(i, name)]
                rows.setdefault("add_rmsnorm", []).append(_mismatch(kf.add_rmsnorm(x, *norm)[0], ref))
            x = seen[(i, "q")][0]
            ref = torch.cat([seen[(i, p)][1] for p in ("q", "k", "v")], -1)
            rows.setdefault("qkv_linear", []).append(_mismatch(f.qkv(x), ref))
            x = seen[(i, "gate")][0]
            gu_ref = torch.cat([seen[(i, p)][1] for p in ("gate", "up")], -1)
            rows.setdefault("gate_up_linear", []).append(_mismatch(f.gate_up(x), gu_ref))
            rows.setdefault("silu_mul", []).append(_mismatch(kf.silu_mul(gu_ref), seen[(i, "down")][0]))
    return {op: {"mean_mismatch_fraction": sum(r[0] for r in v) / len(v), "max_rel_err": max(r[1] for r in v),
                 "per_layer_mismatch": [round(r[0], 6) for r in v]} for op, v in rows.items()}


def run(slice_dir: Path, out: Path, variants: list[str], device: str, diag: bool = False) -> dict:
    from safetensors.torch import load_file

    from hubquant.runtime import load
    from hubquant.runtime.decode import GraphDecoder
    from hubquant.runtime.synth import write_variant

    info = json.loads((slice_dir / "slice.json").read_text())
    cfg = json.loads((slice_dir / "config.json").read_text())
    state = load_file(str(slice_dir / "model.safetensors"))
    linears = {k[:-len(".weight")] for k in state if k.startswith("model.layers.") and "_proj." in k}
    ids = torch.tensor(info["ids"], device=device)
    b, t = ids.shape
    pos = torch.arange(t, device=device)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "slice": {k: v for k, v in info.items() if k != "ids"}, "prompts": b, "variants": {}}
    base_logits = None
    for name in variants:
        # "KIND:det": the same variant under torch.use_deterministic_algorithms (FP8 then sums in one order for
        # every shape: no split-K atomics, no cuBLAS, see hubquant_kernels.w8a8.mm_candidates)
        kind, det = name.split(":")[0], name.endswith(":det")
        torch.use_deterministic_algorithms(det, warn_only=True)
        d = Path(tempfile.mkdtemp(prefix=f"hq-trained-{kind}-"))
        try:
            write_variant(d, cfg, ((k, v.to(device)) for k, v in state.items()), linears, kind, group_size=64,
                          keep_dequantized=False)
            model, _ = load(d, device=device, progress=False)
            with torch.no_grad():
                hf = model(ids).logits[:, -1].float()
                unfused = GraphDecoder(model, max_len=t + 4, fuse=False, batch=b).forward(ids, pos).float()
                fdec = GraphDecoder(model, max_len=t + 4, fuse=True, batch=b)
                fused = fdec.forward(ids, pos).float()
            if name == "bf16":
                base_logits = unfused
            row = {"fused_vs_unfused_rel_err": _rel(fused, unfused),
                   "fused_vs_unfused_rel_err_per_prompt": [_rel(f, u) for f, u in zip(fused, unfused)],
                   "unfused_vs_transformers_rel_err": _rel(unfused, hf),
                   "fused_vs_transformers_rel_err": _rel(fused, hf),
                   "top1_fused_equals_unfused": int((fused.argmax(-1) == unfused.argmax(-1)).sum()),
                   "vs_bf16_unfused_rel_err": _rel(unfused, base_logits) if base_logits is not None else None}
            if diag:
                row["ops"] = diagnose(model, ids, pos, fdec.fused)
                print("  ops (mean fraction of differing outputs, max rel. err): " + ", ".join(
                    f"{op} {v['mean_mismatch_fraction']:.1e}/{v['max_rel_err']:.1e}" for op, v in row["ops"].items()),
                    flush=True)
            res["variants"][name] = row
            print(f"{name:9s} fused vs unfused {row['fused_vs_unfused_rel_err']:.2e} (per prompt "
                  + ", ".join(f"{e:.1e}" for e in row["fused_vs_unfused_rel_err_per_prompt"])
                  + f"), top-1 equal {row['top1_fused_equals_unfused']}/{b}, unfused vs transformers "
                  f"{row['unfused_vs_transformers_rel_err']:.2e}, vs bf16 {row['vs_bf16_unfused_rel_err'] or 0:.2e}",
                  flush=True)
            del model
        except Exception as e:  # noqa: BLE001  (keep the other variants' numbers)
            res["variants"][name] = {"error": repr(e)[:500]}
            print(f"{name}: FAILED {e!r}", flush=True)
        finally:
            torch.use_deterministic_algorithms(False)
            shutil.rmtree(d, ignore_errors=True)
        out.write_text(json.dumps(res, indent=1))
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("slice", "run"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--slice", default=None, help="the folder `slice` wrote (run)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cpu", action="store_true", help="run on CPU (checks the script)")
    ap.add_argument("--diagnose", action="store_true", help="also compare each fused op with the unfused modules")
    args = ap.parse_args()
    if args.what == "slice":
        print(json.dumps({k: v for k, v in make_slice(Path(args.out), args.layers, args.vocab).items() if k != "ids"}))
        return 0
    device = "cpu" if args.cpu else "cuda"
    run(Path(args.slice), Path(args.out), args.variants.split(","), device, diag=args.diagnose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
