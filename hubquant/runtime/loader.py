"""`hubquant.load`: run any variant hubquant writes on hubquant's kernels.

Formats (byte for byte as in FORMATS.md): compressed-tensors pack-quantized W4A16 (sym/asym), int-quantized
W8A8 int8, float-quantized FP8 (dynamic per-token or static per-tensor activations), nvfp4/mxfp4-pack-quantized
(hubquant.runtime.fp4); GPTQ (v1 and v2, 4-bit,
act-order via g_idx); AWQ GEMM (4-bit); and plain float checkpoints. The transformers skeleton is built from
config.json (quantization_config removed, parameters on the meta device, never remote code), Linears with
quantized tensors become hubquant.runtime.modules (weights repacked once into the kernels' layout), and the
remaining tensors are assigned in place. Variants the kernels cannot run (e.g. 2/3-bit, weight-only int8) are
dequantized into plain float Linears, with a note. bitsandbytes variants run on bitsandbytes' own modules, loaded
through transformers (the `bnb` extra).
"""
from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from hubquant.errors import CorruptFileError, NotFoundError, UnsupportedError
from hubquant.formats import FORMATS, by_quant_method
from hubquant.modeling import auto_class
from hubquant.runtime import repack
from hubquant.runtime.modules import W4A16Linear, W8A8Linear

# the formats whose registry entry names a reader here (quant_method strings)
SUPPORTED = tuple(f.quant_method for f in FORMATS.values() if f.reader)


class TensorFiles:
    """The tensors of a safetensors checkpoint (single file or shards), read lazily by name."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            if pickles:
                raise UnsupportedError(f"{path} holds only pickled weights ({pickles[0]}); hubquant loads "
                                       "safetensors only", hint="convert the checkpoint to safetensors first")
            raise NotFoundError(f"no .safetensors files in {path}", hint="point to a folder with model weights")
        self._handles = {}
        self.where: dict[str, Path] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:
                raise CorruptFileError(f"{f.name} is not a readable safetensors file: {e}",
                                       hint="download the checkpoint again") from e
            self._handles[f] = h
            for k in h.keys():  # noqa: SIM118  (a safetensors handle is not a dict)
                self.where[k] = f

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.where[key]].get_tensor(key)

    def dtype(self, key: str) -> str:
        return self._handles[self.where[key]].get_slice(key).get_dtype()

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors named `prefix.<x>`, keyed by `<x>`."""
        p = prefix + "."
        return {k[len(p):]: self.get(k) for k in self.where if k.startswith(p) and "." not in k[len(p):]}


