"""GPTQ: quantize columns one at a time and push each column's error onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

Pure math first (`gptq_quantize`), then the model walk (`run`) over hubquant.engine.
Options (job.options): block_size 128, damp 0.01 (times mean diag H), actorder True (static groups:
group parameters come from the original weights, so no g_idx permutation is needed at inference),
true_sequential False (True: quantize attention, then o_proj, then the MLP with statistics
re-collected after each step; slower, usually a little more accurate), clip True (hubquant's addition:
static group ranges shrunk to minimise each group's Hessian-weighted rounding error before the column
loop; llm-compressor uses plain min-max).
"""
from __future__ import annotations

import torch

from hubquant.engine import LayerWork, run_layers
from hubquant.errors import UsageError
from hubquant.methods import QuantJob
from hubquant.modeling import model_dtype
from hubquant.quant import QuantizedWeight, WeightScheme, minmax_qparams

DEFAULTS = {"block_size": 128, "damp": 0.01, "actorder": True, "true_sequential": False, "clip": True}
DAMP_RETRIES = (1.0, 10.0, 100.0)  # multipliers of `damp` tried before giving up


class CholeskyFailed(RuntimeError):
    """The damped Hessian is not positive definite even after the retries."""


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, retrying with more damping.

    Adds the damping to `h`'s diagonal in place. Returns (factor, damp actually used). Raises CholeskyFailed.
    """
    diag = h.diagonal()
    diag_mean = torch.mean(diag).item()
    added = 0.0
    for mult in DAMP_RETRIES:
        d = damp * mult
        diag.add_(d * diag_mean - added)
        added = d * diag_mean
        low, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(low)
            del low
            up, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if info.item() == 0 and torch.isfinite(up).all():
                return up, d
            del up
    raise CholeskyFailed(f"Hessian not positive definite with damping up to {damp * DAMP_RETRIES[-1]:g}")


def _block_step(w1, hinv1, cs, cz, q1, err1, scale1, zp1, *, gs_dyn: int, bits: int, symmetric: bool,
                qmin: int, qmax: int, scale_dtype: torch.dtype) -> None:
    """Quantize the columns of one block in order, in place (fixed shapes: CUDA-graph capturable).

    w1 [R, B] weights (updated), hinv1 [B, B] block of the upper Cholesky factor, cs/cz [R, B] per-column
    scale / zero point (float; zeros for cz when symmetric), q1/err1 [R, B] outputs. With gs_dyn > 0 the
    group parameters are computed at each group start from the updated weights into cs/cz and scale1/zp1.
    """
    per_row = WeightScheme(bits=bits, group_size=-1, symmetric=symmetric)
    for i in range(w1.shape[1]):
        if gs_dyn and i % gs_dyn == 0:
            s, z = minmax_qparams(w1[:, i: i + gs_dyn], per_row, scale_dtype=scale_dtype)
            scale1[:, i // gs_dyn] = s[:, 0]
            cs[:, i: i + gs_dyn] = s.float()
            if z is not None:
                zp1[:, i // gs_dyn] = z[:, 0]
                cz[:, i: i + gs_dyn] = z.float()
        w = w1[:, i]
        q = torch.round(w / cs[:, i]).add_(cz[:, i]).clamp_(qmin, qmax)
        e = (w - (q - cz[:, i]) * cs[:, i]) / hinv1[i, i]
        q1[:, i] = q
        err1[:, i] = e
        w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)  # push the error onto the columns not yet quantized


_GRAPHS: dict = {}  # CUDA graphs of _block_step, one per shape/scheme (GPTQ's per-column loop is launch-bound)


def _run_block(args: dict, kw: dict, use_graph: bool) -> dict:
    if not use_graph:
        _block_step(**args, **kw)
        return args
    key = tuple((k, tuple(v.shape), v.dtype) for k, v in args.items() if v is not None) + tuple(sorted(kw.items()))
    if key not in _GRAPHS:
        bufs = {k: (None if v is None else v.clone()) for k, v in args.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture
            _block_step(**{k: (None if v is None else v.clone()) for k, v in args.items()}, **kw)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _block_step(**bufs, **kw)
        _GRAPHS[key] = (graph, bufs)
    graph, bufs = _GRAPHS[key]
    for k, v in args.items():
        if v is not None:
            bufs[k].copy_(v)
    graph.replay()
    return bufs


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, *, block_size: int = 128,
    damp: float = 0.01, actorder: bool = True, scale_dtype: torch.dtype = torch.float32,
    cuda_graphs: bool = True, inplace: bool = False, clip: bool = False,
) -> tuple[QuantizedWeight, float]:
    """GPTQ-quantize one weight matrix.

    Args:
        weight: [out, in] float weight.
        hessian: [in, in] fp32 2 X^T X / n of the Linear's inputs.
        scheme: bits, group size (-1 = per output channel), symmetric or not.
        block_size: columns updated lazily together.
        damp: dampening as a fraction of mean(diag H).
        actorder: quantize columns in decreasing diag(H) order; group parameters are static
            (computed from the original weight), so the checkpoint needs no g_idx.
        scale_dtype: dtype the scales are stored in (the model dtype); rounding uses the stored scale.
        cuda_graphs: on CUDA, replay each block's column loop as a captured graph.
        inplace: let the function overwrite `hessian` (saves memory on large layers).
        clip: shrink each static group's range to minimise its Hessian-weighted rounding error
            (the search AWQ uses for clipping) before the column loop.

    Returns:
        (QuantizedWeight with codes in the original column order, half the sum of squared scaled errors).

    Raises:
        CholeskyFailed: the Hessian stays singular with the largest damping.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float()
    h = h if (inplace and h is hessian) else h.clone()
    out_f, in_f = w.shape
    dev = w.device
    gs = in_f if scheme.group_size == -1 else scheme.group_size
    if in_f % gs:
        minmax_qparams(w, scheme)  # raises the UsageError that names valid group sizes

    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # static parameters: per channel, or per group with act-order (from the original weight)
    static = scheme.group_size == -1 or actorder
    n_groups = in_f // gs
    scale = torch.zeros(out_f, n_groups, dtype=scale_dtype, device=dev)
    zp = None if scheme.symmetric else torch.zeros(out_f, n_groups, dtype=torch.int8, device=dev)
    if static:
        ratio = 1.0
        if clip:
            from hubquant.methods.awq import search_clip

            ratio = search_clip(w, h, scheme)
        s, z = minmax_qparams(w, scheme, scale_dtype=scale_dtype, clip_ratio=ratio)
        scale.copy_(s)
        if zp is not None:
            zp.copy_(z)

    perm = torch.argsort(torch.diag(h), descending=True) if actorder else None
    if perm is not None:
        w = w[:, perm]
        tmp = h.index_select(0, perm)
        torch.index_select(tmp, 1, perm, out=h)  # permute in place: one extra in x in buffer at a time
        del tmp
    group_of = (perm if perm is not None else torch.arange(in_f, device=dev)) // gs

    hinv, _ = inverse_hessian_cholesky(h, damp)
    del h
    block = block_size if static else max(gs, (block_size // gs) * gs)  # dynamic groups never straddle blocks
    codes = torch.empty(out_f, in_f, dtype=torch.float32, device=dev)
    kw = dict(gs_dyn=0 if static else gs, bits=scheme.bits, symmetric=scheme.symmetric, qmin=scheme.qmin,
              qmax=scheme.qmax, scale_dtype=scale_dtype)
    use_graph = cuda_graphs and dev.type == "cuda"
    loss = torch.zeros((), device=dev)

    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        g1, g2 = i1 // gs, (i2 + gs - 1) // gs
        # per-column scale / zero point of this block (float); static ones gathered from the groups
        cols = group_of[i1:i2]
        cs = scale.float()[:, cols] if static else torch.ones(out_f, i2 - i1, device=dev)
        cz = zp.float()[:, cols] if (static and zp is not None) else torch.zeros(out_f, i2 - i1, device=dev)
        args = dict(w1=w[:, i1:i2].contiguous(), hinv1=hinv[i1:i2, i1:i2].contiguous(), cs=cs, cz=cz,
                    q1=codes[:, i1:i2].contiguous(), err1=torch.empty(out_f, i2 - i1, device=dev),
                    scale1=None if static else scale[:, g1:g2].contiguous(),
                    zp1=None if (static or zp is None) else zp[:, g1:g2].contiguous())
        out = _run_block(args, kw, use_graph)
        codes[:, i1:i2] = out["q1"]
        if not static:
            scale[:, g1:g2] = out["scale1"]
            if zp is not None:
                zp[:, g1:g2] = out["zp1"]
        err1 = out["err1"]
        loss += err1.pow(2).sum() / 2
        if i2 < in_f:
            w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    qw = QuantizedWeight(qweight=codes.to(torch.int8), scale=scale, zero_point=zp, scheme=scheme)
    return qw, float(loss)


def _groups(work: LayerWork, true_sequential: bool) -> list[list[str]]:
    """Linears of a layer in the order they are quantized (one group when not true-sequential)."""
    names = list(work.linears)
    if not true_sequential:
        return [names]
    order = [("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value"), ("o_proj", "dense", "out_proj"),
             ("gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3"), ("down_proj", "fc2", "w2")]
    groups, left = [], list(names)
    for suffixes in order:
        g = [n for n in left if n.rsplit(".", 1)[-1] in suffixes]
        if g:
            groups.append(g)
            left = [n for n in left if n not in g]
    if left:
        groups.append(left)
    return groups


def run(model: torch.nn.Module, job: QuantJob) -> dict[str, QuantizedWeight]:
    """Quantize every Linear of every decoder layer with GPTQ (see the method contract in docs/DESIGN.md).

    Raises:
        UsageError: no calibration data, unknown options, or a layer whose Hessian cannot be inverted.
    """
    if job.calib is None:
        raise UsageError("GPTQ needs calibration data", hint="pass --calib-dataset (or use --method rtn)")
    unknown = set(job.options) - set(DEFAULTS)
    if unknown:
        raise UsageError(f"unknown GPTQ option(s): {', '.join(sorted(unknown))}", hint=f"use {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **job.options}
    scheme = job.scheme.weights
    dtype = model_dtype(model)
    result: dict[str, QuantizedWeight] = {}

    @torch.no_grad()
    def on_layer(work: LayerWork) -> None:
        for group in _groups(work, opts["true_sequential"]):
            stats = work.collect(group, hessian=True)
            shared: dict[int, list[str]] = {}  # q/k/v and gate/up share one Hessian: quantize them as one matrix
            for name in group:
                shared.setdefault(id(stats[name].xtx), []).append(name)
            for names in shared.values():
                st = stats[names[0]]
                h = st.xtx.mul_(2.0 / max(st.count, 1))  # the Hessian, in place: these stats are not reused
                for n in names:
                    stats[n].xtx = None
                lins = [work.linears[n] for n in names]
                w = torch.cat([lin.weight for lin in lins], 0)
                try:
                    qw, _ = gptq_quantize(w, h, scheme, block_size=opts["block_size"], damp=opts["damp"],
                                          actorder=opts["actorder"], scale_dtype=dtype, inplace=True,
                                          clip=opts["clip"])
                except CholeskyFailed as e:
                    raise UsageError(f"GPTQ failed on {', '.join(names)}: {e}",
                                     hint=f"raise --damp (e.g. 0.1), add '{names[0]}' to --ignore, or use --method rtn") from e
                deq = qw.dequantize(dtype)
                row = 0
                for name, lin in zip(names, lins):
                    rows = slice(row, row + lin.out_features)
                    row += lin.out_features
                    part = QuantizedWeight(qweight=qw.qweight[rows].cpu(), scale=qw.scale[rows].cpu(),
                                           zero_point=None if qw.zero_point is None else qw.zero_point[rows].cpu(),
                                           scheme=scheme)
                    lin.weight.data.copy_(deq[rows])
                    result[name] = part
                del h
            del stats

    run_layers(model, job.calib, on_layer=on_layer, device=job.device, ignore=job.ignore,
               progress=job.progress, desc="gptq")
    _GRAPHS.clear()
    return result
