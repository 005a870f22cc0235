"""Streamed GGUF: the header first, then each decoder layer's tensors as soon as the layer is quantized.

A GGUF header lists every tensor's name, type, shape and offset before the data. All of it follows from the
config and the preset (`method.plan_types` on the meta-device skeleton of `hubquant.streaming`), so
`GGUFStream` writes the headers of every file (gguf-split shards included, split where `gguf.GGUFWriter`
splits) before any weight is read, and `add` writes one tensor at its offset. `write_streamed` reads one decoder
layer from the checkpoint, collects its importance (imatrix mode: the in-memory pass itself, `method.collect_imatrix`,
run with the engine's layer hooks), quantizes it, writes it and frees it: the writer holds no tensor, the process one
decoder layer plus the embeddings, head and activations. Mixtures of experts stream the same way: each layer's
fused experts come from the checkpoint as per-expert views, each expert's importance from the calibration tokens
routed to it (the low-token rule and the routing record as in memory), and the experts are stacked per tensor. The
one header value the data decides, the imatrix entry count, is rewritten in place at the end. The files are
byte-identical to `writer.write` after `method.run` on the model in memory.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from hubquant.errors import UsageError
from hubquant.formats.gguf.arch import arch_of
from hubquant.formats.gguf.blocks import TYPES, quantize
from hubquant.formats.gguf.method import (
    _SCHEME,
    _record,
    collect_imatrix,
    log_low_token,
    mode_of,
    plan_types,
    routing_policy,
)
from hubquant.formats.gguf.writer import open_writer, tensor_data


def _info(qtype: str | None, shape: tuple[int, ...], float16: bool):
    """(shape as GGUFWriter.add_tensor_info takes it, numpy dtype, nbytes, raw ggml type or None)."""
    import gguf

    if qtype is None:
        dtype = np.dtype(np.float16 if float16 else np.float32)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize, None
    raw = getattr(gguf.GGMLQuantizationType, qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[raw]
    byte_shape = (*shape[:-1], shape[-1] // block * type_size)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw


class GGUFStream:
    """Every file's header written up front; `add(name, array)` writes one tensor's bytes where the header
    says (see the module docstring). Holds no tensor data."""

    def __init__(self, writer, path: Path, plan: list[tuple[str, tuple, np.dtype, int, object]]):
        from gguf import GGUFWriter

        self.writer = writer
        for name, shape, dtype, nbytes, raw in plan:
            writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file(path)
        self.kv_start = writer.fout[0].tell()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        self.where: dict[str, tuple[object, int, int]] = {}
        for fout, tensors in zip(writer.fout, writer.tensors):
            writer.write_padding(fout, fout.tell())
            offset = fout.tell()
            for name, ti in tensors.items():
                self.where[name] = (fout, offset, ti.nbytes)
                offset += GGUFWriter.ggml_pad(ti.nbytes, writer.data_alignment)
        self.pending = set(self.where)

    def add(self, name: str, data: np.ndarray) -> None:
        fout, offset, nbytes = self.where[name]
        if data.nbytes != nbytes or name not in self.pending:
            raise UsageError(f"GGUF stream: {name} has {data.nbytes} bytes (header: {nbytes}) or came twice",
                             hint="report the model: the planned tensor does not match the quantized one")
        fout.seek(offset)
        np.ascontiguousarray(data).tofile(fout)
        self.writer.write_padding(fout, nbytes)
        self.pending.discard(name)

    def set_uint32(self, key: str, value: int) -> None:
        """Rewrite the value of a uint32 metadata key of the first file (one the data decides, e.g. the
        imatrix entry count), in place: the header keeps its size."""
        from gguf import GGUFValueType

        w, offset = self.writer, self.kv_start
        for k, v in w.kv_data[0].items():
            offset += len(w._pack_val(k, GGUFValueType.STRING, add_vtype=False))
            if k == key:
                if v.type != GGUFValueType.UINT32:
                    raise UsageError(f"GGUF stream: {key} is {v.type.name}, not UINT32", hint="report the model")
                v.value = value
                fout = w.fout[0]
                fout.seek(offset + 4)  # after the value's type tag
                fout.write(w._pack("I", value))
                return
            offset += len(w._pack_val(v.value, v.type, add_vtype=True, sub_type=v.sub_type))
        raise UsageError(f"GGUF stream: no metadata key {key}", hint="report the model")

    def close(self) -> None:
        if self.pending:
            raise UsageError(f"GGUF stream: {len(self.pending)} tensors never written (e.g. {min(self.pending)})",
                             hint="report the model: a layer's tensors were not produced")
        self.writer.close()


def _layer_of(gguf_name: str) -> int | None:
    return int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else None


def _file_plan(entries, types: dict, extra: dict) -> tuple[list, dict[str, int]]:
    """Every tensor's header entry (GGUFStream's plan) and the count of tensors per type."""
    plan, counts = [], {}
    for e in entries:
        t = types.get(e.module) if e.quantizable else None
        qtype = None if t in (None, "F16") else t
        plan.append((e.gguf, *_info(qtype, e.shape, float16=t == "F16")))
        key = qtype or ("F16" if t == "F16" else "F32")
        counts[key] = counts.get(key, 0) + 1
    for name, a in extra.items():
        plan.append((name, a.shape, a.dtype, a.nbytes, None))
        counts["F32"] = counts.get("F32", 0) + 1
    return plan, counts


class _Layers:
    """The engine's layer hooks (hubquant.engine.layer_hooks) of a streamed GGUF: before a decoder layer runs,
    read it from the checkpoint (the tensors outside the layers are written just before the first, once the
    calibration inputs are taken from the float embeddings); after, quantize it with the importance its run
    collected, write it, free it. Counts what `writer.write` reports (imatrix entries, stacked experts)."""

    def __init__(self, weights, out: GGUFStream, by_layer: dict, types: dict, spec, *, imatrix: dict,
                 write_rest, before=None, after=None):
        self.weights, self.out, self.by_layer, self.types, self.spec = weights, out, by_layer, types, spec
        self.imatrix, self.write_rest, self.user_before, self.user_after = imatrix, write_rest, before, after
        self.results: dict = {}  # (engine.results(): no method collects here)
        self.names: list[str] = []  # every quantized module, experts one by one
        self.with_imatrix = 0
        self.stacks: dict[str, int] = {}
        self.experts = self.plain_experts = 0

    def before(self, index: int, name: str, layer: torch.nn.Module) -> None:
        if self.write_rest is not None:
            self.write_rest()
            self.write_rest = None
        self.weights.load(layer, name)
        if self.user_before is not None:
            self.user_before(index, layer)

    def after(self, index: int, name: str, layer: torch.nn.Module) -> None:
        layer.to("cpu")
        imp = {k: self.imatrix.pop(k) for k in [k for k in self.imatrix if k.startswith(name + ".")]}
        state = {f"{name}.{k}": v for k, v in layer.state_dict().items()}
        self.write(self.by_layer.get(index, []), state, imp)
        if self.user_after is not None:
            self.user_after(index, layer)
        self.weights.release(layer)

    def write(self, entries: list, state: dict, imp: dict) -> None:
        """Quantize (as `method.run` does) and write each entry of one part of the model; a quantized weight in
        `state` then holds its dequantized values."""
        for e in entries:
            t = self.types.get(e.module) if e.quantizable else None
            quantized = {}
            if t is not None and t != "F16" and t in TYPES:
                for module in e.experts or (e.module,):
                    weight = state[f"{module}.weight" if e.experts else e.param].detach()
                    i = imp.get(module)
                    _record(quantized, module, quantize(weight, t, None if i is None else i.to(weight.device)),
                            weight, imatrix=i is not None)
            data, qtype = tensor_data(e, quantized, state, self.spec)
            self.out.add(e.gguf, data)
            self.names += quantized
            self.with_imatrix += sum(1 for q in quantized.values() if q.extra["imatrix"])
            if e.experts:
                self.stacks[qtype or "F16"] = self.stacks.get(qtype or "F16", 0) + 1
                self.experts += len(e.experts)
                self.plain_experts += sum(1 for q in quantized.values() if not q.extra["imatrix"])


def write_streamed(weights, job, *, method: str = "rtn", out_dir: Path, options: dict | None = None,
                   before=None, after=None, rest_done=None, log=print) -> dict:
    """Quantize the checkpoint behind `weights` (hubquant.streaming.Weights) to the preset in `options`
    ("gguf_type") one decoder layer at a time and write the GGUF file(s) into `out_dir` (see the module
    docstring). Returns the summary `writer.write` returns.

    imatrix: the calibration pass is `method.collect_imatrix`'s (hubquant.engine.run_layers on the float layers,
    mixture-of-experts layers under `method.routing_policy`: each expert's importance from its routed tokens, the
    low-token rule), with each layer read before and written after it runs. The header's imatrix entry count
    (which the routing decides) is written last. The tensors outside the decoder layers (embeddings, output) are
    quantized and written before the first layer; `rest_done()` is then called, with the model's embeddings and
    head holding what the file holds. before(index, layer) / after(index, layer): called with each decoder layer
    holding its float weights, then the dequantized ones (e.g. to run evaluation activations).

    Raises:
        UsageError: --method gptq (streamed GGUF runs rtn and imatrix), or no calibration for imatrix.
    """
    from hubquant import moe
    from hubquant.engine import layer_hooks
    from hubquant.modeling import decoder_layers, layers_prefix

    mode = mode_of(method)
    if mode == "gptq":
        raise UsageError("streamed GGUF runs --method rtn or imatrix", hint="use --streaming off for gptq")
    if mode == "imatrix" and job.calib is None:
        raise UsageError("GGUF imatrix needs calibration text", hint="pass --calib-dataset, or use --method rtn")
    options = dict(options or {})
    model, t0 = weights.model, time.time()
    moe.unfuse_experts(model)  # per-expert Linears on the meta skeleton (Weights.load fills them per layer)
    spec = arch_of(model.config)
    entries, types = plan_types(model, options.get("gguf_type", "Q4_K_M"), has_imatrix=mode != "plain",
                                ignore=job.ignore)
    in_layers = [e for e in entries if e.quantizable and types[e.module] != "F16" and _layer_of(e.gguf) is not None]
    planned = sum(len(e.experts) or 1 for e in in_layers) if mode == "imatrix" else 0
    w, path, preset, extra = open_writer(model, out_dir, options, n_imatrix=planned)
    plan, counts = _file_plan(entries, types, extra)
    out = GGUFStream(w, path, plan)
    by_layer: dict[int | None, list] = {}
    for e in entries:
        by_layer.setdefault(_layer_of(e.gguf), []).append(e)
    imatrix: dict[str, torch.Tensor] = {}

    def write_rest():
        hooks.write(by_layer.get(None, []), model.state_dict(), {})
        for name, a in extra.items():
            out.add(name, a)
        if rest_done is not None:
            rest_done()

    hooks = _Layers(weights, out, by_layer, types, spec, imatrix=imatrix, write_rest=write_rest, before=before,
                    after=after)
    weights.load_rest()
    layers, prefix = decoder_layers(model), layers_prefix(model)
    if mode == "imatrix":
        with routing_policy(model) as policy, layer_hooks(hooks):
            collect_imatrix(model, job.calib, device=job.device, progress=job.progress, into=imatrix)
        log_low_token(policy, mode, log)
    else:
        for i, layer in enumerate(layers):
            hooks.before(i, f"{prefix}.{i}", layer)
            hooks.after(i, f"{prefix}.{i}", layer)
    if planned:
        out.set_uint32("quantize.imatrix.entries_count", hooks.with_imatrix)
    out.close()
    files = sorted(p.name for p in path.parent.glob(f"{path.stem}*.gguf"))
    log(f"gguf {preset} ({mode}, streamed): {len(entries)} tensors, {len(layers)} layers one at a time, "
        f"{time.time() - t0:.1f} s")
    qc = {"quant_method": "gguf", "gguf_type": preset, "files": files, "tensor_types": counts,
          "imatrix": hooks.with_imatrix > 0, "method": method}
    if hooks.stacks:
        qc["experts"] = {"stacked_types": hooks.stacks, "projections": hooks.experts,
                         "without_imatrix": hooks.plain_experts if hooks.with_imatrix else hooks.experts}
    return qc


def run_streamed(run, job, out_dir: Path) -> None:
    """The pipeline's quantize stage for `--format gguf --streaming` (hubquant.stages.Run with `run.weights` and
    `run.streams`, the base's evaluation activations): write the files into `out_dir` layer by layer, and take the
    evaluation from the same pass, as hubquant.streaming does for the other formats: the base's activations go
    through each float layer, the variant's (from the dequantized embeddings) through each quantized one; the base is
    scored here with the float embeddings and head, the variant by the evaluate and leak-check stages with the
    dequantized ones."""
    from hubquant.modeling import layers_prefix
    from hubquant.streaming import add_leak_streams, eval_streams, evaluate_streams, leak_rates

    weights, device, streams = run.weights, torch.device(run.device), run.streams
    model = weights.model
    inside = layers_prefix(model) + "."
    float_rest = {}
    if streams.base:  # the base is scored with the float embeddings and head (the file holds quantized ones)
        weights.load_rest()
        float_rest = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(inside)}

    def rest_done():
        if streams.base:  # the variant's activations start from the dequantized embeddings
            fresh = eval_streams(weights, streams.eval_set, streams.tokenizer, streams.device)
            if streams.leak_docs is not None:
                add_leak_streams(weights, fresh, streams.leak_docs)
            streams.variant = fresh.base

    def advance(group):
        def fn(i, layer):
            if any(s.hidden for s in group):
                layer.to(device)
                for s in group:
                    s.advance(i, layer, device)
                layer.to("cpu")
        return fn

    from hubquant.moe_pipeline import quantize_with_policy
    from hubquant.streaming.session import Written

    summary = {}

    def quantize(_model, job) -> dict:  # under the pipeline's routing policy, as in memory
        summary.update(write_streamed(weights, job, method=run.opts.method, out_dir=out_dir,
                                      options=run.plan.format_spec.run_options(run), before=advance(streams.base),
                                      after=lambda i, layer: advance(streams.variant)(i, layer),
                                      rest_done=rest_done, log=run.log))
        entries, types = plan_types(model, summary["gguf_type"], has_imatrix=summary["imatrix"], ignore=job.ignore)
        return {m: Written(_SCHEME) for e in entries if e.quantizable and types[e.module] in TYPES
                for m in e.experts or (e.module,)}

    run.quantized, run.routing = quantize_with_policy(model, job, quantize, options=run.opts.method_options,
                                                      log=run.log)
    if streams.base:
        params = dict(model.named_parameters())
        quantized_rest = {n: params[n].detach().clone() for n in float_rest}
        for n, t in float_rest.items():
            params[n].data = t
        evaluate_streams(weights, streams, variant=False)
        leak_rates(weights, streams, variant=False)
        for n, t in quantized_rest.items():
            params[n].data = t
    run.quant_config = summary
