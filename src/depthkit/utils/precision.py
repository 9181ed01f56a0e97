"""Which floating-point type computes fastest on a device: the `auto` dtype and mixed precision.

bfloat16 halves memory and, where the hardware multiplies bf16 natively, runs about 3x faster than
float32 on CPU (AVX512-BF16 or AMX) and far faster on CUDA GPUs from Ampere on. Where it does not,
PyTorch emulates bf16 matmuls and they run about 10x SLOWER than float32 (measured on an AMD EPYC
with AVX2 only: a 512 x 576 x 1536 linear layer in 132 ms against 13 ms in float32; a step of the
recursion benchmark's training 25x slower, 73 s against 2.9 s). So `auto`, the default everywhere,
means bf16 where it is native and float32 elsewhere; `bfloat16` or `float32` by name still get
exactly that.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 / AMX, Arm's BF16 extension


@cache
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (PyTorch's own probe, else the kernel's CPU flags)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and bf16_in_cpu_flags(cpuinfo.read_text())


def bf16_in_cpu_flags(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo text lists a native bf16 extension (x86 `flags`, Arm `Features`)."""
    flags = {word for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))
             for word in line.split(":", 1)[-1].split()}
    return bool(flags & CPU_BF16_FLAGS)


def native_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls are native (hence faster than float32) on `device`."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return cpu_has_native_bfloat16()
    return False


def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The `auto` dtype: bfloat16 where it is native on `device`, float32 elsewhere."""
    return torch.bfloat16 if native_bfloat16(device) else torch.float32


def fast_mixed_precision(device: str | torch.device = "cpu") -> str:
    """The `auto` mixed precision of training (accelerate's names): bf16 autocast where native, else none."""
    return "bf16" if native_bfloat16(device) else "no"


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16": how results and configs record the dtype a run used."""
    return str(dtype).removeprefix("torch.")


MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")


def resolve_mixed_precision(name: str, device: str | torch.device | None = None) -> str:
    """accelerate's mixed precision for `name`; "auto" is bf16 autocast where native on `device`
    (by default the one accelerate trains on: the GPU if there is one), else none."""
    if name != "auto":
        return name
    return fast_mixed_precision(device or ("cuda" if torch.cuda.is_available() else "cpu"))
