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
