"""What the one-call GPU scripts in bench/kernels share: the timing helpers of run.py, a CPU smoke timer, the
header of every results file, and loading a sibling script as a module."""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HUBQUANT_TUNE_CACHE", "0")  # benchmarks time the chooser afresh, never from disk


def sibling(name: str):
    """bench/kernels/<name>.py as a module (the scripts are files, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_kernels_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def smoke_time(fns, reps: int = 1) -> float:
    """--smoke stand-in for run.graph_time: seconds per call of plain calls (checks the script, times nothing)."""
    t = time.perf_counter()
    for _ in range(reps):
        for f in fns:
            f()
    return (time.perf_counter() - t) / (reps * len(fns))


def header(dev: str) -> dict:
    """date, GPU, torch and Triton versions for a results file."""
    import triton

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__}


def parse_shapes(spec: str, default: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """'all' or a comma list of KxN."""
    return default if spec == "all" else [tuple(map(int, s.split("x"))) for s in spec.split(",")]


def run_sweep(out: Path, dev: str, checks, bench_shape, shapes, ms, copy_bandwidth) -> dict:
    """Checks first, then the copy-bandwidth ceiling, then one shape at a time; the JSON is rewritten after each
    step, so a run cut short by the device's time limit still leaves its numbers."""
    import json

    t0 = time.time()
    res = {**header(dev), "cells": []}

    def log(s):
        print(s, flush=True)

    def save():
        res["seconds"] = round(time.time() - t0, 1)
        Path(out).write_text(json.dumps(res, indent=1, default=str))

    res["checks"] = checks(log)
    save()
    res["copy_bytes_per_s"] = copy_bandwidth()
    log(f"{res['gpu']}: copy {res['copy_bytes_per_s'] / 1e12:.2f} TB/s")
    for k, n in shapes:
        res["cells"] += bench_shape(k, n, ms, log)
        save()
        if dev == "cuda":
            torch.cuda.empty_cache()
    log(f"done in {time.time() - t0:.0f} s")
    return res


def pick(dev: str, cands, args):
    """The fastest candidate by hubquant's chooser (cold L2), under a private key; the first one off the GPU."""
    from hubquant_kernels import _common

    if dev != "cuda":
        return cands[0], {}
    key = ("bench", id(cands), time.time())
    c = _common.choose(key, cands, args, on_gpu=True)
    return c, _common.TUNE_LOG.get(key, {})


def w4_weights(k: int, n: int, dev: str, rotate_bytes: int):
    """Seeded bf16 weights [N, K] and their W4 g128 kernel-layout copy, each rotated over enough copies (>=
    rotate_bytes together) that timed calls stream from HBM: (generator, qweight, scales, bf16 copies, W4 copies)."""
    import math

    from hubquant_kernels import pack

    g = torch.Generator(device=dev).manual_seed(k * 31 + n)
    w = torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
    packed, scale, _ = pack.rtn_pack(w, 128, True)
    qw, sc = pack.ct_to_kernel_layout(packed, k), scale.t().contiguous()
    reps = lambda nbytes: max(1, min(64, math.ceil(rotate_bytes / nbytes)))  # noqa: E731
    bf_w = [w.clone() for _ in range(reps(2 * n * k))]
    w4_w = [(qw.clone(), sc.clone()) for _ in range(reps(n * k // 2 + 2 * n * k // 128))]
    return g, qw, sc, bf_w, w4_w


def time_w4(graph_time, c, x, w4_w, ys) -> float:
    """Seconds per call of W4A16 candidate `c` on x, one call per rotated weight copy (outputs into ys)."""
    return graph_time([lambda d=d, yy=yy: c.fn(x, d[0], d[1], None, None, yy, 128) for d, yy in zip(w4_w, ys)])
