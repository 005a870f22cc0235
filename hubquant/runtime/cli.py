"""`hubquant generate REPO_OR_PATH --prompt ...`: greedy generation on hubquant's kernels, with tokens/s."""
from __future__ import annotations

import argparse


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text with a hubquant variant (or any float checkpoint) on hubquant's kernels",
        description="Load a variant with hubquant.load and continue a prompt greedily; prints the text and tokens/s.",
    )
    p.add_argument("model", metavar="REPO_OR_PATH", help="local folder or Hub repo id")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"), help="activation dtype")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--revision", default=None, help="Hub revision for repo ids")
    p.add_argument("--no-graph", action="store_true", help="decode eagerly (no static cache / CUDA graph)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fused q/k/v and gate/up GEMVs, norm, SiLU and rotary kernels (default; 1.4-1.9x faster "
                        "on an H100, docs/decode.md); --no-fuse runs the model's own modules")
    p.set_defaults(func=run)


def _prompt_ids(tok, args: argparse.Namespace):
    if args.chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    return ids


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from hubquant.errors import UnsupportedError, UsageError
    from hubquant.runtime import load
    from hubquant.runtime.chat import cut_at_stop, stop_ids
    from hubquant.runtime.decode import GraphDecoder, supports

    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1", hint="pass --max-new-tokens 32, for example")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tok = load(args.model, device=args.device, dtype=dtype, revision=args.revision,
                      log=lambda s: print(f"note: {s}"))
    if tok is None:
        raise UnsupportedError(f"{args.model} has no tokenizer files", hint="add the base model's tokenizer to it")
    ids = _prompt_ids(tok, args)
    info = model.hubquant_format
    device = next(model.parameters()).device
    stops = stop_ids(model, tok, chat=args.chat)
    if supports(model) and not args.no_graph:
        dec = GraphDecoder(model, max_len=ids.shape[1] + args.max_new_tokens + 1, fuse=args.fuse)
        res = dec.generate(ids, args.max_new_tokens)
        new, secs, n = res.tokens, res.decode_seconds, res.new_tokens
    else:
        t0 = time.perf_counter()
        out = model.generate(ids.to(device), max_new_tokens=args.max_new_tokens, do_sample=False,
                             eos_token_id=sorted(stops) or None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        n = len(new)
    new = cut_at_stop(new, stops)  # the fixed-length decoder runs past the end of the reply
    print(tok.decode(new, skip_special_tokens=True))
    rate = n / secs if secs > 0 else float("inf")
    print(f"[{info['format']}, {info['quantized_linears']} quantized Linears, {device}] "
          f"{n} tokens in {secs:.2f} s: {rate:.1f} tokens/s")
    return 0
