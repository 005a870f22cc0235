"""Compile hubquant's W4A16 kernels for sm_90 without a GPU and count what the compiler emitted.

    python bench/kernels/sass_report.py                  # needs triton (its bundled ptxas/cuobjdump), no GPU
    python bench/kernels/sass_report.py --gemv2-budget   # JSON: gemv2's K-loop instructions, plain vs PTX
    python bench/kernels/sass_report.py --mmv-budget [--all]  # JSON: the MMA GEMV's K loop (instructions, HMMAs)

For each kernel configuration: registers (ptxas), shared memory, and the SASS of the K loop (the longest
backward-branch loop) as instructions per weight and an opcode histogram, so that instruction counts can be
compared before any device time is spent (METHOD.md: read what costs no device time). Counts are static:
compiled instructions of one loop iteration, per thread.
"""
from __future__ import annotations

import collections
import json
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
TYPES = {p: "*i32" if p in ("qw_ptr", "cnt_ptr") else ("*fp32" if p == "ws_ptr" else "*bf16") for p in PTRS}
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_LINE = re.compile(r"\s*/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def compile_kernel(fn, types: dict, constexprs: dict, warps: int, stages: int):
    sig = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    # what a real launch specializes on: pointers and sizes/strides divisible by 16 (all Llama shapes are)
    div16 = [(i,) for i, name in enumerate(fn.arg_names) if name not in constexprs and name != "M"]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs={a: [["tt.divisibility", 16]] for a in div16})
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def sass_lines(kernel) -> list[tuple[int, str, str]]:
    """(address, opcode, line) of every SASS instruction of the kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    out = []
    for line in sass.splitlines():
        m = _LINE.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).split(".")[0], line))
    return out


def loop_body(kernel) -> list[str]:
    """The SASS lines of the longest backward-branch loop (the K loop)."""
    lines = sass_lines(kernel)
    index = {addr: i for i, (addr, _, _) in enumerate(lines)}
    best = (0, -1)
    for i, (addr, _, line) in enumerate(lines):
        m = re.search(r"BRA\s+0x([0-9a-f]+)", line)
        if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in index:
            start = index[int(m.group(1), 16)]
            if i - start > best[1] - best[0]:
                best = (start, i)
    return [line for _, _, line in lines[best[0]:best[1] + 1]]


def registers(kernel) -> str:
    """ptxas' register count for the kernel's PTX (sm_90a)."""
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        err = subprocess.run([str(BIN / "ptxas"), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    m = re.search(r"Used (\d+) registers", err)
    if m:
        return m.group(1)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:  # ptxas -v printed nothing: the cubin's own record
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)", res)
    return m.group(1) if m else "?"


def report(label: str, kernel, weights_per_thread: float) -> None:
    body = loop_body(kernel)
    ops = collections.Counter(_LINE.match(line).group(2).split(".")[0] for line in body)
    top = " ".join(f"{k}={v}" for k, v in ops.most_common(10))
    print(f"{label}: {registers(kernel)} registers, shared {kernel.metadata.shared} B, K loop {len(body)} "
          f"instructions = {len(body) / weights_per_thread:.2f} a weight; {top}")


def gemv2_budget() -> dict:
    """K-loop SASS instructions of gemv2 (bn64, bk256, 4 warps, g128) with plain-Triton and PTX dequantization."""
    from hubquant_kernels import w4a16_gemv

    out = {"weights_per_thread": 64 * 256 / (32 * 4)}
    for asm in (False, True):
        k = compile_kernel(w4a16_gemv._w4a16_gemv2_kernel, TYPES,
                           dict(GS=128, HAS_ZP=False, HAS_BIAS=False, BN=64, BK=256, SPLIT_K=8, SCALE_AFTER=False,
                                USE_ASM=asm, EVEN=True, DEPTH=1), 4, 3)
        out["ptx" if asm else "plain"] = len(loop_body(k))
    return out


def mmv_budget(mb: int = 1, pf: bool = True, wn: int = 2, wk: int = 4) -> dict:
    """K-loop SASS of the MMA GEMV (g128, bf16): registers, instructions per weight and the MMAs in the loop."""
    from hubquant_kernels import w4a16_mmv

    k = compile_kernel(w4a16_mmv._w4a16_mmv_kernel, TYPES,
                       dict(GS=128, ONE_GROUP=False, HAS_ZP=False, HAS_BIAS=False, WN=wn, WK=wk, SPLIT_K=1,
                            FP16=False, MB=mb, PF=pf, EMUL=False), wn * wk, 1)
    body = loop_body(k)
    ops = collections.Counter(_LINE.match(line).group(2).split(".")[0] for line in body)
    return {"weights_per_thread": 128 * 32 / 32, "loop": len(body), "hmma": ops.get("HMMA", 0),
            "ldg": ops.get("LDG", 0), "registers": registers(k), "mb": mb, "prefetch": pf, "wn": wn, "wk": wk,
            "shared": k.metadata.shared,
            "top": dict(ops.most_common(8))}


def main() -> None:
    from hubquant_kernels import w4a16_gemv, w4a16_tc

    common = dict(GS=128, HAS_ZP=False, HAS_BIAS=False)
    for asm in (False, True):
        for bn, bk, warps in ((64, 256, 4), (128, 128, 4)):
            k = compile_kernel(w4a16_gemv._w4a16_gemv2_kernel, TYPES,
                               dict(common, BN=bn, BK=bk, SPLIT_K=8, SCALE_AFTER=bk == 128, USE_ASM=asm, EVEN=True,
                                    DEPTH=1), warps, 3)
            report(f"gemv2 ptx={asm} bn{bn} bk{bk} w{warps}", k, bn * bk / (32 * warps))
    for swap in (False, True):
        for bn, bk, warps in ((64, 128, 4), (256, 128, 4), (256, 128, 8)):
            k = compile_kernel(w4a16_tc._w4a16_tc_kernel, TYPES,
                               dict(common, BM=16, BN=bn, BK=bk, SPLIT_K=4, SCALE_AFTER=True, SWAP=swap, USE_ASM=True,
                                    FP16=False, DOT_F32=False), warps, 2)
            report(f"tc swap={swap} bn{bn} bk{bk} w{warps}", k, bn * bk / (32 * warps))


if __name__ == "__main__":
    if sys.argv[1:] == ["--gemv2-budget"]:
        print(json.dumps(gemv2_budget()))
    elif sys.argv[1:2] == ["--mmv-budget"]:
        for mb, pf in ((2, True), (1, False)) if sys.argv[2:] == ["--all"] else ():
            print(json.dumps(mmv_budget(mb, pf)))
        print(json.dumps(mmv_budget()))
    else:
        main()
