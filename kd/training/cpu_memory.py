"""Training on a CPU without handing every step's activations back to the operating system.

glibc's malloc serves large blocks (from 128 KiB, a threshold it raises as it goes) with ``mmap`` and returns
them with ``munmap`` when they are freed, and it trims the top of its heap once enough of it is free. A
training step frees its activations at its end and asks for the same sizes at the next step's start, so the
kernel maps, zeroes and page-faults them in again at every step: that is time in the kernel (``sys``), not in
the convolutions. PyTorch has a caching allocator for CUDA, none for CPU tensors. Raising both thresholds
(glibc's ``mallopt``, the runtime form of ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``) keeps
freed blocks in the process for the next step. The peak memory of a step does not change; the memory is
kept until the process ends instead of going back to the system between steps.

It is a process-wide setting of the C library and stays for the rest of the process (glibc has no call that
restores its adaptive default). Other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

import lightning as L

from kd.errors import KdError

log = logging.getLogger("kd")

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3


def keep_freed_cpu_memory(threshold_bytes: int) -> bool:
    """Ask glibc to serve blocks below ``threshold_bytes`` from its heap and to keep up to that much free at
    its top; True when glibc took both settings, False elsewhere (another C library, or a refused value)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, threshold_bytes))


class KeepCpuMemory(L.Callback):
    """On a CPU run, ``keep_freed_cpu_memory`` before the first step (see the module docstring); on a GPU it
    does nothing (PyTorch's CUDA allocator already caches). Remove it with ``~callbacks.cpu_memory``."""

    def __init__(self, threshold_mb: int = 1024) -> None:
        whole = isinstance(threshold_mb, int) and not isinstance(threshold_mb, bool)
        if not whole or not 1 <= threshold_mb <= 2047:  # mallopt takes an int of bytes
            raise KdError(
                f"callbacks.cpu_memory.threshold_mb={threshold_mb!r} is not a whole number of MiB from 1 to 2047; "
                "give one such as 1024"
            )
        self.threshold_mb = threshold_mb

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.strategy.root_device.type != "cpu":
            return
        if keep_freed_cpu_memory(self.threshold_mb * 2**20):
            log.debug("glibc keeps freed blocks up to %d MiB for the next step", self.threshold_mb)
        else:
            log.debug("callbacks.cpu_memory: this C library took no malloc setting; its default stays")
