"""The pipeline: resolve -> download -> load -> calibrate -> quantize -> write -> evaluate -> card -> push.

`convert(ConvertOptions(...))` is the one entry point the CLI, the Space, the watcher and the webhook
service share.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hubquant
from hubquant.errors import ConflictError, QualityGateError, UnsupportedError, UsageError
from hubquant.methods import QuantJob, get_method
from hubquant.quant import QuantScheme, valid_group_sizes

Log = Callable[[str], None]

# files copied from the base next to the quantized weights
COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
              "generation_config.json", "LICENSE", "LICENSE.txt", "NOTICE")


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """Everything `hubquant convert` takes. None means "the method's default"."""

    repo_id: str
    method: str = "rtn"
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    activations: str | None = None  # "dynamic" | "static" for W8A8/FP8 methods
    format: str | None = None
    revision: str | None = None
    ignore: tuple[str, ...] = ("lm_head",)
    output_dir: str | None = None
    push: bool = False
    target_repo: str | None = None
    private: bool = False
    max_ppl_increase: float | None = None
    calib_dataset: str | None = None
    eval_dataset: str | None = None
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    chat_template: bool = False
    eval_windows: int = 8
    eval_seq_len: int = 512
    skip_eval: bool = False
    leak_check: bool = True
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    method_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    token: str | None = field(default=None, repr=False)  # default: HF_TOKEN / login; never logged
    version: int = 1


@dataclass
class ConvertResult:
    out_dir: Path
    target_repo: str | None
    commit_url: str | None
    skipped: bool
    metrics: dict
    settings_hash: str
    base_sha: str
    timings: dict = field(default_factory=dict)
    message: str = ""


# ---------------------------------------------------------------------------------------------- settings


def resolve_scheme(opts: ConvertOptions) -> QuantScheme:
    """The method's default scheme with the user's overrides applied (and checked)."""
    return get_method(opts.method).resolve_scheme(bits=opts.bits, group_size=opts.group_size,
                                                  symmetric=opts.symmetric, activations=opts.activations)


def resolve_format(opts: ConvertOptions, scheme: QuantScheme) -> str:
    from hubquant.formats import resolve_format as resolve

    return resolve(get_method(opts.method), opts.format, scheme).name


def needs_calibration(opts: ConvertOptions, scheme: QuantScheme | None = None) -> bool:
    """Calibrated methods, static activation scales, and options that need data (e.g. FP8 smoothing)."""
    if opts.activations == "static":
        return True
    return get_method(opts.method).needs_calibration(scheme, opts.method_options)


def settings_of(opts: ConvertOptions, scheme: QuantScheme, fmt: str) -> dict:
    """What determines the variant's bytes (the idempotency key hashes this plus the base sha)."""
    calibrated = needs_calibration(opts, scheme)
    s = {
        "method": opts.method, "format": fmt, "scheme": dataclasses.asdict(scheme), "ignore": sorted(opts.ignore),
        "method_options": dict(sorted(opts.method_options.items())),
    }
    version = get_method(opts.method).algorithm_version
    if version is not None:
        s["algorithm_version"] = version
    if calibrated:
        s.update(calib_dataset=opts.calib_dataset, num_samples=opts.num_samples, seq_len=opts.seq_len,
                 seed=opts.seed, chat_template=opts.chat_template)
    return s


