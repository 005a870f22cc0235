"""The pipeline's stages: resolve -> download -> load -> calibrate -> baseline -> quantize -> write -> evaluate
-> card -> push (the calibration-leak check runs beside the two evaluations).

Each stage is a function of a `Run` (the plan plus what earlier stages produced), callable and testable alone.
Each reports `ProgressEvent`s (stage, fraction, message) to `Run.emit`: the CLI draws them as progress bars, the
Space and the conversion service show and store them. `Run.timings` holds each stage's seconds; they add up to
the run's total.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubquant.errors import (
    ConflictError,
    HubquantError,
    QualityGateError,
    UnsupportedError,
)
from hubquant.plan import Plan

EVAL_RESULTS = ".eval_results/perplexity.yaml"  # the Hub's evaluation-results file (written with the card)

# the stages, in order (an event's `stage` is one of these)
STAGES = ("resolve", "download", "load", "calibrate", "baseline", "leak_check", "quantize", "write", "evaluate",
          "card", "push")

# files copied from the base next to the quantized weights
COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
              "generation_config.json", "LICENSE", "LICENSE.txt", "NOTICE",
              # vision-language processors
              "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a conversion: `fraction` (0..1) of `stage` is done; `message` says what happened."""

    stage: str
    fraction: float
    message: str = ""
    seconds: float = 0.0  # since the stage started

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "fraction": round(self.fraction, 4), "message": self.message,
                "seconds": round(self.seconds, 3)}


Log = Callable[[str], None]
OnEvent = Callable[[ProgressEvent], None]


@dataclass
class Run:
    """The state a conversion carries from stage to stage."""

    plan: Plan
    log: Log = print
    on_event: OnEvent | None = None
    device: str = "cpu"
    timings: dict[str, float] = field(default_factory=dict)
    texts: Any = None  # preflight.TextSpecs
    path: Path | None = None  # the base's files
    model: Any = None
    tokenizer: Any = None
    calib: Any = None
    eval_set: Any = None
    ref: Any = None
    leak_docs: tuple | None = None
    leak_base: Any = None
    quantized: dict | None = None
    routing: Any = None  # hubquant.moe.RoutingPolicy of a mixture-of-experts run
    weights: Any = None  # hubquant.streaming.Weights (a streamed run) and its EvalStreams
    streams: Any = None
    out_dir: Path | None = None
    kept_files: set = field(default_factory=set)  # files of --output-dir from before a streamed run (not ours)
    tmp_root: Path | None = None
    written: list[str] = field(default_factory=list)
    quant_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    leak: dict | None = None
    commit_url: str | None = None
    skipped: bool = False
    message: str = ""
    _stage: str = ""
    _t0: float = 0.0

    @property
    def opts(self):
        return self.plan.opts

    def emit(self, fraction: float, message: str = "") -> None:
        """Report progress inside the current stage (0 and 1 are the stage's own start and end events)."""
        self._send(min(0.99, max(0.01, fraction)), message)

    def _send(self, fraction: float, message: str = "") -> None:
        if self.on_event is not None:
            self.on_event(ProgressEvent(self._stage, fraction, message, time.time() - self._t0))

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage (added to `timings[name]`) and report its start and end."""
        self._stage, self._t0 = name, time.time()
        self._send(0.0)
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - self._t0
        self._send(1.0)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ---------------------------------------------------------------------------------------------- before weights


def resolve(plan: Plan, *, log: Log = print, on_event: OnEvent | None = None) -> Run:
    """Everything checked before downloading: options, write access, config.json, text sources, output folder.

    Raises:
        ConflictError: the target holds another base or files hubquant did not write. UsageError,
        NotFoundError, AuthError, UnsupportedError, CorruptFileError: from the checks (see hubquant.preflight).
    """
    from hubquant import preflight

    run = Run(plan=plan, log=log, on_event=on_event, device=pick_device(plan.opts.device))
    with run.stage("resolve"):
        if plan.action == "conflict":
            raise ConflictError(plan.reason, hint="pass another --target-repo")
        if plan.action == "skip":
            run.skipped, run.message = True, (f"{plan.target} is up to date (same base commit {plan.base.sha[:10]} "
                                              "and settings): no new commit")
            log(run.message)
            return run
        preflight.check_method_options(plan.opts.method, plan.opts.method_options)
        preflight.check_output_dir(plan.opts.output_dir)
        preflight.check_write_access(plan)
        run.emit(0.3, "write access checked" if plan.target else "options checked")
        preflight.check_config(plan, preflight.read_config(plan))
        run.emit(0.5, "config.json checked")
        run.texts = preflight.check_texts(plan)
        run.emit(0.9, "text sources checked")
    return run


def download(run: Run) -> Path:
    """The base's files: the Hub snapshot at the resolved commit, or the local folder checked in place."""
    from hubquant.hub import client

    base, opts = run.plan.base, run.opts
    with run.stage("download"):
        if base.folder is not None:
            run.log(f"reading the local folder {base.folder} (content {base.sha[:17]})")
            _check_local_weights(base.folder, opts.allow_pickle)
            client.verify_safetensors(base.folder)
            run.path = base.folder
        else:
            run.log(f"downloading {base.id}@{base.sha[:10]} (safetensors, config, tokenizer, card)")
            from huggingface_hub import constants

            with disk_errors(Path(constants.HF_HUB_CACHE)):
                _fault("download")
                dl = client.download_model(base.id, revision=base.sha, allow_pickle=opts.allow_pickle,
                                           trust_remote_code=opts.trust_remote_code, progress=opts.progress,
                                           token=opts.token)
            run.path = dl.path
    return run.path


