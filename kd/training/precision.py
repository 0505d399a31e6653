"""bf16 where the hardware computes it natively: the one capability check, and ``trainer.precision=auto``.

CUDA GPUs from Ampere on and x86 CPUs with AVX512-BF16 (Cooper Lake, Zen 4) or AMX (Sapphire Rapids) compute
bfloat16 in hardware; PyTorch's kernels (cuDNN, oneDNN) then run a convolution in bf16 in about half the time of
float32. Elsewhere bf16 is emulated and slower, so kd's ``auto`` settings stay in float32 there.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger("kd")

#: /proc/cpuinfo flags of x86 CPUs that compute bf16 in hardware.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The bf16 flags this CPU reports in /proc/cpuinfo (Linux on x86; none elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)


def native_bf16(device_type: str) -> bool:
    """True where ``device_type`` computes bf16 in hardware: a CUDA GPU that supports it without emulation, or a
    CPU with AVX512-BF16 or AMX whose AVX512 kernels PyTorch uses (``get_cpu_capability``). Tests force it."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512") and bool(cpu_bf16_flags())
    return False


def hardware_name(device_type: str) -> str:
    """How a log line names the bf16 hardware: ``a GPU with bf16`` or ``this CPU's AVX512_BF16``."""
    return "a GPU with bf16" if device_type == "cuda" else f"this CPU's {'/'.join(cpu_bf16_flags()).upper()}"


def device_type_of(accelerator: str | None) -> str:
    """The torch device type a Lightning ``accelerator`` setting trains on."""
    if accelerator in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if accelerator in ("gpu", "cuda") else str(accelerator)


def trainer_precision(precision: str | int, device_type: str) -> str | int:
    """Lightning's precision for ``trainer.precision``: ``auto`` (the default) is ``bf16-mixed`` where the device
    computes bf16 natively, ``32-true`` elsewhere; any other value is Lightning's, as given."""
    if str(precision) != "auto":
        return precision
    return "bf16-mixed" if native_bf16(device_type) else "32-true"
