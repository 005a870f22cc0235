"""GPTQ: quantize columns one at a time and push each column's error onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

Pure math first (`gptq_quantize`), then the model walk (`run`) over hubquant.engine.
Options (job.options): block_size 128, damp 0.01 (times mean diag H), actorder True (static groups:
group parameters come from the original weights, so no g_idx permutation is needed at inference),
true_sequential True (each Linear's statistics come from a forward in which the Linears the layer
runs before it are already quantized; with one calibration batch that is a single forward per layer,
done by hubquant.engine's LayerWork.sequential. False: every Linear's statistics from the float layer,
then a second forward with the quantized layer), clip True (hubquant's addition:
static group ranges shrunk to minimise each group's Hessian-weighted rounding error before the column
loop; llm-compressor uses plain min-max).
"""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field

import torch

from hubquant import fp4
from hubquant.engine import LayerWork, LinearStats, results, run_layers
from hubquant.errors import UsageError
from hubquant.methods import fp4 as fp4_method
from hubquant.methods.base import QuantJob
from hubquant.methods.options import MethodOptions, at_least, positive_float
from hubquant.modeling import model_dtype
from hubquant.quant import FP8_DTYPE, QuantizedWeight, WeightScheme, fp8_quantize_weight, minmax_qparams, to_fp8


@dataclass(frozen=True, kw_only=True)
class GptqOptions(MethodOptions):
    """GPTQ settings (see the module docstring)."""

    block_size: int = field(default=128, metadata={"parse": at_least(1)})
    damp: float = field(default=0.01, metadata={"parse": positive_float, "help": "times the mean of diag H"})
    actorder: bool = True
    true_sequential: bool = True
    clip: bool = True


DEFAULTS = {f.name: f.default for f in dataclasses.fields(GptqOptions) if f.name != "version"}
DAMP_RETRIES = (1.0, 10.0, 100.0)  # multipliers of `damp` tried before giving up
CLIP_GRID, CLIP_MIN_RATIO = 20, 0.5  # the clip search's candidates: ratios 1, 0.975, ..., 0.525


