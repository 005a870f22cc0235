"""`hubquant convert`: flags (generated from ConvertOptions' declarations) -> convert(), progress bars."""
from __future__ import annotations

import argparse
import json
import sys


def add_parsers(sub) -> None:
    from hubquant.options import add_arguments

    p = sub.add_parser(
        "convert", help="quantize a Hub model, write a card with measured quality, push the variant",
        description="Download REPO_ID (or read a local model folder), quantize it, evaluate it against the base, "
                    "write a model card and (with --push) push the variant to the Hub in one commit. HF_ENDPOINT "
                    "and HF_TOKEN are read from the environment. Exit codes: 2 usage, 3 auth/gated, 4 not found or "
                    "Hub unreachable, 5 unsupported, 6 quality gate, 7 conflict, 1 anything else.")
    add_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace):
    from hubquant.options import from_args

    return from_args(args)


class ProgressBars:
    """Draws ProgressEvents as one tqdm bar per stage (on stderr), and prints log lines above the bars."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.stage = None

    def log(self, message: str) -> None:
        if self.bar is not None:
            from tqdm.auto import tqdm

            tqdm.write(str(message), file=sys.stdout)
        else:
            print(message, flush=True)

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=100, desc=event.stage, unit="%", leave=False, file=sys.stderr,
                            bar_format="{desc:>10} {percentage:3.0f}%|{bar}| {elapsed} {postfix}")
        self.bar.n = round(100 * event.fraction)
        if event.message:
            self.bar.set_postfix_str(event.message[:60], refresh=False)
        self.bar.refresh()
        if event.fraction >= 1.0:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.stage = None, None


def run(args: argparse.Namespace) -> int:
    from hubquant.convert import convert

    opts = options_from_args(args)
    bars = ProgressBars(enabled=opts.progress)
    try:
        res = convert(opts, log=bars.log, on_event=bars)
    finally:
        bars.close()
    _print_result(res)
    if args.json:
        print(json.dumps({"target_repo": res.target_repo, "commit_url": res.commit_url, "skipped": res.skipped,
                          "out_dir": str(res.out_dir), "metrics": res.metrics, "settings_hash": res.settings_hash,
                          "base_sha": res.base_sha}))
    return 0


def _print_result(res) -> None:
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
