"""Compile hubquant's W4A16 kernels for sm_90 without a GPU and count what the compiler emitted.

    python bench/kernels/sass_report.py            # needs triton (with its bundled ptxas/cuobjdump), no GPU

For each kernel configuration: registers, spills, shared memory, and a histogram of SASS opcodes, so that
instruction counts per weight can be compared before any device time is spent (METHOD.md: read what costs no
device time). Counts are static (per compiled instruction, not per execution).
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTRS = ("x_ptr", "qw_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "ws_ptr", "cnt_ptr")


def compile_kernel(fn, types: dict, constexprs: dict, warps: int, stages: int):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "i32")
    # what a real launch specializes on: pointers and sizes/strides divisible by 16 (all Llama shapes are)
    div16 = [(i,) for i, name in enumerate(fn.arg_names) if name not in constexprs and name not in ("M",)]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs={a: [["tt.divisibility", 16]] for a in div16})
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def sass_histogram(kernel) -> collections.Counter:
    cubin = kernel.asm["cubin"]
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    return ops


def report(label, kernel, keys=("LDG", "LOP3", "PRMT", "SHF", "IMAD", "FFMA", "FADD", "HMMA", "HGMMA", "F2FP",
                                  "I2F", "STS", "LDS", "LDSM", "BAR", "ATOMG", "RED")):
    ops = sass_histogram(kernel)
    md = kernel.metadata
    n_regs = getattr(kernel, "n_regs", None)
    n_spills = getattr(kernel, "n_spills", None)
    if n_regs is None:  # triton 3.x keeps them on the compiled kernel after init
        try:
            kernel._init_handles()
        except Exception:  # noqa: BLE001  (no GPU: fall back to ptxas' own report)
            pass
        n_regs, n_spills = getattr(kernel, "n_regs", "?"), getattr(kernel, "n_spills", "?")
    print(f"{label}: shared {md.shared} B, total SASS {sum(ops.values())}; " +
          " ".join(f"{k}={ops.get(k, 0)}" for k in keys))
    return ops


def main() -> None:
    from hubquant_kernels import w4a16, w4a16_gemv, w4a16_tc

    types = {p: "*i32" if p in ("qw_ptr", "cnt_ptr") else ("*fp32" if p == "ws_ptr" else "*bf16") for p in PTRS}
    common = dict(GS=128, HAS_ZP=False, HAS_BIAS=False)
    for bn, bk, split, warps in ((64, 256, 8, 4),):
        k = compile_kernel(w4a16_gemv._w4a16_gemv2_kernel, types,
                           dict(common, BN=bn, BK=bk, SPLIT_K=split, SCALE_AFTER=False), warps, 3)
        report(f"gemv2 bn{bn} bk{bk} s{split} w{warps}", k)
    for swap in (False, True):
        for asm in (False, True):
            for bn, bk, warps in ((64, 128, 4), (128, 256, 8)):
                k = compile_kernel(w4a16_tc._w4a16_tc_kernel, types,
                                   dict(common, BM=16, BN=bn, BK=bk, SPLIT_K=4, SCALE_AFTER=True, SWAP=swap,
                                        USE_ASM=asm, FP16=False, DOT_F32=False), warps, 2)
                report(f"tc swap={swap} asm={asm} bn{bn} bk{bk} w{warps}", k)





def loop_body(kernel) -> list[str]:
    """The SASS lines of the longest backward-branch loop (the K loop)."""
    cubin = kernel.asm["cubin"]
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4}\*/", ln)]
    addr = [int(re.match(r"\s*/\*([0-9a-f]{4})\*/", ln).group(1), 16) for ln in lines]
    best = (0, 0)
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", ln)
        if m and m.group(1):
            tgt = int(m.group(1), 16)
            if tgt < addr[i] and i - addr.index(tgt) > best[1] - best[0] if tgt in addr else False:
                best = (addr.index(tgt), i)
    return lines[best[0]:best[1] + 1]


def gemv2_budget() -> dict:
    """K-loop SASS instructions of gemv2 (bn64, bk256, 4 warps, g128) with plain-Triton and PTX dequantization."""
    from hubquant_kernels import w4a16_gemv

    types = {p: "*i32" if p in ("qw_ptr", "cnt_ptr") else ("*fp32" if p == "ws_ptr" else "*bf16") for p in PTRS}
    out = {"weights_per_thread": 64 * 256 / (32 * 4)}
    for asm in (False, True):
        k = compile_kernel(w4a16_gemv._w4a16_gemv2_kernel, types,
                           dict(GS=128, HAS_ZP=False, HAS_BIAS=False, BN=64, BK=256, SPLIT_K=8, SCALE_AFTER=False,
                                USE_ASM=asm, EVEN=True, DEPTH=1), 4, 3)
        out["ptx" if asm else "plain"] = len(loop_body(k))
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--gemv2-budget"]:
        import json

        print(json.dumps(gemv2_budget()))
    else:
        main()