def _check_local_weights(folder: Path, allow_pickle: bool) -> None:
    from hubquant.errors import NotFoundError

    if any(folder.glob("*.safetensors")):
        return
    pickles = [p.name for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in folder.glob(pat)]
    if not pickles:
        raise NotFoundError(f"{folder} has no model weights (no .safetensors files)",
                            hint="save the model with save_pretrained(..., safe_serialization=True)")
    if not allow_pickle:
        raise UnsupportedError(f"{folder} holds only pickled weights ({pickles[0]}); loading them can execute code",
                               hint="convert the weights to safetensors, or pass --allow-pickle if you trust them")


# ---------------------------------------------------------------------------------------------- model and data


def load_model(path: Path, *, trust_remote_code: bool):
    """Load a causal LM with transformers in its checkpoint dtype, on CPU (methods move layers to the device).

    Raises:
        UnsupportedError: an already quantized checkpoint, or not a causal LM. CorruptFileError: a tokenizer
        that does not load.
    """
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from hubquant import moe_gptoss
    from hubquant.modeling import VISION_LANGUAGE, auto_class, supported_hint

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    arch = (config.architectures or [type(config).__name__])[0]
    load_kw = moe_gptoss.source_load_kwargs(config, arch)  # raises for quantized ones it cannot dequantize
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in VISION_LANGUAGE \
            and not trust_remote_code:
        raise UnsupportedError(f"'{arch}' (model_type {config.model_type}) is not a causal language model "
                               "transformers knows", hint=supported_hint())
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    # dequantize-on-load leaves a float model without quantization_config (HfQuantizer.remove_quantization_config)
    model = auto_class(config).from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **load_kw)
    model.requires_grad_(False)  # inference only: methods edit weights in place
    return model.eval(), tokenizer


def load_tokenizer(path: Path, *, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from hubquant.errors import CorruptFileError

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # tokenizers/transformers raise many types for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CorruptFileError(f"the tokenizer of {path.name} does not load: {type(e).__name__}: {first}",
                               hint="fix or re-upload the tokenizer files (tokenizer.json, tokenizer_config.json)"
                               ) from e


