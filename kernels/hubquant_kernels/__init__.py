"""Triton kernels for hubquant variants (W4A16, W8A8 int8, FP8), each beside its torch reference."""