def settings_hash(base_repo: str, settings: dict) -> str:
    blob = json.dumps({"base": base_repo, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_target(repo_id: str, namespace: str, scheme: QuantScheme, method: str, fmt: str) -> str:
    return f"{namespace}/{repo_id.split('/')[-1]}-{get_method(method).variant_name(scheme, fmt)}"


def command_line(opts: ConvertOptions) -> str:
    """The CLI call that reproduces these options (for the card)."""
    parts = ["hubquant", "convert", opts.repo_id, "--method", opts.method]
    for flag, val in (("--bits", opts.bits), ("--group-size", opts.group_size), ("--format", opts.format),
                      ("--activations", opts.activations), ("--revision", opts.revision),
                      ("--calib-dataset", opts.calib_dataset), ("--eval-dataset", opts.eval_dataset)):
        if val is not None:
            parts += [flag, str(val)]
    if opts.symmetric is not None:
        parts.append("--sym" if opts.symmetric else "--asym")
    if tuple(opts.ignore) != ("lm_head",):
        parts += ["--ignore", *opts.ignore]
    for k, v in sorted(opts.method_options.items()):
        parts += ["--method-option", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    if needs_calibration(opts):
        parts += ["--num-samples", str(opts.num_samples), "--seq-len", str(opts.seq_len)]
    return shlex.join(parts)


# ---------------------------------------------------------------------------------------------- stages


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(path: Path, *, trust_remote_code: bool):
    """Load a causal LM with transformers in its checkpoint dtype, on CPU (methods move layers to the device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    arch = (config.architectures or [type(config).__name__])[0]
    if getattr(config, "quantization_config", None):
        raise UnsupportedError(f"{arch} checkpoint is already quantized "
                               f"({config.quantization_config.get('quant_method', '?')})",
                               hint="start from the float (bf16/fp16/fp32) base model")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise UnsupportedError(f"'{arch}' (model_type {config.model_type}) is not a causal language model "
                               "transformers knows", hint="hubquant converts decoder-only text generation models")
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.requires_grad_(False)  # inference only: methods edit weights in place
    return model.eval(), tokenizer


def check_group_size(model, scheme: QuantScheme, ignore) -> None:
    """Refuse group sizes that do not divide every quantized Linear's input size, naming them."""
    from hubquant.modeling import quantizable_linears

    gs = scheme.weights.group_size
    if gs == -1 or scheme.weights.type == "float":
        return
    in_features = {n: m.in_features for n, m in quantizable_linears(model, ignore).items()}
    bad = {n: k for n, k in in_features.items() if k % gs}
    if bad:
        sizes = sorted(set(bad.values()))
        ok = sorted(set.intersection(*(set(valid_group_sizes(k)) for k in set(in_features.values()))))
        names = ", ".join(list(bad)[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UsageError(
            f"group size {gs} does not divide the input size {sizes} of {names}",
            hint=f"use --group-size {' or '.join(map(str, ok))}" + (" or -1" if ok else "; or -1 (per channel)"),
        )


def _texts(spec: str):
    from hubquant.textdata import load_texts

    return load_texts(spec)


def _describe(scheme: QuantScheme) -> tuple[str, str, str]:
    w, a = scheme.weights, scheme.activations
    if w.type == "float":
        wd = "FP8 e4m3, per-channel scales" if (a is None or a.dynamic) else "FP8 e4m3, per-tensor scale"
    else:
        g = "per output channel" if w.group_size == -1 else f"groups of {w.group_size}"
        wd = f"INT{w.bits}, {'symmetric' if w.symmetric else 'asymmetric'}, {g}"
    if a is None:
        ad = "16-bit (not quantized)"
    else:
        kind = "FP8 e4m3" if a.type == "float" else f"INT{a.bits}"
        ad = f"{kind}, {'dynamic per token' if a.dynamic else 'static per tensor'}"
    if w.type == "float":
        hw = "fp8"
    elif a is not None:
        hw = "int8"
    else:
        hw = "w4a16" if w.bits < 8 else "w8a16"
    return wd, ad, hw


def convert(opts: ConvertOptions, log: Log = print) -> ConvertResult:
    """Run the whole pipeline. Raises hubquant errors (see hubquant.errors) and pushes nothing on failure."""
    from hubquant.hub import client

    t_start = time.time()
    timings: dict[str, float] = {}
    spec = get_method(opts.method)
    scheme = resolve_scheme(opts)
    fmt = resolve_format(opts, scheme)
    if opts.max_ppl_increase is not None and opts.skip_eval:
        raise UsageError("--max-ppl-increase needs the evaluation", hint="drop --skip-eval")
    if opts.num_samples < 1 or opts.seq_len < 16:
        raise UsageError("--num-samples must be >= 1 and --seq-len >= 16",
                         hint="use e.g. --num-samples 128 --seq-len 2048")
    settings = settings_of(opts, scheme, fmt)
    log(f"hubquant {hubquant.__version__}: {opts.repo_id} -> {scheme.name} {opts.method} ({fmt}); "
        f"{client.env_summary(opts.token)}")

    # 1. resolve the base and the target; stop early when the target is already up to date
    t = time.time()
    hf = client.api(opts.token)
    with client.hub_errors(opts.repo_id, revision=opts.revision, token=opts.token):
        info = hf.model_info(opts.repo_id, revision=opts.revision)
    base_sha = info.sha
    shash = settings_hash(opts.repo_id, settings)
    target = None
    if opts.push:
        namespace = client.whoami_name(opts.token) if not opts.target_repo else opts.target_repo.split("/")[0]
        target = opts.target_repo or default_target(opts.repo_id, namespace, scheme, opts.method, fmt)
        if "/" not in target:
            raise UsageError(f"--target-repo {target} needs a namespace", hint="use NAMESPACE/NAME")
        if target == opts.repo_id:
            raise UsageError("the target repo is the base repo", hint="pass another --target-repo")
        prov = client.read_provenance(target, opts.token)
        head = client.repo_head(target, opts.token)
        if prov is None and head is not None and _has_files(hf, target):
            raise ConflictError(f"{target} already exists and was not written by hubquant",
                                hint="pass another --target-repo")
        if prov is not None:
            if prov.get("base_model") != opts.repo_id:
                raise ConflictError(f"{target} holds a variant of {prov.get('base_model')}, not of {opts.repo_id}",
                                    hint="pass another --target-repo")
            if prov.get("base_sha") == base_sha and prov.get("settings_hash") == shash:
                msg = f"{target} is up to date (same base commit {base_sha[:10]} and settings): no new commit"
                log(msg)
                return ConvertResult(out_dir=Path(opts.output_dir or "."), target_repo=target, commit_url=None,
                                     skipped=True, metrics=prov.get("metrics", {}), settings_hash=shash,
                                     base_sha=base_sha, message=msg)
    timings["resolve"] = time.time() - t

    # 2. download (pinned to the resolved sha) and load
    t = time.time()
    log(f"downloading {opts.repo_id}@{base_sha[:10]} (safetensors, config, tokenizer, card)")
    dl = client.download_model(opts.repo_id, revision=base_sha, allow_pickle=opts.allow_pickle,
                               trust_remote_code=opts.trust_remote_code, progress=opts.progress, token=opts.token)
    timings["download"] = time.time() - t
    t = time.time()
    model, tokenizer = load_model(dl.path, trust_remote_code=opts.trust_remote_code)
    from hubquant.modeling import decoder_layers, model_dtype

    decoder_layers(model)  # unsupported layouts fail here, before any work
    check_group_size(model, scheme, opts.ignore)
    dtype = model_dtype(model)
    timings["load"] = time.time() - t
    log(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {dtype}) "
        f"in {timings['load']:.1f} s")

    # 3. data: eval text (always) and calibration text (calibrated methods), checked disjoint
    from hubquant import evaluate
    from hubquant.textdata import default_specs

    calib_default, eval_default = default_specs()
    eval_spec = opts.eval_dataset or eval_default
    needs_calib = needs_calibration(opts, scheme)
    calib = None
    eval_set = None
    eval_src = None
    if not opts.skip_eval:
        eval_src = _texts(eval_spec)
        eval_set = evaluate.build_eval_set(tokenizer, eval_src.texts, spec=eval_spec, description=eval_src.description,
                                           n_windows=opts.eval_windows, seq_len=opts.eval_seq_len)
    if needs_calib:
        t = time.time()
        from hubquant.calibration import build_calibration, check_disjoint

        calib = build_calibration(tokenizer, spec=opts.calib_dataset or calib_default, num_samples=opts.num_samples,
                                  seq_len=opts.seq_len, seed=opts.seed, chat_template=opts.chat_template,
                                  model_max_len=getattr(model.config, "max_position_embeddings", None))
        if eval_src is not None:
            check_disjoint(calib, eval_src.texts)
        timings["calibration_data"] = time.time() - t
        log(f"calibration: {calib.num_samples} x {calib.seq_len} tokens of {calib.description}")

    # 4. base reference numbers (before the weights change)
    ref = None
    if eval_set is not None:
        t = time.time()
        with evaluate.on_device(model, _pick_device(opts.device), log):
            ref = evaluate.reference(model, eval_set, progress=opts.progress)
        timings["eval_base"] = time.time() - t
        log(f"base perplexity {ref.perplexity:.3f} on {eval_set.n_tokens} tokens of {eval_set.description}")
    leak_base = leak_docs = None
    if calib is not None and opts.leak_check and not opts.skip_eval:
        # measured on the base now, on the variant after quantization (no second copy of the model)
        from hubquant.leakcheck import memorization_rates

        leak_docs = _leak_documents(calib, eval_src)
        with evaluate.on_device(model, _pick_device(opts.device), log):
            leak_base = memorization_rates(model, tokenizer, *leak_docs)

    # 5. quantize (layer by layer)
    t = time.time()
    device = _pick_device(opts.device)
    method_options = spec.parse_options(opts.method_options)
    job = QuantJob(scheme=scheme, ignore=tuple(opts.ignore), calib=None if calib is None else calib.ids,
                   options=method_options, device=device, progress=opts.progress)
    quantized = spec.load()(model, job)
    timings["quantize"] = time.time() - t
    log(f"quantized {len(quantized)} Linear layers with {opts.method} in {timings['quantize']:.1f} s")

    # 6. write
    t = time.time()
    from hubquant.formats import get_format

    tmp_root = None
    if opts.output_dir:
        out_dir = Path(opts.output_dir)
        if out_dir.exists() and any(out_dir.iterdir()):
            shutil.rmtree(out_dir)
    else:
        tmp_root = Path(tempfile.mkdtemp(prefix="hubquant-"))
        out_dir = tmp_root / "variant"
    out_dir.mkdir(parents=True, exist_ok=True)
    qc = get_format(fmt)(model, quantized, scheme=scheme, out_dir=out_dir, method=opts.method,
                         options=method_options)
    for name in COPY_FILES:
        src = dl.path / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
    timings["write"] = time.time() - t

    # 7. evaluate the variant (the model in memory now computes what the files hold)
    metrics: dict = {}
    leak = None
    if ref is not None:
        t = time.time()
        with evaluate.on_device(model, device, log):
            cmp = evaluate.compare(model, eval_set, ref, progress=opts.progress)
        metrics = cmp.as_dict()
        timings["eval_variant"] = time.time() - t
        log(f"variant perplexity {cmp.perplexity:.3f} ({cmp.ppl_increase_pct:+.2f}%), "
            f"top-1 agreement {100 * cmp.top1_agreement:.1f}%, KL {cmp.mean_kl:.4f}")
        if leak_base is not None:
            from hubquant.leakcheck import leak_report, memorization_rates

            with evaluate.on_device(model, device, log):
                leak = leak_report(leak_base, memorization_rates(model, tokenizer, *leak_docs))
            log(f"calibration-leak check: score {leak['leak_score']:+.3f} (warn above {leak['threshold']})")
            if leak["warn"]:
                log("WARNING: the variant continues calibration text verbatim more often than the base does: "
                    "calibrate on more varied text or fewer samples")
    size = evaluate.folder_size(out_dir)
    base_size = evaluate.folder_size(dl.path)
    metrics.update(size_bytes=size, base_size_bytes=base_size)

    # 8. provenance + card
    wd, ad, hw = _describe(scheme)
    provenance = {
        "hubquant_version": hubquant.__version__, "base_model": opts.repo_id, "base_sha": base_sha,
        "settings": settings, "settings_hash": shash, "scheme_name": scheme.name, "metrics": metrics,
        "calibration": None if calib is None else {"spec": calib.spec, "description": calib.description,
                                                   "num_samples": calib.num_samples, "seq_len": calib.seq_len},
        "evaluation": None if eval_set is None else {"spec": eval_set.spec, "description": eval_set.description,
                                                      "tokens": eval_set.n_tokens},
        "leak_check": leak, "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    (out_dir / client.PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    from hubquant.card import DEQUANTIZE_NOTE, CardInputs, render, save
    from hubquant.formats.common import ignored_linears

    card_inputs = CardInputs(
        target_repo=target or default_target(opts.repo_id, "local", scheme, opts.method, fmt),
        base_model=opts.repo_id, base_sha=base_sha, base_card_path=dl.path / "README.md", method=opts.method,
        method_summary=spec.summary, scheme_name=scheme.name, weights_desc=wd, acts_desc=ad, format=fmt,
        quant_method=qc.get("quant_method", fmt),
        ignored=sorted(ignored_linears(model, quantized)),
        calib_desc=calib.description if calib else "none (no calibration needed)",
        calib_spec=calib.spec if calib else None,
        eval_desc=eval_set.description if eval_set else "not evaluated", eval_spec=eval_spec,
        metrics=metrics if ref is not None else {}, size_bytes=size, base_size_bytes=base_size, settings=settings,
        settings_hash=shash, command=command_line(opts), hubquant_version=hubquant.__version__, hardware_key=hw,
        leak=leak, endpoint=client.endpoint(),
        dequantize_note=DEQUANTIZE_NOTE if qc.get("dequantize") else "",
    )
    save(render(card_inputs), card_inputs, out_dir)
    log(f"wrote {out_dir} ({size / 1e6:.1f} MB, base {base_size / 1e6:.1f} MB)")

    # 9. quality gate, then push in one commit
    if opts.max_ppl_increase is not None and metrics:
        if metrics["ppl_increase_pct"] > opts.max_ppl_increase:
            if tmp_root is not None:
                shutil.rmtree(tmp_root, ignore_errors=True)
            raise QualityGateError(
                f"perplexity rose {metrics['ppl_increase_pct']:.2f}% (gate: {opts.max_ppl_increase}%); "
                "nothing was pushed",
                hint="try a better method (gptq, awq), more bits or a smaller group size, or raise --max-ppl-increase")
    commit_url = None
    if opts.push:
        t = time.time()
        log(f"pushing {out_dir.name} to {client.hub_url(target)} in one commit")
        commit_url = client.push_folder(
            out_dir, target, private=opts.private,
            message=f"hubquant: {scheme.name} {opts.method} of {opts.repo_id}@{base_sha[:10]}",
            description=f"settings hash {shash}; {command_line(opts)}",
            parent_commit=client.repo_head(target, opts.token), token=opts.token)
        timings["push"] = time.time() - t
        log(f"pushed: {commit_url}")
        if tmp_root is not None:  # nothing asked to keep the files: the Hub has them now
            shutil.rmtree(tmp_root, ignore_errors=True)
    timings["total"] = time.time() - t_start
    result = ConvertResult(out_dir=out_dir, target_repo=target, commit_url=commit_url, skipped=False,
                           metrics=metrics, settings_hash=shash, base_sha=base_sha, timings=timings)
    log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return result


def _has_files(hf, repo_id: str) -> bool:
    try:
        files = hf.list_repo_files(repo_id)
    except Exception:
        return False
    return any(f not in (".gitattributes",) for f in files)


def _leak_documents(calib, eval_src) -> tuple[list[str], list[str]]:
    """Calibration documents, and held-out documents of the same source (else the eval text)."""
    used = set(calib.texts)
    try:
        rest = [t for t in _texts(calib.spec).texts if t not in used]
    except Exception:  # the source was loadable a moment ago; fall back rather than fail the conversion
        rest = []
    heldout = rest if len(rest) >= 8 else list(eval_src.texts)
    return list(calib.texts), heldout