def check_group_size(model, scheme, ignore, *, own_grids: bool = False) -> None:
    """Refuse group sizes that do not divide every quantized Linear's input size (any for formats' own grids)."""
    from hubquant.errors import UsageError
    from hubquant.modeling import quantizable_linears
    from hubquant.quant import valid_group_sizes

    gs = scheme.weights.group_size
    if gs == -1 or scheme.weights.type == "float" or own_grids:  # GGUF's block types pick their fallbacks
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


def load(run: Run) -> None:
    """The base model and tokenizer, checked against the scheme; logs what stays unquantized."""
    from hubquant import streaming
    from hubquant.modeling import decoder_layers, model_dtype, quantizable_linears

    with run.stage("load"):
        run.weights = streaming.open_for(run.opts.streaming, method=run.opts.method, fmt=run.plan.format,
                                         path=run.path, trust_remote_code=run.opts.trust_remote_code, log=run.log)
        model, tokenizer = (run.weights.model, load_tokenizer(run.path, trust_remote_code=run.opts.trust_remote_code)
                            ) if run.weights is not None else \
            load_model(run.path, trust_remote_code=run.opts.trust_remote_code)
        decoder_layers(model)  # unsupported layouts fail here, before any work
        _experts(run, model)
        check_group_size(model, run.plan.scheme, run.opts.ignored_patterns, own_grids=run.plan.format_spec.own_grids)
        run.model, run.tokenizer = model, tokenizer
        kept = unquantized(model, set(quantizable_linears(model, run.opts.ignored_patterns)))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        run.log(f"loaded {type(model).__name__} ({params:.1f}M params, {model_dtype(model)}) "
                f"in {time.time() - run._t0:.1f} s")
        run.log(f"left unquantized ({len(kept)} Linear layers, --ignore {' '.join(run.opts.ignored_patterns) or '-'}"
                f"): {_short(kept)}")


def _experts(run: Run, model) -> None:
    """Mixture of experts: per-expert Linears (hubquant.moe), and the scheme their checkpoint can hold."""
    import dataclasses

    from hubquant import moe

    if not moe.unfuse_experts(model):
        return
    run.log(f"mixture of experts: {len(moe.expert_linear_names(model))} expert projections as per-expert Linears")
    scheme = moe.checkpoint_scheme(model, run.plan.scheme, run.plan.format, asym_requested=run.opts.symmetric is False,
                                   log=run.log)
    if scheme != run.plan.scheme:  # the settings hash stays the requested settings' (reruns stay idempotent)
        run.plan = dataclasses.replace(run.plan, scheme=scheme,
                                       settings={**run.plan.settings, "scheme": dataclasses.asdict(scheme)})


def unquantized(model, quantized_names) -> list[str]:
    from hubquant.formats.common import ignored_linears

    return sorted(ignored_linears(model, quantized_names))


def _short(names: list[str], n: int = 6) -> str:
    return (", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")) or "nothing"


def calibrate(run: Run) -> None:
    """The evaluation windows and (for calibrated runs) the calibration windows, checked disjoint."""
    from hubquant import evaluate

    opts, texts = run.opts, run.texts
    with run.stage("calibrate"):
        if texts.eval_src is not None:
            src = texts.eval_src
            run.eval_set = evaluate.build_eval_set(run.tokenizer, src.texts, spec=texts.eval_spec,
                                                   description=src.description, n_windows=opts.eval_windows,
                                                   seq_len=opts.eval_seq_len)
            run.emit(0.3, f"evaluation: {run.eval_set.n_tokens} tokens")
        if texts.calib_spec is not None:
            from hubquant.calibration import build_calibration, check_disjoint

            run.calib = build_calibration(
                run.tokenizer, spec=texts.calib_spec, num_samples=opts.num_samples, seq_len=opts.seq_len,
                seed=opts.seed, chat_template=opts.chat_template,
                model_max_len=getattr(run.model.config, "max_position_embeddings", None))
            if texts.eval_src is not None:
                check_disjoint(run.calib, texts.eval_src.texts)
            run.log(f"calibration: {run.calib.num_samples} x {run.calib.seq_len} tokens of {run.calib.description}")


