"""Where an eager W4A16 / W8A8 / FP4 call spends its host time (CPU microseconds per call, M=1, 4096x4096).

    python bench/kernels/host_profile.py        # on a CUDA machine

Times each entry point with the direct launcher (hubquant_kernels._common.launch) on and off
(HUBQUANT_FAST_LAUNCH), and the ops bound per layer at load time (hubquant_kernels.bound: what W4A16Linear and
W8A8Linear call), then prints a cProfile of 300 bound W4A16 calls. --json PATH writes the figures. Kernels are
not tuned (HUBQUANT_TUNE=0): the host path is the same whichever configuration runs.
"""
from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(Path(__file__).resolve().parent)]
os.environ["HUBQUANT_TUNE"] = "0"

import peers  # noqa: E402

from hubquant_kernels import fp4, fp8, pack, w4a16, w8a8  # noqa: E402


def per_call_us(f, reps=300) -> float:
    for _ in range(10):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    t = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return t


def main() -> int:
    k = n = 4096
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, scale, _ = pack.rtn_pack(w, 128, True)
    qw, sc = pack.ct_to_kernel_layout(packed, k), scale.t().contiguous()
    qi, si = peers.int8_quantize(w)
    p4, s4, g4 = peers.fp4_quantize(w, "nvfp4")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    c = w4a16.candidates(1, n, k, 128)[0]
    qf, sf = fp8.quantize_weight_fp8(w)
    b4, b8, bf8 = w4a16.bind(qw, sc, None, 128), w8a8.bind(qi, si), w8a8.bind(qf, sf)
    calls = {"F.linear": lambda: torch.nn.functional.linear(x, w),
             "w4a16 bound": lambda: b4(x), "w8a8 bound": lambda: b8(x), "fp8 bound": lambda: bf8(x),
             "w4a16_matmul": lambda: w4a16.w4a16_matmul(x, qw, sc, None, 128),
             "w4a16 candidate fn only": lambda: c.fn(x, qw, sc, None, None, y, 128),
             "w8a8_matmul": lambda: w8a8.w8a8_matmul(x, qi, si),
             "fp4_linear": lambda: fp4.fp4_linear(x, p4, s4, g4, "nvfp4"),
             "empty kernel-free python (torch.empty)": lambda: torch.empty(1, n, device="cuda")}
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for fast in ("1", "0"):
        os.environ["HUBQUANT_FAST_LAUNCH"] = fast
        res[f"fast_launch_{fast}"] = {name: per_call_us(f) for name, f in calls.items()}
        figures = ", ".join(f"{k_} {v_:.1f}" for k_, v_ in res[f"fast_launch_{fast}"].items())
        print(f"HUBQUANT_FAST_LAUNCH={fast}: {figures}", flush=True)
    os.environ["HUBQUANT_FAST_LAUNCH"] = "1"
    res["plans"] = {"w4a16": b4.plans(), "w8a8": b8.plans(), "fp8": bf8.plans()}
    ref = w4a16.w4a16_matmul(x, qw, sc, None, 128)
    same8 = torch.equal(b8(x), w8a8.w8a8_matmul(x, qi, si))
    res["bound_equals_entry_point"] = bool(torch.equal(b4(x), ref)) and bool(same8)
    print(f"plans {res['plans']}; bound outputs equal the entry points': {res['bound_equals_entry_point']}", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        b4(x)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    from hubquant_kernels import _common

    print(f"direct launches cached: {len(_common._LAUNCHES)}; launcher rejected: {_common._FAST_BROKEN}")
    res["launcher_rejected"] = _common._FAST_BROKEN
    if len(sys.argv) > 2 and sys.argv[1] == "--json":
        import json

        Path(sys.argv[2]).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
