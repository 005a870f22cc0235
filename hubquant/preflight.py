"""Everything that can be checked before downloading weights: method options, write access to the target,
the base's config.json (valid, a causal LM transformers knows, an architecture the method supports, a group
size that divides its dimensions), the calibration and evaluation text, and the output folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hubquant.errors import (
    CorruptFileError,
    NotFoundError,
    UnsupportedError,
    UsageError,
)
from hubquant.plan import Plan

# a folder hubquant wrote holds this file (the provenance); its "files" lists what hubquant wrote there
PROVENANCE_FILE = "hubquant.json"

def check_method_options(method: str, options: dict) -> None:
    """Unknown keys and bad values of --method-option, for every method (its registry entry parses them).

    Raises:
        UsageError: naming the key or value and the accepted ones.
    """
    from hubquant.methods import get_method

    get_method(method).parse_options(options)


def check_write_access(plan: Plan) -> None:
    """With --push: the token may write to the target's namespace (checked before anything is downloaded)."""
    from hubquant.hub import client

    if plan.target:
        client.check_write_access(plan.target, plan.opts.token)


# ---------------------------------------------------------------------------------------------- config.json


def read_config(plan: Plan) -> dict:
    """The base's config.json (only that file is fetched from the Hub).

    Raises:
        NotFoundError: no config.json. CorruptFileError: not a JSON object.
    """
    from hubquant.hub import client

    base = plan.base
    if base.folder is not None:
        path = base.folder / "config.json"
        if not path.is_file():
            raise NotFoundError(f"{plan.opts.repo_id} has no config.json",
                                hint="point at a folder written by save_pretrained (config.json + safetensors)")
    else:
        path = client.download_file(base.id, "config.json", revision=base.sha, token=plan.opts.token)
        if path is None:
            raise NotFoundError(f"{base.id} has no config.json", hint="hubquant needs a transformers model repo")
    try:
        config = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise CorruptFileError(f"config.json of {plan.opts.repo_id} is not valid JSON{where}",
                               hint="fix config.json (it is the model's transformers config)") from None
    if not isinstance(config, dict):
        raise CorruptFileError(f"config.json of {plan.opts.repo_id} is not a JSON object",
                               hint="fix config.json (it is the model's transformers config)")
    return config


