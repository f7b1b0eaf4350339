"""Triton kernels for lora-kernels: the fallback on CUDA when the compiled extension is missing,
and runnable on the CPU under TRITON_INTERPRET=1 for testing."""
