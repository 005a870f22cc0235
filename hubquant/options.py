"""`ConvertOptions`, declared once: each field carries its flag, help, and whether the card's command line and
the conversion service take it. argparse (`hubquant convert`), the card's command line and the service's
allow-list are all generated from these declarations.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from dataclasses import dataclass, field
from typing import Any

DEFAULT_IGNORE = ("lm_head",)


def opt(default: Any = None, *, flag: str | None = None, help: str = "", type: Any = None,
        choices: Any = None, action: str | None = None, card: bool | str = False, service: bool = False,
        group: str = "main", metavar: str | None = None, repr: bool = True, factory: Any = None) -> Any:
    """A ConvertOptions field with its command-line declaration.

    Args:
        flag: the CLI flag (None: not on the command line). type/choices/action/metavar: as in argparse;
            `choices` may be a callable (read at parser build time, e.g. from the method registry).
        card: True when the card's reproducing command line lists it (when it differs from the default);
            "calibrated" lists it only for runs that read calibration text.
        service: True when callers of the conversion service may set it (everything else is refused).
    """
    meta = dict(flag=flag, help=help, type=type, choices=choices, action=action, card=card, service=service,
                group=group, metavar=metavar)
    if factory is not None:
        return field(default_factory=factory, metadata=meta, repr=repr)
    return field(default=default, metadata=meta, repr=repr)


def _methods():
    from hubquant.methods import METHODS

    return list(METHODS)


def _presets():
    from hubquant.presets import PRESETS

    return list(PRESETS)


def _formats():
    from hubquant.formats import FORMATS

    return list(FORMATS)


CAL = "calibration and evaluation"


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """Everything `hubquant convert` takes. None means "the method's default".

    `repo_id` is a Hub repo id or a local folder. `ignore` adds Linear-name patterns to the default
    (lm_head) unless `default_ignore` is False. The field order is the card's command-line order.
    """

    repo_id: str = field(metadata=dict(
        help="base model: a Hub repo id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) or a local folder"))
    method: str = opt("rtn", flag="--method", choices=_methods, card=True,
                      help="quantization method (default rtn)")
    scheme: str | None = opt(flag="--scheme", type=str.upper, choices=_presets, card=True, metavar="PRESET",
                             help="a preset as llm-compressor names it (W4A16, W8A8, FP8_DYNAMIC, NVFP4A16, "
                                  "MXFP4A16, ...; hubquant.presets): sets bits, group size, symmetry and activations; "
                                  "--bits/--group-size/--sym/--asym/--activations may repeat but not contradict it")
    bits: int | None = opt(flag="--bits", type=int, card=True,
                           help="weight bits (method default: 4, or 8 for W8A8)")
    group_size: int | None = opt(flag="--group-size", type=int, card=True,
                                 help="input columns per scale; -1 = per output channel (default 128)")
    format: str | None = opt(flag="--format", choices=_formats, card=True, service=True,
                             help="checkpoint format (default: compressed-tensors; bitsandbytes for bnb-*)")
    activations: str | None = opt(flag="--activations", choices=["dynamic", "static"], card=True, service=True,
                                  help="W8A8/FP8 activation scales")
    gguf_type: str | None = opt(flag="--gguf-type", card=True, service=True, metavar="TYPE",
                                help="--format gguf: Q8_0, Q6_K, Q5_K_M, Q4_K_M (default), Q4_0, Q3_K_M or Q2_K; "
                                     "--method rtn = plain, imatrix = importance matrix, gptq = GPTQ + imatrix")
    gguf_split_size: str | None = opt(flag="--gguf-split-size", card=True, service=True, metavar="SIZE",
                                      help="--format gguf: shard files above SIZE as gguf-split does "
                                           "(default 48G; 0 = never)")
    revision: str | None = opt(flag="--revision", card=True, help="branch, tag or commit of the base (default main)")
    calib_dataset: str | None = opt(
        flag="--calib-dataset", card=True, service=True, group=CAL,
        help="built-in (fortunes, lee-news), a local file, or a Hub dataset ID[:CONFIG[:SPLIT[:COLUMN]]] "
             "(default: wikitext on the Hub, fortunes offline)")
    eval_dataset: str | None = opt(flag="--eval-dataset", card=True, service=True, group=CAL,
                                   help="held-out text, same syntax (default: wikitext test, lee-news offline)")
    symmetric: bool | None = opt(flag="--sym/--asym", card=True,
                                 help="symmetric weights/asymmetric weights (zero points)")
    ignore: tuple[str, ...] = opt((), flag="--ignore", action="extend", card=True, service=True, metavar="PATTERN",
                                  help="Linear names left unquantized, added to lm_head (suffix or re:REGEX; "
                                       "repeatable)")
    default_ignore: bool = opt(True, flag="--no-default-ignore", action="store_false", card=True, service=True,
                               help="quantize lm_head too (drop the default ignore list)")
    method_options: dict[str, Any] = opt(flag="--method-option", action="append", card=True, service=True,
                                         metavar="KEY=VALUE", factory=dict,
                                         help="method-specific option, e.g. damp=0.01, actorder=false, "
                                              "alpha=0.8 (repeatable)")
    num_samples: int = opt(128, flag="--num-samples", type=int, card="calibrated", service=True, group=CAL,
                           help="calibration samples (default 128)")
    seq_len: int = opt(2048, flag="--seq-len", type=int, card="calibrated", service=True, group=CAL,
                       help="tokens per calibration sample (default 2048)")
    base_model: str | None = opt(flag="--base-model", card=True,
                                 help="the Hub model a local folder derives from (the card's base_model)")
    output_dir: str | None = opt(flag="--output-dir",
                                 help="write the variant here: an empty or new folder, or a previous hubquant output "
                                      "(default: a temp folder)")
    push: bool = opt(False, flag="--push", action="store_true", help="push the variant to the Hub (one commit)")
    target_repo: str | None = opt(flag="--target-repo",
                                  help="NAMESPACE/NAME to push to (default {you}/{model}-{SCHEME}-{METHOD})")
    private: bool = opt(False, flag="--private", action="store_true", help="create the target repo private")
    max_ppl_increase: float | None = opt(flag="--max-ppl-increase", type=float, metavar="PCT",
                                         help="refuse to push when perplexity rises more than PCT percent")
    seed: int = opt(0, flag="--seed", type=int, service=True, group=CAL, help="calibration sampling seed")
    chat_template: bool = opt(False, flag="--chat-template", action="store_true", service=True, group=CAL,
                              help="format calibration text with the chat template")
    eval_windows: int = opt(8, flag="--eval-windows", type=int, service=True, group=CAL,
                            help="eval windows (default 8)")
    eval_seq_len: int = opt(512, flag="--eval-seq-len", type=int, service=True, group=CAL,
                            help="tokens per eval window (default 512)")
    skip_eval: bool = opt(False, flag="--skip-eval", action="store_true", service=True, group=CAL,
                          help="do not measure quality (the card says so)")
    leak_check: bool = opt(True, flag="--no-leak-check", action="store_false", service=True, group=CAL,
                           help="skip the calibration-leak check")
    device: str = opt("auto", flag="--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    streaming: str = opt("auto", flag="--streaming", choices=("auto", "on", "off"),
                         help="read, quantize and write one decoder layer at a time instead of loading the whole "
                              "model (auto: whenever the method, format and checkpoint allow it; same output bytes)")
    allow_pickle: bool = opt(False, flag="--allow-pickle", action="store_true",
                             help="allow .bin/.pt weights (can execute code)")
    trust_remote_code: bool = opt(False, flag="--trust-remote-code", action="store_true",
                                  help="allow the repo's own modeling code")
    progress: bool = opt(True, flag="--quiet", action="store_false", help="no progress bars")
    token: str | None = opt(repr=False)  # default: HF_TOKEN / login; never logged
    version: int = 1

    def __post_init__(self):
        # a list from JSON or argparse becomes a tuple (the options stay hashable and comparable)
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if isinstance(self.scheme, str):  # presets are upper-case names, as on the command line
            object.__setattr__(self, "scheme", self.scheme.upper())

    @property
    def ignored_patterns(self) -> tuple[str, ...]:
        """What stays unquantized: the default (lm_head) unless dropped, plus --ignore, without repeats."""
        base = DEFAULT_IGNORE if self.default_ignore else ()
        if self.format == "mxfp4":  # gpt-oss's MXFP4 layout quantizes experts only: attention stays float
            base = (*base, r"re:.*\.self_attn\..*")
        return tuple(dict.fromkeys((*base, *self.ignore)))


def declared() -> list[dataclasses.Field]:
    """The fields that have a command-line flag, in declaration order."""
    return [f for f in dataclasses.fields(ConvertOptions) if f.metadata.get("flag")]


def service_options() -> frozenset[str]:
    """The ConvertOptions fields callers of the conversion service may set."""
    return frozenset(f.name for f in dataclasses.fields(ConvertOptions) if f.metadata.get("service"))


# ---------------------------------------------------------------------------------------------- argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add `repo_id` and every declared flag to `p` (groups as declared)."""
    p.add_argument("repo_id", nargs="?", help=dataclasses.fields(ConvertOptions)[0].metadata["help"])
    groups: dict[str, Any] = {"main": p}
    for f in declared():
        m = f.metadata
        target = groups.get(m["group"]) or groups.setdefault(m["group"], p.add_argument_group(m["group"]))
        if "/" in m["flag"]:  # --sym/--asym: one field, two flags
            on, off = m["flag"].split("/")
            on_help, off_help = m["help"].split("/")
            g = target.add_mutually_exclusive_group()
            g.add_argument(on, dest=f.name, action="store_const", const=True, help=on_help)
            g.add_argument(off, dest=f.name, action="store_const", const=False, help=off_help)
            continue
        kw: dict[str, Any] = {"dest": f.name, "help": m["help"]}
        if m["action"] in ("store_true", "store_false"):
            kw["action"] = m["action"]
        elif m["action"] == "extend":
            kw.update(action="extend", nargs="+", default=[])
        elif m["action"] == "append":
            kw.update(action="append", default=[])
        else:
            kw["default"] = f.default
        if m["type"]:
            kw["type"] = m["type"]
        if m["choices"]:
            kw["choices"] = m["choices"]() if callable(m["choices"]) else m["choices"]
        if m["metavar"]:
            kw["metavar"] = m["metavar"]
        target.add_argument(m["flag"], **kw)


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def parse_method_options(items) -> dict[str, Any]:
    """["damp=0.01", "actorder=false"] -> {"damp": 0.01, "actorder": False}."""
    from hubquant.errors import UsageError

    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--method-option {item} is not KEY=VALUE", hint="e.g. --method-option damp=0.05")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def from_args(args: argparse.Namespace, **extra) -> ConvertOptions:
    """The ConvertOptions of parsed `hubquant convert` arguments.

    A repo id given after a greedy option (`--ignore a b REPO`) is taken back from that option.

    Raises:
        UsageError: no repo id, a bad --method-option, or a flag that needs --push.
    """
    from hubquant.errors import UsageError

    if args.repo_id is None and args.ignore:
        args.repo_id = args.ignore.pop()
    if not args.repo_id:
        raise UsageError("no model given", hint="run: hubquant convert REPO_ID_OR_FOLDER [options]")
    if args.target_repo and not args.push:
        raise UsageError("--target-repo only applies with --push", hint="add --push")
    if args.private and not args.push:
        raise UsageError("--private only applies with --push", hint="add --push")
    kw = {f.name: getattr(args, f.name) for f in declared()}
    kw["method_options"] = parse_method_options(args.method_options)
    return ConvertOptions(repo_id=args.repo_id, **kw, **extra)


# ---------------------------------------------------------------------------------------------- the card


def _flag_values(f: dataclasses.Field, value: Any) -> list[str]:
    flag = f.metadata["flag"]
    if "/" in flag:
        return [flag.split("/")[0 if value else 1]]
    if f.metadata["action"] in ("store_true", "store_false"):
        return [flag]
    if f.name == "method_options":
        return [x for k, v in sorted(value.items())
                for x in (flag, f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]
    if f.metadata["action"] == "extend":
        return [flag, *value]
    return [flag, str(value)]


def command_line(opts: ConvertOptions, *, calibrated: bool) -> str:
    """The CLI call that reproduces `opts` (for the card): every card field that differs from its default."""
    parts = ["hubquant", "convert", opts.repo_id]
    for f in declared():
        card = f.metadata["card"]
        if not card or (card == "calibrated" and not calibrated):
            continue
        value = getattr(opts, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if card is True and f.name != "method" and value == default:
            continue
        if f.name == "ignore":
            value = tuple(v for v in value if v not in DEFAULT_IGNORE or not opts.default_ignore)
            if not value:
                continue
        parts += _flag_values(f, value)
    return shlex.join(parts)