def baseline(run: Run) -> None:
    """The base model's reference numbers, before the weights change."""
    from hubquant import evaluate
    from hubquant.streaming import pipeline as streamed

    if run.eval_set is None:
        return
    with run.stage("baseline"):
        if run.weights is not None:  # streamed: measured during the pass over the layers
            return streamed.baseline(run)
        with evaluate.on_device(run.model, run.device, run.log):
            run.ref = evaluate.reference(run.model, run.eval_set, progress=run.opts.progress)
        run.log(f"base perplexity {run.ref.perplexity:.3f} on {run.eval_set.n_tokens} tokens of "
                f"{run.eval_set.description}")


def leak_check(run: Run, which: str) -> None:
    """Calibration-leak check: memorisation rates of the base (`which="base"`, before quantizing) or of the
    variant (`"variant"`, after), reported with progress and timed as one stage."""
    from hubquant import evaluate
    from hubquant.leakcheck import leak_documents, leak_report, memorization_rates
    from hubquant.streaming import pipeline as streamed

    if run.calib is None or not run.opts.leak_check or run.texts.eval_src is None:
        return
    if which == "variant" and run.leak_base is None and run.weights is None:
        return
    with run.stage("leak_check"):
        if run.weights is not None:  # streamed: the documents' activations pass through each layer with the rest
            run.leak = streamed.leak_check(run, which)
            return _log_leak(run)
        if run.leak_docs is None:
            run.leak_docs = leak_documents(run.calib, run.texts.eval_src)
        half = 0.0 if which == "base" else 0.5

        def step(done: int, total: int) -> None:
            run.emit(half + 0.5 * done / max(1, total), f"{which}: {done}/{total} batches")

        with evaluate.on_device(run.model, run.device, run.log):
            rates = memorization_rates(run.model, run.tokenizer, *run.leak_docs, on_batch=step)
        if which == "base":
            run.leak_base = rates
            return
        run.leak = leak_report(run.leak_base, rates)
        _log_leak(run)


def _log_leak(run: Run) -> None:
    if run.leak is None:
        return
    run.log(f"calibration-leak check: score {run.leak['leak_score']:+.3f} (warn above {run.leak['threshold']})")
    if run.leak["warn"]:
        run.log("WARNING: the variant continues calibration text verbatim more often than the base does: "
                "calibrate on more varied text or fewer samples")


def quantize(run: Run) -> None:
    """Quantize layer by layer with the plan's method (the model in memory then computes the variant)."""
    from hubquant import moe_pipeline
    from hubquant.methods import QuantJob, get_method
    from hubquant.streaming import pipeline as streamed

    opts = run.opts
    with run.stage("quantize"):
        spec = get_method(opts.method)
        job = QuantJob(scheme=run.plan.scheme, ignore=opts.ignored_patterns,
                       calib=None if run.calib is None else run.calib.ids,
                       options=spec.parse_options(opts.method_options), device=run.device, progress=opts.progress)
        if run.weights is not None:  # streamed: each layer is written as soon as it is quantized
            streamed.quantize(run, job, output_folder(run))
        else:
            run.quantized, run.routing = moe_pipeline.quantize_with_policy(  # GGUF: the format's own quantizer
                run.model, job, run.plan.format_spec.method_fn(spec, run), options=opts.method_options, log=run.log)
        run.log(f"quantized {len(run.quantized)} Linear layers with {opts.method} in {time.time() - run._t0:.1f} s")


# ---------------------------------------------------------------------------------------------- files


