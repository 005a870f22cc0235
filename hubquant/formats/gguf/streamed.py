"""Streamed GGUF: the header first, then each decoder layer's tensors as soon as the layer is quantized.

A GGUF header lists every tensor's name, type, shape and offset before the data. All of it follows from the
config and the preset (`method.plan_types` on the meta-device skeleton of `hubquant.streaming`), so
`GGUFStream` writes the headers of every file (gguf-split shards included, split where `gguf.GGUFWriter`
splits) before any weight is read, and `add` writes one tensor at its offset. `write_streamed` reads one decoder
layer from the checkpoint, collects its importance (imatrix mode: the calibration activations go through the
float layer, as the in-memory pass does), quantizes it, writes it and frees it: the writer holds no tensor, the
process one decoder layer plus the embeddings, head and activations. The files are byte-identical to
`writer.write` after `method.run` on the model in memory.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from hubquant.errors import UsageError
from hubquant.formats.gguf.arch import arch_of
from hubquant.formats.gguf.blocks import TYPES, quantize
from hubquant.formats.gguf.method import _record, mode_of, plan_types
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

    def close(self) -> None:
        if self.pending:
            raise UsageError(f"GGUF stream: {len(self.pending)} tensors never written (e.g. {min(self.pending)})",
                             hint="report the model: a layer's tensors were not produced")
        self.writer.close()


def _layer_of(gguf_name: str) -> int | None:
    return int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else None


@torch.no_grad()
def _layer_importance(layer, stream, index: int, names: dict, device) -> dict[str, torch.Tensor]:
    """Sum of x^2 per input column of each Linear in `names` ({module: full name}), over the calibration
    activations run through the float layer (which advances `stream` to the next layer's inputs)."""
    out: dict[str, torch.Tensor] = {}

    def hook(full):
        def fn(_mod, args):
            x = args[0]
            s = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0).cpu()
            out[full] = s if full not in out else out[full] + s
        return fn

    handles = [m.register_forward_pre_hook(hook(full)) for m, full in names.items()]
    try:
        layer.to(device)
        stream.advance(index, layer, device)
    finally:
        for h in handles:
            h.remove()
    return out


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


def write_streamed(weights, job, *, method: str = "rtn", out_dir: Path, options: dict | None = None,
                   before=None, after=None, rest_done=None, log=print) -> dict:
    """Quantize the checkpoint behind `weights` (hubquant.streaming.Weights, a dense model) to the preset in
    `options` ("gguf_type") one decoder layer at a time and write the GGUF file(s) into `out_dir` (see the
    module docstring). Returns the summary `writer.write` returns.

    The tensors outside the decoder layers (embeddings, output) are quantized and written first (after the
    calibration activations are taken from the float embeddings); `rest_done()` is then called, with the model's
    embeddings and head holding what the file holds. before(index, layer) / after(index, layer): called with each
    decoder layer holding its float weights, then the dequantized ones (e.g. to run evaluation activations).

    Raises:
        UsageError: --method gptq (streamed GGUF runs rtn and imatrix), or no calibration for imatrix.
    """
    from hubquant.modeling import decoder_layers, layers_prefix
    from hubquant.streaming import Stream

    mode = mode_of(method)
    if mode == "gptq":
        raise UsageError("streamed GGUF runs --method rtn or imatrix", hint="use --streaming off for gptq")
    if mode == "imatrix" and job.calib is None:
        raise UsageError("GGUF imatrix needs calibration text", hint="pass --calib-dataset, or use --method rtn")
    options = dict(options or {})
    model, t0, device = weights.model, time.time(), torch.device(job.device)
    spec = arch_of(model.config)
    entries, types = plan_types(model, options.get("gguf_type", "Q4_K_M"), has_imatrix=mode != "plain",
                                ignore=job.ignore)
    in_layers = sum(1 for e in entries if e.quantizable and types[e.module] != "F16" and _layer_of(e.gguf) is not None)
    w, path, preset, extra = open_writer(model, out_dir, options, n_imatrix=in_layers if mode == "imatrix" else 0)
    plan, counts = _file_plan(entries, types, extra)
    out = GGUFStream(w, path, plan)

    weights.load_rest()
    layers, prefix = decoder_layers(model), layers_prefix(model)
    stream = Stream(model, job.calib, max(1, 16384 // job.calib.shape[1]), device) if mode == "imatrix" else None
    by_layer: dict[int | None, list] = {}
    for e in entries:
        by_layer.setdefault(_layer_of(e.gguf), []).append(e)
    _write_entries(out, by_layer.get(None, []), types, model.state_dict(), {}, spec)
    for name, a in extra.items():
        out.add(name, a)
    if rest_done is not None:
        rest_done()
    for i, layer in enumerate(layers):
        name = f"{prefix}.{i}"
        weights.load(layer, name)
        if before is not None:
            before(i, layer)
        imp = {}
        if stream is not None:
            linears = {m: f"{name}.{n}" for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            imp = _layer_importance(layer, stream, i, linears, device)
        layer.to("cpu")
        _write_entries(out, by_layer.get(i, []), types, {f"{name}.{k}": v for k, v in layer.state_dict().items()},
                       imp, spec)
        if after is not None:
            after(i, layer)
        weights.release(layer)
    out.close()
    files = sorted(p.name for p in path.parent.glob(f"{path.stem}*.gguf"))
    log(f"gguf {preset} ({mode}, streamed): {len(entries)} tensors, {len(layers)} layers one at a time, "
        f"{time.time() - t0:.1f} s")
    return {"quant_method": "gguf", "gguf_type": preset, "files": files, "tensor_types": counts,
            "imatrix": mode == "imatrix" and in_layers > 0, "method": method}


def _write_entries(out: GGUFStream, entries: list, types: dict, state: dict, imp: dict, spec) -> None:
    """Quantize (as `method.run` does) and write each entry of one part of the model; a quantized weight in
    `state` then holds its dequantized values."""
    for e in entries:
        t = types.get(e.module) if e.quantizable else None
        quantized = {}
        if t is not None and t != "F16" and t in TYPES:
            weight = state[e.param].detach()
            i = imp.get(e.module)
            grid = quantize(weight, t, None if i is None else i.to(weight.device))
            _record(quantized, e.module, grid, weight, imatrix=i is not None)
        data, _ = tensor_data(e, quantized, state, spec)
        out.add(e.gguf, data)


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

    qc = write_streamed(weights, job, method=run.opts.method, out_dir=out_dir,
                        options=run.plan.format_spec.run_options(run), before=advance(streams.base),
                        after=lambda i, layer: advance(streams.variant)(i, layer), rest_done=rest_done, log=run.log)
    if streams.base:
        params = dict(model.named_parameters())
        quantized_rest = {n: params[n].detach().clone() for n in float_rest}
        for n, t in float_rest.items():
            params[n].data = t
        evaluate_streams(weights, streams, variant=False)
        leak_rates(weights, streams, variant=False)
        for n, t in quantized_rest.items():
            params[n].data = t
    _, types = plan_types(model, qc["gguf_type"], has_imatrix=qc["imatrix"], ignore=job.ignore)
    run.quantized = dict.fromkeys(sorted(m for m, t in types.items() if t != "F16"))
    run.quant_config, run.routing = qc, None
