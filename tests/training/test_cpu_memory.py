"""callbacks.cpu_memory: a CPU run keeps freed activations in the process instead of page-faulting them in again."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from kd.errors import KdError
from kd.training import cpu_memory
from kd.training.cpu_memory import KeepCpuMemory

# In a fresh process: glibc's thresholds are process-wide and cannot be put back. A "step" allocates and frees
# tensors of 1 to 64 MiB, as a training step's activations do; the page faults of 10 more steps are printed.
STEPS = textwrap.dedent(
    """
    import resource, sys
    import torch

    if sys.argv[1] == "callback":  # the callback as the default config has it, in a real Trainer on the CPU
        import lightning as L
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
        from kd.io import CONF_DIR

        callback = instantiate(OmegaConf.load(CONF_DIR / "callbacks" / "default.yaml").cpu_memory)
        callback.setup(L.Trainer(accelerator="cpu", logger=False), None, "fit")

    def step():
        tensors = [torch.ones(n) for n in (2**18, 2**20, 2**22, 2**24)]
        return sum(float(t[-1]) for t in tensors)

    step()
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_the_default_callback_stops_the_page_faults_of_every_step():
    without = page_faults("none")
    with_callback = page_faults("callback")
    # 64 MiB is above glibc's adaptive mmap threshold: unmapped and faulted in again (16384 pages) every step.
    assert without > 10 * 16384 * 0.9
    assert with_callback < without / 10


def test_a_gpu_run_leaves_malloc_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_cpu_memory", calls.append)
    on = SimpleNamespace(strategy=SimpleNamespace(root_device=SimpleNamespace(type="cuda")))
    KeepCpuMemory().setup(on, None, "fit")
    assert calls == []
    on.strategy.root_device.type = "cpu"
    KeepCpuMemory(threshold_mb=256).setup(on, None, "fit")
    assert calls == [256 * 2**20]


@pytest.mark.parametrize("threshold_mb", [0, 4096, 512.5, "1g", True])
def test_a_threshold_mallopt_cannot_take_is_refused(threshold_mb):
    with pytest.raises(KdError, match="whole number of MiB from 1 to 2047"):
        KeepCpuMemory(threshold_mb=threshold_mb)