def output_folder(run: Run) -> Path:
    """--output-dir (new, empty, or a previous hubquant output whose own files are removed), else a temp folder."""
    from hubquant.preflight import check_output_dir, previous_files

    if not run.opts.output_dir:
        run.tmp_root = Path(tempfile.mkdtemp(prefix="hubquant-"))
        return run.tmp_root / "variant"
    out = Path(run.opts.output_dir)
    check_output_dir(run.opts.output_dir)
    if out.is_dir():
        root = out.resolve()
        for rel in previous_files(out) or []:
            p = (out / rel).resolve()
            if p.is_file() and root in p.parents:
                p.unlink()
    return out


def _fault(point: str) -> None:
    """Fault injection for tests: HUBQUANT_FAULT=write:enospc (or download:enospc) fails that stage as a full
    disk does."""
    if os.environ.get("HUBQUANT_FAULT") == f"{point}:enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def write(run: Run) -> Path:
    """The format's files plus the base's tokenizer and generation files."""
    from hubquant import moe, moe_pipeline
    from hubquant.formats import get_format
    from hubquant.methods import get_method

    plan, opts = run.plan, run.opts
    with run.stage("write"):
        streamed = run.weights is not None
        run.out_dir = out = run.out_dir if streamed else output_folder(run)
        out.mkdir(parents=True, exist_ok=True)
        before = run.kept_files if streamed else {p for p in out.rglob("*")}
        with disk_errors(out):
            _fault("write")
            options = plan.format_spec.write_options(run, get_method(opts.method).parse_options(opts.method_options))
            if not streamed:
                run.quant_config = get_format(plan.format)(run.model, run.quantized, scheme=plan.scheme,
                                                           out_dir=out, method=opts.method, options=options)
            if not streamed and plan.format == "compressed-tensors" and moe.expert_modules(run.model):
                checked = moe_pipeline.verify_written(run.model, run.quantized, plan.scheme, out)
                run.log(f"moe: {checked} expert projections on disk match the evaluated model")
            for name in COPY_FILES if plan.format_spec.copy_base_files else ():
                src = run.path / name
                if src.is_file():
                    shutil.copyfile(src, out / name)
        run.written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p not in before)
    return out


@contextlib.contextmanager
def disk_errors(folder: Path):
    """A full disk (or a quota) becomes one line that says where and what to do."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise HubquantError(f"no space left on the device while writing {folder}",
                            hint="free disk space, or pass --output-dir on a disk with room (a variant needs "
                                 "about half the base's size)") from None


def evaluate_variant(run: Run) -> None:
    """The variant (in memory: the model now computes what the files hold) against the base's numbers."""
    from hubquant import evaluate
    from hubquant.streaming import pipeline as streamed

    if run.ref is not None or (run.streams is not None and run.streams.reference is not None):
        with run.stage("evaluate"):
            if run.weights is not None:  # streamed: from the variant's last-layer activations
                run.ref, cmp = streamed.evaluate(run)
                run.log(f"base perplexity {run.ref.perplexity:.3f} on {run.eval_set.n_tokens} tokens")
            else:
                with evaluate.on_device(run.model, run.device, run.log):
                    cmp = evaluate.compare(run.model, run.eval_set, run.ref, progress=run.opts.progress)
            run.metrics = cmp.as_dict()
            run.log(f"variant perplexity {cmp.perplexity:.3f} ({cmp.ppl_increase_pct:+.2f}%), "
                    f"top-1 agreement {100 * cmp.top1_agreement:.1f}%, KL {cmp.mean_kl:.4f}")
    run.metrics.update(size_bytes=evaluate.folder_size(run.out_dir), base_size_bytes=evaluate.folder_size(run.path))


def check_gate(run: Run) -> None:
    """The quality gate (--max-ppl-increase): nothing is pushed when perplexity rose more than allowed."""
    gate, m = run.opts.max_ppl_increase, run.metrics
    if "perplexity" in m and not all(math.isfinite(m[k]) for k in ("perplexity", "top1_agreement", "mean_kl")):
        raise QualityGateError(f"the variant's outputs are not finite (perplexity {m['perplexity']}); "
                               "nothing was pushed", hint="report the model and method; try --method rtn or more bits")
    if gate is not None and "ppl_increase_pct" in m and m["ppl_increase_pct"] > gate:
        raise QualityGateError(
            f"perplexity rose {m['ppl_increase_pct']:.2f}% (gate: {gate}%); nothing was pushed",
            hint="try a better method (gptq, awq), more bits or a smaller group size, or raise --max-ppl-increase")