class CholeskyFailed(RuntimeError):
    """The damped Hessian is not positive definite even after the retries."""


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, retrying with more damping.

    Adds the damping to `h`'s diagonal in place. Returns (factor, damp actually used). Raises CholeskyFailed.
    The factor, the inverse and the factor of the inverse are computed in place in one buffer beside `h`
    (kept for the retries): two [in, in] matrices at a time, not four. The factor is column-major, as
    `torch.linalg.cholesky` returns it (the GEMMs that read it round the same way).
    """
    diag = h.diagonal()
    diag_mean = torch.mean(diag).item()
    added = 0.0
    buf = torch.empty_like(h).mT  # column-major, as LAPACK (and torch's own results) lay it out
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for mult in DAMP_RETRIES:
        d = damp * mult
        diag.add_(d * diag_mean - added)
        added = d * diag_mean
        buf.copy_(h)
        torch.linalg.cholesky_ex(buf, out=(buf, info))
        if info.item() == 0:
            torch.cholesky_inverse(buf, out=buf)
            torch.linalg.cholesky_ex(buf, upper=True, out=(buf, info))
            if info.item() == 0 and _all_finite(buf):
                return buf, d
    raise CholeskyFailed(f"Hessian not positive definite with damping up to {damp * DAMP_RETRIES[-1]:g}")


def _all_finite(t: torch.Tensor, rows: int = 256) -> bool:
    """torch.isfinite(t).all(), a few rows at a time (on a whole [in, in] matrix its temporaries are 1.5 x t)."""
    return all(bool(torch.isfinite(t[i: i + rows]).all()) for i in range(0, t.shape[0], rows))


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


@dataclass
class HessianPrep:
    """What GPTQ needs from a Hessian, computed once for every Linear that reads the same input.

    dead: input columns never active (zeroed in the weight); blocks: the diagonal group blocks of H for the
    clip search ([n_groups, gs, gs], None without clip); perm: act-order permutation (None without);
    hinv: upper Cholesky factor of the damped inverse Hessian, in `perm` order.
    """

    dead: torch.Tensor
    blocks: torch.Tensor | None
    perm: torch.Tensor | None
    hinv: torch.Tensor


@torch.no_grad()
def prepare_hessian(hessian: torch.Tensor, scheme: WeightScheme, *, damp: float = 0.01, actorder: bool = True,
                    clip: bool = False, inplace: bool = False) -> HessianPrep:
    """Dead columns, clip-search blocks, act-order permutation and inverse Cholesky factor of one Hessian.

    Raises:
        CholeskyFailed: the Hessian stays singular with the largest damping.
    """
    own = inplace and hessian.dtype == torch.float32 and not hessian.requires_grad
    h = hessian if own else hessian.detach().float().clone()  # (a detached view is another object: test the dtype)
    in_f = h.shape[0]
    gs = in_f if scheme.group_size == -1 else scheme.group_size
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    blocks = None
    if clip and (scheme.group_size == -1 or actorder) and in_f % gs == 0:
        blocks = torch.stack([h[i: i + gs, i: i + gs] for i in range(0, in_f, gs)])
    perm = torch.argsort(torch.diag(h), descending=True) if actorder else None
    if perm is not None:
        tmp = h.index_select(0, perm)
        torch.index_select(tmp, 1, perm, out=h)  # permute in place: one extra in x in buffer at a time
        del tmp
    hinv, _ = inverse_hessian_cholesky(h, damp)
    return HessianPrep(dead=dead, blocks=blocks, perm=perm, hinv=hinv)


def clip_ratios(w: torch.Tensor, blocks: torch.Tensor, scheme: WeightScheme, *, grid: int = CLIP_GRID,
                min_ratio: float = CLIP_MIN_RATIO) -> torch.Tensor:
    """Per (row, group) range-shrink ratio minimising that group's rounding error d^T H_gg d.

    The search of `hubquant.methods.awq.search_clip` (same candidates, same float32 arithmetic, same
    result), laid out group-major so each candidate is one batched GEMM over contiguous memory. In host memory
    a few groups at a time (each group's search is independent; its three [groups, out, gs] temporaries stay
    near CLIP_CHUNK_ELEMENTS each instead of the weight's size).
    w: [out, in] float32; blocks: [n_groups, gs, gs]. Returns ratios [out, n_groups].
    """
    out_f = w.shape[0]
    ng, gs = blocks.shape[0], blocks.shape[1]
    step = ng if w.is_cuda else max(1, CLIP_CHUNK_ELEMENTS // (out_f * gs))
    best = torch.empty(ng, out_f, device=w.device)
    for g0 in range(0, ng, step):
        g1 = min(ng, g0 + step)
        best[g0:g1] = _clip_search(w[:, g0 * gs: g1 * gs], blocks[g0:g1], scheme, grid, min_ratio)
    return best.T


CLIP_CHUNK_ELEMENTS = 1 << 22  # 16 MB of float32 per temporary of the host clip search


def _clip_search(w: torch.Tensor, blocks: torch.Tensor, scheme: WeightScheme, grid: int,
                 min_ratio: float) -> torch.Tensor:
    """clip_ratios on the groups of `w` [out, ng * gs]; returns [ng, out]."""
    out_f = w.shape[0]
    ng, gs = blocks.shape[0], blocks.shape[1]
    g = w.reshape(out_f, ng, gs).transpose(0, 1).contiguous()  # [ng, out, gs]
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)
    levels = float(2**scheme.bits - 1)
    amax = torch.maximum(-lo, hi) if scheme.symmetric else None
    best_err = torch.full((ng, out_f), float("inf"), device=w.device)
    best_ratio = torch.ones(ng, out_f, device=w.device)
    q = torch.empty_like(g)
    hd = torch.empty_like(g)
    for k in range(grid):
        ratio = 1.0 - (1.0 - min_ratio) * k / grid
        if scheme.symmetric:
            scale = (amax * (ratio / (levels / 2))).clamp_(min=1e-8)
            torch.div(g, scale, out=q).round_().clamp_(scheme.qmin, scheme.qmax)
            d = q.mul_(scale).sub_(g)
        else:
            scale = ((hi - lo) * (ratio / levels)).clamp_(min=1e-8)
            zp = torch.round(scheme.qmin - lo * ratio / scale).clamp_(scheme.qmin, scheme.qmax)
            torch.div(g, scale, out=q).round_().add_(zp).clamp_(scheme.qmin, scheme.qmax)
            d = q.sub_(zp).mul_(scale).sub_(g)
        torch.bmm(d, blocks, out=hd)
        err = hd.mul_(d).sum(-1)  # d_g^T H_gg d_g per (group, row)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio.masked_fill_(better, ratio)
    return best_ratio


def _block_static(wt, hinv1, cst, czt, qt, errt, *, qmin: int, qmax: int) -> None:
    """The column loop of one block with static group parameters, on transposed [B, R] buffers (each column a
    contiguous row; fewer, cheaper ops per column than `_block_step`, same float32 arithmetic).

    wt: weights (updated), hinv1 [B, B], cst/czt per-column scale / zero point (czt None: symmetric),
    qt/errt outputs: codes and errors scaled by 1/hinv[i, i].
    """
    n = wt.shape[0]
    neg_d = (-hinv1.diagonal()).tolist()
    zs = czt.unbind(0) if czt is not None else None
    for i, (w, c, q, e, h) in enumerate(zip(wt.unbind(0), cst.unbind(0), qt.unbind(0), errt.unbind(0),
                                            hinv1.unbind(0))):
        torch.div(w, c, out=q).round_()
        if zs is None:
            q.clamp_(qmin, qmax)
            torch.mul(q, c, out=e)
        else:
            q.add_(zs[i]).clamp_(qmin, qmax)
            torch.sub(q, zs[i], out=e).mul_(c)
        e.sub_(w).div_(neg_d[i])  # (w - deq) / d as (deq - w) / -d: the same float32 value
        if i + 1 < n:
            wt[i + 1:].addr_(h[i + 1:], e, alpha=-1.0)  # push the error onto the columns not yet quantized


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, *, block_size: int = 128,
    damp: float = 0.01, actorder: bool = True, scale_dtype: torch.dtype = torch.float32,
    cuda_graphs: bool = True, inplace: bool = False, clip: bool = False, prep: HessianPrep | None = None,
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
        prep: `prepare_hessian(hessian, ...)` done already (Linears that share an input share it);
            `hessian`, `damp`, `actorder` and `inplace` are then not used.

    Returns:
        (QuantizedWeight with codes in the original column order, half the sum of squared scaled errors).

    Raises:
        CholeskyFailed: the Hessian stays singular with the largest damping.
    """
    w = weight.detach().to(torch.float32, copy=True)  # one float32 copy (not a cast and then a clone)
    out_f, in_f = w.shape
    dev = w.device
    gs = in_f if scheme.group_size == -1 else scheme.group_size
    if in_f % gs:
        minmax_qparams(w, scheme)  # raises the UsageError that names valid group sizes
    if prep is None:
        prep = prepare_hessian(hessian, scheme, damp=damp, actorder=actorder, clip=clip, inplace=inplace)
    w[:, prep.dead] = 0.0

    # static parameters: per channel, or per group with act-order (from the original weight)
    static = scheme.group_size == -1 or actorder
    n_groups = in_f // gs
    scale = torch.zeros(out_f, n_groups, dtype=scale_dtype, device=dev)
    zp = None if scheme.symmetric else torch.zeros(out_f, n_groups, dtype=torch.int8, device=dev)
    if static:
        ratio = clip_ratios(w, prep.blocks, scheme) if (clip and prep.blocks is not None) else 1.0
        s, z = minmax_qparams(w, scheme, scale_dtype=scale_dtype, clip_ratio=ratio)
        scale.copy_(s)
        if zp is not None:
            zp.copy_(z)

    perm, hinv = prep.perm, prep.hinv
    if perm is not None:
        w = w[:, perm]
    group_of = (perm if perm is not None else torch.arange(in_f, device=dev)) // gs

    block = block_size if static else max(gs, (block_size // gs) * gs)  # dynamic groups never straddle blocks
    kw = dict(gs_dyn=0 if static else gs, bits=scheme.bits, symmetric=scheme.symmetric, qmin=scheme.qmin,
              qmax=scheme.qmax, scale_dtype=scale_dtype)
    use_graph = cuda_graphs and dev.type == "cuda"
    fast = static and not use_graph
    small = fast and -128 <= scheme.qmin and scheme.qmax <= 127  # the integer codes fit int8 exactly
    codes = torch.empty(out_f, in_f, dtype=torch.int8 if small else torch.float32, device=dev)
    scale_f = scale.float()
    zp_f = None if zp is None else zp.float()
    loss = torch.zeros((), device=dev)

    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        g1, g2 = i1 // gs, (i2 + gs - 1) // gs
        cols = group_of[i1:i2]
        if fast:
            qt = torch.empty(i2 - i1, out_f, device=dev)
            errt = torch.empty(i2 - i1, out_f, device=dev)
            _block_static(w[:, i1:i2].T.contiguous(), hinv[i1:i2, i1:i2], scale_f[:, cols].T.contiguous(),
                          None if zp_f is None else zp_f[:, cols].T.contiguous(), qt, errt,
                          qmin=scheme.qmin, qmax=scheme.qmax)
            codes[:, i1:i2] = qt.T
            err1 = errt.T.contiguous()
        else:
            # per-column scale / zero point of this block (float); static ones gathered from the groups
            cs = scale_f[:, cols] if static else torch.ones(out_f, i2 - i1, device=dev)
            cz = zp_f[:, cols] if (static and zp is not None) else torch.zeros(out_f, i2 - i1, device=dev)
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

    codes = codes[:, torch.argsort(perm)] if perm is not None else codes
    return QuantizedWeight(qweight=codes.to(torch.int8), scale=scale, zero_point=zp, scheme=scheme), float(loss)


@torch.no_grad()
def fp8_gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, *, block_size: int = 128,
                      damp: float = 0.01, scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """GPTQ on the e4m3 grid: per-channel scales amax/448 of the original weight, columns in decreasing diag(H)
    order, each column's rounding error pushed onto the columns not yet rounded (as int GPTQ does).

    Args:
        weight: [out, in] float weight. hessian: [in, in] 2 X^T X / n of the Linear's inputs (not changed).
        scheme: the FP8 weight scheme. block_size: columns updated lazily together. damp: fraction of mean diag H.
        scale_dtype: dtype of the stored scales (rounding uses the stored value).

    Returns:
        QuantizedWeight with float8_e4m3fn codes in the original column order and scale [out, 1].

    Raises:
        UsageError: not an FP8 per-channel scheme. CholeskyFailed: the Hessian stays singular.
    """
    qw = fp8_quantize_weight(weight, scheme, scale_dtype=scale_dtype)  # checks the scheme, gives the scales
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    sc = qw.scale.float().to(w.device)  # [out, 1]
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    hinv, _ = inverse_hessian_cholesky(h, damp)
    codes = torch.empty_like(w)
    n = w.shape[1]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            c = to_fp8(w1[:, i: i + 1], sc).float()
            codes[:, i1 + i] = c[:, 0]
            e = (w1[:, i] - c[:, 0] * sc[:, 0]) / hinv1[i, i]
            err1[:, i] = e
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)
        if i2 < n:
            w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    qw.qweight = codes[:, torch.argsort(perm)].to(FP8_DTYPE).to(qw.qweight.device)
    return qw


def run(model: torch.nn.Module, job: QuantJob) -> dict[str, QuantizedWeight]:
    """Quantize every Linear of every decoder layer with GPTQ (see the method contract in docs/DESIGN.md).

    Raises:
        UsageError: no calibration data, unknown options, or a layer whose Hessian cannot be inverted.
    """
    if job.calib is None:
        raise UsageError("GPTQ needs calibration data", hint="pass --calib-dataset (or use --method rtn)")
    opts = dataclasses.asdict(job.options_as(GptqOptions, "gptq"))
    scheme = job.scheme.weights
    dtype = model_dtype(model)
    result: dict[str, QuantizedWeight] = results()  # a plain dict, or the sink of a streamed conversion
    fp4_kind = fp4.kind_of(scheme)
    if fp4_kind and job.scheme.activations is not None:
        raise UsageError("--method gptq writes FP4 weights only (NVFP4A16, MXFP4A16)",
                         hint="use --method rtn for --scheme NVFP4 (W4A4)")
    gscales: dict[str, torch.Tensor] = {}  # NVFP4 global scales of the current layer (fused groups share one)

    def quantize_fp4(names: list[str], lins: list, prep: HessianPrep) -> None:
        qws = fp4_method.gptq_quantize([lin.weight for lin in lins], prep, fp4_kind, block_size=opts["block_size"],
                                       gscales=[gscales.get(n) for n in names])
        for name, lin, qw in zip(names, lins, qws):
            lin.weight.data.copy_(qw.dequantize(dtype))
            result[name] = fp4_method._to_cpu(qw)

    def quantize(work: LayerWork, names: list[str], h: torch.Tensor | None, prep: HessianPrep | None) -> HessianPrep:
        """GPTQ on the Linears `names` (one input, so one Hessian) as one matrix; returns the Hessian prep."""
        lins = [work.linears[n] for n in names]
        w = torch.cat([lin.weight for lin in lins], 0) if len(lins) > 1 else lins[0].weight
        try:
            if prep is None:
                prep = prepare_hessian(h, scheme, damp=opts["damp"], actorder=opts["actorder"],
                                       clip=opts["clip"] and not fp4_kind, inplace=True)
            if fp4_kind:
                quantize_fp4(names, lins, prep)
                return prep
            qw, _ = gptq_quantize(w, None, scheme, block_size=opts["block_size"], scale_dtype=dtype,
                                  actorder=opts["actorder"], clip=opts["clip"], prep=prep)
        except CholeskyFailed as e:
            raise UsageError(f"GPTQ failed on {', '.join(names)}: {e}",
                             hint=f"raise --damp (e.g. 0.1), add '{names[0]}' to --ignore, or use --method rtn") from e
        deq = qw.dequantize(dtype)
        row = 0
        for name, lin in zip(names, lins):
            rows = slice(row, row + lin.out_features)
            row += lin.out_features
            result[name] = QuantizedWeight(qweight=qw.qweight[rows].cpu(), scale=qw.scale[rows].cpu(),
                                           zero_point=None if qw.zero_point is None else qw.zero_point[rows].cpu(),
                                           scheme=scheme)
            lin.weight.data.copy_(deq[rows])
        return prep

    def prepare(names: list[str], st: LinearStats) -> HessianPrep:
        """The group's Hessian prep; the Hessian itself is freed before the group is quantized."""
        h = st.xtx.mul_(2.0 / max(st.count, 1))  # the Hessian, in place
        st.xtx = None
        try:
            return prepare_hessian(h, scheme, damp=opts["damp"], actorder=opts["actorder"],
                                   clip=opts["clip"] and not fp4_kind, inplace=True)
        except CholeskyFailed as e:
            raise UsageError(f"GPTQ failed on {', '.join(names)}: {e}",
                             hint=f"raise --damp (e.g. 0.1), add '{names[0]}' to --ignore, or use --method rtn") from e

    @torch.no_grad()
    def on_layer(work: LayerWork) -> None:
        if fp4_kind == "nvfp4":  # from the float weights, before any Linear of the layer changes
            gscales.clear()
            gscales.update(fp4.fused_global_scales({n: lin.weight for n, lin in work.linears.items()}))
        if opts["true_sequential"]:
            preps: dict[int, tuple[weakref.ref, HessianPrep]] = {}  # per input, while the layer keeps the input

            def on_group(names: list[str], st: LinearStats) -> None:
                for k in [k for k, (ref, _) in preps.items() if ref() is None]:
                    del preps[k]
                known = preps.get(id(st))
                prep = known[1] if known else prepare(names, st)
                quantize(work, names, None, prep)
                if len(work.inputs) == 1:  # the Linears reading this input come one call each: they share the prep
                    preps[id(st)] = (weakref.ref(st), prep)

            work.sequential(on_group)
            return
        stats = work.collect(list(work.linears), hessian=True)
        shared: dict[int, list[str]] = {}  # q/k/v and gate/up share one Hessian: quantize them as one matrix
        for name in work.linears:
            shared.setdefault(id(stats[name].xtx), []).append(name)
        for names in shared.values():
            st = stats[names[0]]
            h = st.xtx.mul_(2.0 / max(st.count, 1))  # the Hessian, in place: these stats are not reused
            for n in names:
                stats[n].xtx = None
            quantize(work, names, h, None)
            del h
        del stats

    run_layers(model, job.calib, on_layer=on_layer, device=job.device, ignore=job.ignore,
               progress=job.progress, desc="gptq")
    _GRAPHS.clear()
    return result