def resolve(repo_or_path: str | Path, *, revision: str | None = None) -> Path:
    """A local folder as is; a Hub repo id downloaded (safetensors only, pinned to the resolved sha)."""
    p = Path(repo_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists() or str(repo_or_path).startswith((".", "/", "~")) or str(repo_or_path).count("/") != 1:
        raise NotFoundError(f"{repo_or_path} is not a model folder or a Hub repo id",
                            hint="pass a folder with config.json + safetensors, or a repo id like org/name")
    from hubquant.hub.client import download_model

    return download_model(str(repo_or_path), revision=revision, allow_pickle=False).path


def detect_format(qcfg: dict | None) -> str:
    """'none' for float checkpoints, else the quant_method hubquant can run."""
    if not qcfg:
        return "none"
    spec = by_quant_method(qcfg.get("quant_method"))
    if spec is not None and spec.reader is not None:
        return spec.name
    method = qcfg.get("quant_method")
    if method == "bitsandbytes":  # bitsandbytes' own modules, through transformers (_load_bitsandbytes)
        return method
    raise UnsupportedError(f"quant_method {method!r} is not supported by hubquant.load",
                           hint=f"hubquant.load runs {', '.join(SUPPORTED)}; load other formats with transformers")


# ---------------------------------------------------------------- per-format builders
def _ct_group(qcfg: dict, name: str) -> dict:
    for group in qcfg.get("config_groups", {}).values():
        for target in group.get("targets", []):
            if target in ("Linear", "nn.Linear") or (target.startswith("re:") and re.fullmatch(target[3:], name)) \
                    or target == name:
                return group
    return next(iter(qcfg.get("config_groups", {}).values()), {})


def _dense(w: torch.Tensor, bias: torch.Tensor | None, dtype, device) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _build_ct(qcfg, name, t, in_f, out_f, dtype, device, notes):
    group = _ct_group(qcfg, name)
    wargs = group.get("weights") or {}
    acts = group.get("input_activations")
    bias = t.get("bias")
    if "weight_packed" in t and wargs.get("type") == "float" and int(wargs.get("num_bits", 4)) == 4:
        from hubquant.runtime import fp4 as fp4_runtime  # NVFP4 / MXFP4

        return fp4_runtime.build(wargs, t, in_f, out_f, dtype, device)
    if "weight_packed" in t:
        bits = int(wargs.get("num_bits", 4))
        if bits == 4 and in_f % 8 == 0:
            kw = repack.compressed_tensors_w4(t, in_f, out_f)
            return W4A16Linear(in_f, out_f, kw.pop("group_size"), bias=bias, **_to(kw, device, dtype))
        from hubquant.formats.compressed_tensors import unpack_int32
        from hubquant.quant import dequantize

        q = unpack_int32(t["weight_packed"], bits, in_f)
        zp = t.get("weight_zero_point")
        if zp is not None:
            zp = unpack_int32(zp, bits, out_f, dim=0)
        gs = int(wargs.get("group_size") or -1)
        notes.add(f"{bits}-bit pack-quantized weights dequantized to {dtype} (no {bits}-bit kernel)")
        return _dense(dequantize(q, t["weight_scale"], zp, gs), bias, dtype, device)
    w = t.get("weight")
    if w is None or "weight_scale" not in t or w.dtype not in (torch.int8, torch.float8_e4m3fn):
        return None
    scale = t["weight_scale"]
    per_channel = scale.numel() in (1, out_f)
    act_ok = acts is not None and acts.get("symmetric", True) and acts.get("strategy") in ("token", "tensor", None)
    zp = t.get("weight_zero_point")
    if per_channel and act_ok and zp is None:
        if acts.get("dynamic", True) is False and "input_scale" not in t:
            raise CorruptFileError(f"{name} has a static activation scheme but no input_scale",
                                   hint="the checkpoint is incomplete; re-export it")
        return W8A8Linear(in_f, out_f, qweight=w.to(device), w_scale=scale.to(device),
                          input_scale=t["input_scale"].to(device) if "input_scale" in t else None,
                          bias=None if bias is None else bias.to(device, dtype))
    # weight-only 8-bit, grouped scales or asymmetric: dequantize once
    from hubquant.quant import dequantize

    notes.add(f"{'fp8' if w.dtype != torch.int8 else 'int8'} weights without a kernel for this scheme "
              f"dequantized to {dtype}")
    wf = w.float().reshape(out_f, in_f)
    s = scale.float().reshape(out_f, -1) if scale.numel() > 1 else scale.float().reshape(1, 1).expand(out_f, 1)
    deq = dequantize(wf, s, None if zp is None else zp.reshape(out_f, -1),
                     -1 if s.shape[1] == 1 else in_f // s.shape[1])
    return _dense(deq, bias, dtype, device)


def _build_gptq(qcfg, name, t, in_f, out_f, dtype, device, notes):
    if "qweight" not in t:
        return None
    fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
    bits, gs = int(qcfg.get("bits", 4)), int(qcfg.get("group_size", 128))
    if bits != 4:
        notes.add(f"{bits}-bit GPTQ weights dequantized to {dtype} (no {bits}-bit kernel)")
        return _dense(repack.gptq_dequantize(t, in_f, out_f, bits=bits, v1=fmt != "gptq_v2"), t.get("bias"),
                      dtype, device)
    kw = repack.gptq_w4(t, in_f, out_f, bits=bits, group_size=gs, v1=fmt != "gptq_v2")
    return W4A16Linear(in_f, out_f, kw.pop("group_size"), bias=t.get("bias"), **_to(kw, device, dtype))


def _build_awq(qcfg, name, t, in_f, out_f, dtype, device, notes):
    if "qweight" not in t:
        return None
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise UnsupportedError(f"AWQ version {version!r} is not supported", hint="hubquant.load runs AWQ GEMM")
    kw = repack.awq_gemm_w4(t, in_f, out_f, bits=int(qcfg.get("bits", qcfg.get("w_bit", 4))),
                            group_size=int(qcfg.get("group_size", qcfg.get("q_group_size", 128))))
    return W4A16Linear(in_f, out_f, kw.pop("group_size"), bias=t.get("bias"), **_to(kw, device, dtype))


def _to(kw: dict, device, dtype) -> dict:
    out = {}
    for k, v in kw.items():
        if v is None:
            out[k] = None
        elif k == "scales":
            out[k] = v.to(device)  # kept in the checkpoint's dtype: the kernels dequantize in fp32
        else:
            out[k] = v.to(device)
    return out


# the registry's readers (hubquant.formats.FORMATS[...].reader) by name
build_compressed_tensors, build_gptq, build_awq = _build_ct, _build_gptq, _build_awq


# ---------------------------------------------------------------- the loader
def _config_dtype(cfg: dict) -> torch.dtype | None:
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def load(repo_or_path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         *, revision: str | None = None, progress: bool = True, log: Callable[[str], None] | None = None):
    """Load a hubquant variant (or a float checkpoint) to run on hubquant's kernels.

    Args:
        repo_or_path: a local folder, or a Hub repo id (downloaded with huggingface_hub; safetensors only).
        device: where to run ("cuda", "cpu", ...); default CUDA when available.
        dtype: activation/float dtype; default the checkpoint's (bf16 on CUDA when it says float32).
        revision: Hub revision for repo ids.
        progress: show a progress bar while modules are built.
        log: where to print notes (default: warnings).

    Returns:
        (model, tokenizer): the transformers model in eval mode with quantized Linears replaced by
        hubquant.runtime.modules, and its tokenizer (None if the checkpoint has none).

    Raises:
        NotFoundError: no such folder/repo, or no safetensors weights.
        UnsupportedError: pickled weights only, or a quant_method/scheme hubquant cannot run.
        CorruptFileError: unreadable shards, or tensors missing for the model's parameters.
    """
    from accelerate import init_empty_weights
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from hubquant import moe

    t0 = time.time()
    path = resolve(repo_or_path, revision=revision)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise NotFoundError(f"{path} has no config.json", hint="hubquant.load needs a transformers model folder")
    raw = json.loads(cfg_path.read_text())
    if raw.get("auto_map"):
        raise UnsupportedError(f"{path} needs custom modeling code (auto_map)",
                               hint="hubquant.load never runs remote code; use a transformers architecture")
    qcfg = raw.get("quantization_config")
    fmt = detect_format(qcfg)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or _config_dtype(raw) or torch.bfloat16
    if device.type == "cuda" and dtype == torch.float32:
        dtype = torch.bfloat16  # the 16-bit-activation kernels take bf16/fp16
    if fmt == "bitsandbytes":
        return _load_bitsandbytes(path, device, dtype, t0)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():  # the base's own class: a vision-language model keeps its (float) vision tower
        model = auto_class(config).from_config(config, dtype=dtype, trust_remote_code=False)
    moe.unfuse_experts(model)  # per-expert Linears, named as the checkpoint names them

    files = TensorFiles(path)
    consumed: set[str] = set()
    notes: set[str] = set()
    n_quant = 0
    if fmt != "none":
        build = FORMATS[fmt].load_reader()
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        for name, lin in tqdm(linears, desc="repacking", disable=not progress, leave=False):
            ckpt = moe.checkpoint_name(model, name)
            t = files.with_prefix(ckpt)
            if not t:
                continue
            new = build(qcfg, name, t, lin.in_features, lin.out_features, dtype, device, notes)
            if new is None:
                continue
            if isinstance(new, W4A16Linear) and new.bias is not None:
                new.bias = new.bias.to(device, dtype)
            _set_module(model, name, new)
            consumed.update(f"{ckpt}.{k}" for k in t)
            n_quant += 1
        if n_quant == 0:
            raise CorruptFileError(f"config.json says {fmt} but no quantized tensors were found",
                                   hint="the checkpoint's tensor names do not match its config")

    state = {}
    for key in files.where:
        if key in consumed:
            continue
        v = files.get(key)
        state[moe.model_name(model, key)] = v.to(device, dtype) if v.is_floating_point() else v.to(device)
    result = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and isinstance(out_emb, nn.Linear) and out_emb.weight.is_meta:
            out_emb.weight = in_emb.weight
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise CorruptFileError(f"the checkpoint has no tensor for {len(meta)} parameters (e.g. {meta[0]})",
                               hint="the files are incomplete or belong to another architecture")
    if result.unexpected_keys:
        notes.add(f"ignored {len(result.unexpected_keys)} unused tensors (e.g. {result.unexpected_keys[0]})")
    model.to(device)  # buffers built at init (rotary inv_freq) follow the weights
    model.eval()
    _load_generation_config(model, path)
    model.hubquant_format = {"format": fmt, "quantized_linears": n_quant, "path": str(path),
                             "load_seconds": round(time.time() - t0, 2)}
    for note in sorted(notes):
        (log or (lambda s: warnings.warn(s, stacklevel=2)))(note)
    return model, _tokenizer(path)


def _load_bitsandbytes(path: Path, device: torch.device, dtype: torch.dtype, t0: float):
    """bitsandbytes variants run on bitsandbytes' own modules: transformers loads them (config.json says how)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        from hubquant.errors import missing_dependency

        raise missing_dependency("bitsandbytes", "bnb", why="bitsandbytes variants run on its kernels")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device), trust_remote_code=False)
    model.eval()
    n_quant = sum(type(m).__name__ in ("Linear8bitLt", "Linear4bit") for m in model.modules())
    model.hubquant_format = {"format": "bitsandbytes", "quantized_linears": n_quant, "path": str(path),
                             "load_seconds": round(time.time() - t0, 2)}
    return model, _tokenizer(path)


def _load_generation_config(model, path: Path) -> None:
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError, TypeError):  # a malformed generation config must not block loading
            return


def _tokenizer(path: Path):
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((path / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