def check_config(plan: Plan, config: dict) -> None:
    """The architecture: known to transformers, a causal LM, not already quantized, supported by the method.

    Raises:
        UnsupportedError: with the reason and what to use instead.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    opts, name = plan.opts, plan.opts.repo_id
    mtype = config.get("model_type")
    arch = (config.get("architectures") or [mtype])[0]
    if config.get("auto_map") and not opts.trust_remote_code:
        raise UnsupportedError(f"{name} needs custom code from the repo to load (auto_map in config.json)",
                               hint="pass --trust-remote-code if you trust this repo's code")
    if not mtype:
        raise UnsupportedError(f"config.json of {name} has no model_type",
                               hint="save the model with transformers' save_pretrained")
    if mtype not in CONFIG_MAPPING_NAMES and not opts.trust_remote_code:
        import transformers

        raise UnsupportedError(
            f"unknown model_type '{mtype}' (transformers {transformers.__version__} does not know it)",
            hint="upgrade transformers (pip install -U transformers), or fix model_type in config.json")
    if config.get("quantization_config"):
        qc = config["quantization_config"]
        qm = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        if not (mtype == "gpt_oss" and qm == "mxfp4"):  # gpt-oss MXFP4: dequantized on load (hubquant.moe_gptoss)
            raise UnsupportedError(f"{arch} checkpoint is already quantized ({qm})",
                                   hint="start from the float (bf16/fp16/fp32) base model")
    from hubquant.modeling import VISION_LANGUAGE, supported_hint

    if mtype not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mtype not in VISION_LANGUAGE and not opts.trust_remote_code:
        raise UnsupportedError(f"'{arch}' (model_type {mtype}) is not a causal language model transformers knows",
                               hint=supported_hint())
    _check_experts(plan, mtype)
    _check_method_architecture(opts.method, opts.method_options, config)
    check_group_size_config(plan, config)


def _check_experts(plan: Plan, mtype: str) -> None:
    """Mixture-of-experts variants that could not be loaded back stop before the download (hubquant.moe)."""
    from hubquant.methods import BNB_EXPERTS_REASON, MOE_MODEL_TYPES, NVFP4_EXPERTS_HINT, NVFP4_EXPERTS_REASON
    from hubquant.methods import DERIVED_MOE_MODEL_TYPES as DERIVED

    if plan.format == "mxfp4" and mtype != "gpt_oss":
        raise UnsupportedError(f"--format mxfp4 is gpt-oss's own checkpoint layout; this model is {mtype}",
                               hint="use --format compressed-tensors --scheme MXFP4A16 for other models")
    if mtype not in MOE_MODEL_TYPES + DERIVED:
        return
    if plan.format == "bitsandbytes":
        raise UnsupportedError(BNB_EXPERTS_REASON,
                               hint="use --method rtn, gptq, awq or fp8 (compressed-tensors) for mixture-of-experts")
    w = plan.scheme.weights
    if w.type == "float" and w.bits == 4 and w.group_size == 16:
        raise UnsupportedError(NVFP4_EXPERTS_REASON, hint=NVFP4_EXPERTS_HINT)


def _check_method_architecture(method: str, options: dict, config: dict) -> None:
    from types import SimpleNamespace

    from hubquant.methods import get_method

    get_method(method).check_architecture(SimpleNamespace(**config), options)


# the Linears whose input size each config dimension is (Llama-style names)
_DIMS = (("hidden_size", ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")),
         ("attention width", ("o_proj",)), ("intermediate_size", ("down_proj",)),
         ("moe_intermediate_size", ("down_proj",)))  # experts' down_proj (Qwen-MoE, DeepSeek)


def check_group_size_config(plan: Plan, config: dict) -> None:
    """Refuse a group size that does not divide the input size of a quantized Linear (from config.json)."""
    from hubquant.quant import matches_any, valid_group_sizes

    w = plan.scheme.weights
    gs = w.group_size
    cfg = config.get("text_config") or config
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if gs == -1 or w.type == "float" or not isinstance(hidden, int):
        return
    sizes = {"hidden_size": hidden, "intermediate_size": cfg.get("intermediate_size"),
             "moe_intermediate_size": cfg.get("moe_intermediate_size"),
             "attention width": (cfg.get("head_dim") or hidden // heads) * heads if heads else None}
    ignore = plan.opts.ignored_patterns
    used = {}
    for dim, layers in _DIMS:
        names = [n for n in layers if not matches_any(f"model.layers.0.mlp.{n}", ignore)
                 and not matches_any(f"model.layers.0.self_attn.{n}", ignore)]
        if isinstance(sizes[dim], int) and names:
            used[dim] = (sizes[dim], names)
    bad = {dim: v for dim, v in used.items() if v[0] % gs}
    if not bad:
        return
    ks = {k for k, _ in used.values()}
    ok = sorted(set.intersection(*(set(valid_group_sizes(k)) for k in ks)))
    names = [n for _, layer_names in bad.values() for n in layer_names]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise UsageError(
        f"group size {gs} does not divide the input size {sorted({k for k, _ in bad.values()})} of {shown}",
        hint=f"use --group-size {' or '.join(map(str, ok))}" + (" or -1" if ok else "; or -1 (per channel)"))


# ---------------------------------------------------------------------------------------------- text, output


_TEXT_SUFFIXES = {".txt", ".json", ".jsonl", ".csv", ".parquet", ".md"}


@dataclass(frozen=True)
class TextSpecs:
    calib_spec: str | None  # None: no calibration
    eval_spec: str
    eval_src: object | None  # the loaded eval TextSource (None with --skip-eval)


def check_texts(plan: Plan) -> TextSpecs:
    """Load the evaluation text and check the calibration source exists (local files, built-ins, Hub datasets).

    Raises:
        UsageError, NotFoundError, UnsupportedError: from hubquant.textdata, naming the spec.
    """
    from hubquant.textdata import default_specs, load_texts

    opts = plan.opts
    for flag, spec in (("--calib-dataset", opts.calib_dataset), ("--eval-dataset", opts.eval_dataset)):
        path = Path(spec.split(":")[0] if spec and not Path(spec).exists() else spec or "")
        if spec and not path.exists() and (spec.startswith((".", "/", "~")) or path.suffix in _TEXT_SUFFIXES):
            raise NotFoundError(f"{flag} {spec}: no such file", hint="check the path (or use fortunes, lee-news, "
                                                                     "or a Hub dataset ID[:CONFIG[:SPLIT]])")
    calib_default, eval_default = default_specs()
    eval_spec = opts.eval_dataset or eval_default
    calib_spec = (opts.calib_dataset or calib_default) if plan.calibrated else None
    eval_src = None
    if not opts.skip_eval:
        eval_src = load_texts(eval_spec)
        if not eval_src.texts:
            raise UsageError(f"evaluation source '{eval_spec}' has no text", hint="pass another --eval-dataset")
    if calib_spec is not None and calib_spec != eval_spec:
        load_texts(calib_spec)
    return TextSpecs(calib_spec=calib_spec, eval_spec=eval_spec, eval_src=eval_src)


# what hubquant writes into an output folder (read for outputs whose hubquant.json predates its "files" list)
_OUTPUT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "quantize_config.json",
                    "quant_config.json", "README.md", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.*", "LICENSE*", "NOTICE")


def previous_files(folder: Path) -> list[str] | None:
    """The files a previous hubquant run wrote into `folder` (None: not a hubquant output)."""
    prov = folder / PROVENANCE_FILE
    if not prov.is_file():
        return None
    try:
        data = json.loads(prov.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or "base_sha" not in data:
        return None
    files = data.get("files")
    if not isinstance(files, list):
        files = sorted({p.name for pat in _OUTPUT_PATTERNS for p in folder.glob(pat) if p.is_file()})
    safe = [f for f in files if isinstance(f, str) and not Path(f).is_absolute() and ".." not in Path(f).parts]
    return [*safe, PROVENANCE_FILE]


def check_output_dir(output_dir: str | None) -> None:
    """An --output-dir is new, empty, or a previous hubquant output (whose files alone get replaced).

    Raises:
        UsageError: a file, or a non-empty folder hubquant did not write.
    """
    if not output_dir:
        return
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {output_dir} is a file", hint="pass a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and previous_files(out) is None:
        raise UsageError(f"--output-dir {output_dir} is not empty and holds no hubquant output",
                         hint="pass a new or empty folder (hubquant never deletes files it did not write)")
