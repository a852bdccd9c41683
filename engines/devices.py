"""Device and dtype choice shared by the engines (``--device auto``, ``--dtype auto``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def default_threads() -> int:
    """Available cores minus one, at least one.

    Measured on the 2-core machine (benchmarks/README.md): with torch on every core, each
    message the socket thread, broker or client handles preempts one of torch's threads, and
    every parallel region waits for the straggler; 1-item requests ran at 0.32x the raw
    batch-32 rate with 2 threads and 0.67x with 1.
    """
    return max(1, available_cores() - 1)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return device


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 is ~2x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that have it (else fp16) and on CPUs with native bf16, else fp32."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"--dtype must be auto, fp32, bf16 or fp16, not {name!r}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """Inverse of :data:`DTYPES`."""
    return next(k for k, v in DTYPES.items() if v == dtype)
