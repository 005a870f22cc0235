"""`hubquant convert`: flags -> ConvertOptions -> convert()."""
from __future__ import annotations

import argparse
import json


def add_parsers(sub) -> None:
    from hubquant.formats import FORMATS
    from hubquant.methods import METHODS

    p = sub.add_parser(
        "convert", help="quantize a Hub model, write a card with measured quality, push the variant",
        description="Download REPO_ID, quantize it, evaluate it against the base, write a model card and "
                    "(with --push) push the variant to the Hub in one commit. HF_ENDPOINT and HF_TOKEN are read "
                    "from the environment. Exit codes: 2 usage, 3 auth/gated, 4 not found, 5 unsupported, "
                    "6 quality gate, 7 conflict.")
    p.add_argument("repo_id", help="base model, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--method", default="rtn", choices=list(METHODS), help="quantization method (default rtn)")
    p.add_argument("--bits", type=int, help="weight bits (method default: 4, or 8 for W8A8)")
    p.add_argument("--group-size", type=int, help="input columns per scale; -1 = per output channel (default 128)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True, help="symmetric weights")
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False,
                     help="asymmetric weights (zero points)")
    p.add_argument("--activations", choices=["dynamic", "static"], help="W8A8/FP8 activation scales")
    p.add_argument("--format", choices=list(FORMATS),
                   help="checkpoint format (default: compressed-tensors; bitsandbytes for bnb-*)")
    p.add_argument("--revision", help="branch, tag or commit of the base (default main)")
    p.add_argument("--ignore", nargs="+", default=["lm_head"], metavar="PATTERN",
                   help="Linear names left unquantized (suffix or re:REGEX; default lm_head)")
    p.add_argument("--output-dir", help="write the variant here (default: a temp folder)")
    p.add_argument("--push", action="store_true", help="push the variant to the Hub (one commit)")
    p.add_argument("--target-repo", help="NAMESPACE/NAME to push to (default {you}/{model}-{SCHEME}-{METHOD})")
    p.add_argument("--private", action="store_true", help="create the target repo private")
    p.add_argument("--max-ppl-increase", type=float, metavar="PCT",
                   help="refuse to push when perplexity rises more than PCT percent")
    g = p.add_argument_group("calibration and evaluation")
    g.add_argument("--calib-dataset", help="built-in (fortunes, lee-news), a local file, or a Hub dataset "
                                           "ID[:CONFIG[:SPLIT[:COLUMN]]] "
                                           "(default: wikitext on the Hub, fortunes offline)")
    g.add_argument("--eval-dataset", help="held-out text, same syntax (default: wikitext test, lee-news offline)")
    g.add_argument("--num-samples", type=int, default=128, help="calibration samples (default 128)")
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sample (default 2048)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat-template", action="store_true", help="format calibration text with the chat template")
    g.add_argument("--eval-windows", type=int, default=8, help="eval windows (default 8)")
    g.add_argument("--eval-seq-len", type=int, default=512, help="tokens per eval window (default 512)")
    g.add_argument("--skip-eval", action="store_true", help="do not measure quality (the card says so)")
    g.add_argument("--no-leak-check", dest="leak_check", action="store_false", help="skip the calibration-leak check")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="method-specific option, e.g. damp=0.01, actorder=false, alpha=0.8 (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt weights (can execute code)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the repo's own modeling code")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.set_defaults(func=run)


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def options_from_args(args: argparse.Namespace):
    from hubquant.convert import ConvertOptions
    from hubquant.errors import UsageError

    method_options = {}
    for item in args.method_option:
        if "=" not in item:
            raise UsageError(f"--method-option {item} is not KEY=VALUE", hint="e.g. --method-option damp=0.05")
        k, v = item.split("=", 1)
        method_options[k.strip()] = _parse_value(v.strip())
    if args.target_repo and not args.push:
        raise UsageError("--target-repo only applies with --push", hint="add --push")
    if args.private and not args.push:
        raise UsageError("--private only applies with --push", hint="add --push")
    return ConvertOptions(
        repo_id=args.repo_id, method=args.method, bits=args.bits, group_size=args.group_size,
        symmetric=args.symmetric, activations=args.activations, format=args.format, revision=args.revision,
        ignore=tuple(args.ignore), output_dir=args.output_dir, push=args.push, target_repo=args.target_repo,
        private=args.private, max_ppl_increase=args.max_ppl_increase, calib_dataset=args.calib_dataset,
        eval_dataset=args.eval_dataset, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
        chat_template=args.chat_template, eval_windows=args.eval_windows, eval_seq_len=args.eval_seq_len,
        skip_eval=args.skip_eval, leak_check=args.leak_check, device=args.device, allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code, method_options=method_options, progress=not args.quiet,
    )


def run(args: argparse.Namespace) -> int:
    from hubquant.convert import convert

    opts = options_from_args(args)
    res = convert(opts, log=lambda m: print(m, flush=True))
    if res.metrics and not res.skipped:
        m = res.metrics
        print()
        print(f"| {'metric':<28} | {'base':>10} | {'variant':>10} |")
        print(f"|{'-' * 30}|{'-' * 12}|{'-' * 12}|")
        if "perplexity" in m:
            print(f"| {'perplexity':<28} | {m['base_perplexity']:>10.3f} | {m['perplexity']:>10.3f} |")
            print(f"| {'top-1 agreement':<28} | {'100.0%':>10} | {100 * m['top1_agreement']:>9.1f}% |")
            print(f"| {'mean KL (nats/token)':<28} | {0:>10.4f} | {m['mean_kl']:>10.4f} |")
        print(f"| {'size on disk (MB)':<28} | {m['base_size_bytes'] / 1e6:>10.1f} | {m['size_bytes'] / 1e6:>10.1f} |")
    if res.commit_url:
        print(f"\nvariant: {res.target_repo}\ncommit:  {res.commit_url}")
    elif not res.skipped:
        print(f"\nvariant written to {res.out_dir}")
    if args.json:
        print(json.dumps({"target_repo": res.target_repo, "commit_url": res.commit_url, "skipped": res.skipped,
                          "out_dir": str(res.out_dir), "metrics": res.metrics, "settings_hash": res.settings_hash,
                          "base_sha": res.base_sha}))
    return 0
