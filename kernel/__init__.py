"""The aiosfs kernel: syscalls, scheduling, the LLM engine and the managers.

It knows nothing about FUSE; tests and benchmarks use it in-process.
"""
