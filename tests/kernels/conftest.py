"""Kernel tests run the Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1).

triton.jit decides between compiled and interpreted functions when a module is imported, so the variable is set
here, and the kernel modules are reloaded if another test imported them first.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest

os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def interpreted_kernels():
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    import hubquant_kernels.w4a16 as w4

    if not isinstance(w4._w4a16_gemv_kernel, InterpretedFunction):
        for name in ("hubquant_kernels.pack", "hubquant_kernels.w8_tiles", "hubquant_kernels.w4a16",
                     "hubquant_kernels.w4a16_gemv",
                     "hubquant_kernels.w8a8", "hubquant_kernels.fp8", "hubquant_kernels.fused",
                     "hubquant_kernels.w4a16_tc", "hubquant_kernels.fp4", "hubquant_kernels.quant_mm",
                     "hubquant_kernels.w4a16_gemv3", "hubquant_kernels.w4a16_mmv"):
            if name in sys.modules:
                importlib.reload(sys.modules[name])
    yield
