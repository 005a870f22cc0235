"""The GEMV's instruction budget, read off the SASS that Triton's bundled ptxas emits for sm_90 (no GPU needed).

Pins the mechanism behind the H100 speedup in docs/kernels.md: the PTX dequantization (one shift and one 3-input
LOP3 a nibble) takes instructions out of the K loop that plain Triton code leaves in. Runs in a subprocess: the
test session imports the kernels under TRITON_INTERPRET=1, which cannot compile.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _sass_report(flag: str) -> dict:
    """The last JSON line of `bench/kernels/sass_report.py FLAG` (compiled for sm_90 on the CPU; skips without
    Triton's bundled ptxas/cuobjdump)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels" / "sass_report.py"), flag],
                       capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr or "cuobjdump" in r.stderr):
        pytest.skip(f"cannot compile for sm_90 here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_gemv2_ptx_dequantization_cuts_instructions_per_weight():
    counts = _sass_report("--gemv2-budget")
    assert counts["ptx"] / counts["weights_per_thread"] < 5.0, counts
    assert counts["ptx"] < 0.92 * counts["plain"], counts


def test_mmv_loop_is_tensor_core_mma_with_few_instructions_per_weight():
    """The MMA GEMV's K loop (stored layout, register prefetch): one HMMA per 8 weights a lane holds, < 2.6
    instructions a weight (the rotated-code FMA GEMV needs ~3.8, gemv2 ~4.2), and few registers, so that many
    programs share an SM and keep loads in flight."""
    c = _sass_report("--mmv-budget")
    assert c["hmma"] == c["weights_per_thread"] / 8, c
    assert c["loop"] / c["weights_per_thread"] < 2.6, c
    assert c["ldg"] <= 10, c  # per 128 weights a lane: 4 x 16 B of codes, 4 x 16 B of x, one 8-byte scale load
    assert int(c["registers"]) <= 96, c