def push(run: Run) -> str | None:
    """One commit on top of the target commit the plan read: a concurrent push makes this a conflict (exit 7)
    or, when the other run wrote the same variant, a no-op."""
    from hubquant.hub import client
    from hubquant.plan import plan as make_plan

    plan, opts = run.plan, run.opts
    if not opts.push:
        return None
    with run.stage("push"):
        parent = plan.target_head
        if parent is None:
            parent = client.create_new_repo(plan.target, private=opts.private, token=opts.token)
            if parent is None:  # someone created it since the plan: look again
                again = make_plan(opts)
                if again.action == "skip":
                    run.skipped, run.message = True, f"{plan.target} was written meanwhile with the same settings"
                    run.log(run.message)
                    return None
                raise ConflictError(f"{plan.target} was created by another run while this one worked",
                                    hint="run the command again")
        run.log(f"pushing {len(run.written)} files to {client.hub_url(plan.target)} in one commit")
        command = card_command(plan)
        run.commit_url = client.push_folder(
            run.out_dir, plan.target, private=opts.private, files=run.written,
            message=f"hubquant: {plan.scheme.name} {opts.method} of {plan.base.id}@{plan.base.sha[:10]}",
            description=f"settings hash {plan.settings_hash}; {command}", parent_commit=parent, token=opts.token)
        run.log(f"pushed: {run.commit_url}")
    return run.commit_url


def card_command(plan: Plan) -> str:
    from hubquant.options import command_line

    return command_line(plan.opts, calibrated=plan.calibrated)


def provenance(run: Run, card_files: set[str]) -> dict:
    import hubquant
    from hubquant import moe

    plan, calib, ev = run.plan, run.calib, run.eval_set
    return {
        "hubquant_version": hubquant.__version__, "base_model": plan.base.id, "base_sha": plan.base.sha,
        "settings": plan.settings, "settings_hash": plan.settings_hash, "scheme_name": plan.scheme.name,
        "metrics": run.metrics,
        "calibration": None if calib is None else {"spec": calib.spec, "description": calib.description,
                                                   "num_samples": calib.num_samples, "seq_len": calib.seq_len},
        "evaluation": None if ev is None else {"spec": ev.spec, "description": ev.description, "tokens": ev.n_tokens},
        "moe": moe.report(run.model, run.quantized, run.routing), "leak_check": run.leak,
        "timings_s": {k: round(v, 2) for k, v in run.timings.items()},
        "files": sorted(set(run.written) | card_files),
    }


def card(run: Run) -> None:
    """hubquant.json (provenance), the model card and the Hub's evaluation-results file."""
    from hubquant import moe
    from hubquant.card import eval_results_yaml, render, save
    from hubquant.cardinputs import card_inputs
    from hubquant.hub import client

    with run.stage("card"):
        inputs = card_inputs(run)
        card_files = {"README.md"} | ({EVAL_RESULTS} if eval_results_yaml(inputs) else set())
        with disk_errors(run.out_dir):
            (run.out_dir / client.PROVENANCE_FILE).write_text(
                json.dumps(provenance(run, card_files), indent=2, sort_keys=True) + "\n")
            rendered = render(inputs)
            rendered.text += moe.card_section(run.model, run.quantized, run.routing, fmt=run.plan.format)
            save(rendered, inputs, run.out_dir)
        run.written = sorted(set(run.written) | card_files | {client.PROVENANCE_FILE})
        m = run.metrics
        run.log(f"wrote {run.out_dir} ({m['size_bytes'] / 1e6:.1f} MB, base {m['base_size_bytes'] / 1e6:.1f} MB)")
