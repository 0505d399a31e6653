"""How fast the final student runs once deployed: what a student is chosen for, next to its accuracy.

After ``task=distill``, ``train`` or ``export``, results.json gets ``student_speed``: parameters, FLOPs of
one image's forward pass (``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-add, convolutions
and matrix products only, as papers count them), and on the run's device, PyTorch eager in eval mode under
``torch.inference_mode`` (the exported, contiguous NCHW weights): milliseconds per image at batch 1 and
images/s at batch 64; with ``onnx`` for an exported ONNX file, the same through ONNX Runtime on the CPU.

Each timing runs one warm-up call, then calls until ``budget_s`` seconds have passed (at least one): a
measurement costs a few seconds, not minutes. ``student.measure_speed=false`` turns it off.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

#: Batch sizes of the two timings: latency (one image at a time) and throughput (a full batch).
LATENCY_BATCH, THROUGHPUT_BATCH = 1, 64


def count_parameters(model: nn.Module) -> int:
    """Every parameter of the network, trainable or not (BatchNorm's running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: tuple[int, ...], device: torch.device | str = "cpu") -> int:
    """FLOPs of the forward pass of one image of ``input_size`` (C, H, W), as FlopCounterMode counts them."""
    model = copy.deepcopy(model).to(device).eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, *input_size, device=device))
    return int(counter.get_total_flops())


def seconds_per_call(run: Callable[[], object], budget_s: float, synchronize: Callable[[], None]) -> float:
    """Mean seconds of one call over as many calls as fit in ``budget_s`` (at least one), after one warm-up call."""
    run()
    synchronize()
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            return elapsed / calls


def eager_timings(model: nn.Module, input_size: tuple[int, ...], device: torch.device, budget_s: float) -> dict:
    model = copy.deepcopy(model).to(device, memory_format=torch.contiguous_format).eval()
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {}
    with torch.inference_mode():
        for batch, key in ((LATENCY_BATCH, "batch1_ms_per_image"), (THROUGHPUT_BATCH, "batch64_images_per_s")):
            images = torch.rand(batch, *input_size, device=device)
            seconds = seconds_per_call(lambda images=images: model(images), budget_s, synchronize)
            result[key] = round(seconds * 1e3 / batch, 3) if batch == LATENCY_BATCH else round(batch / seconds, 1)
    return result


def onnx_timings(path: Path, input_size: tuple[int, ...], budget_s: float) -> dict:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    result = {"device": "cpu", "provider": "CPUExecutionProvider"}
    for batch, key in ((LATENCY_BATCH, "batch1_ms_per_image"), (THROUGHPUT_BATCH, "batch64_images_per_s")):
        images = torch.rand(batch, *input_size).numpy()
        seconds = seconds_per_call(lambda images=images: session.run(None, {name: images}), budget_s, lambda: None)
        result[key] = round(seconds * 1e3 / batch, 3) if batch == LATENCY_BATCH else round(batch / seconds, 1)
    return result


def student_speed(
    student: nn.Module,
    input_size: tuple[int, ...],
    device: torch.device | str = "cpu",
    onnx: Path | None = None,
    budget_s: float = 1.0,
) -> dict:
    """``student_speed`` of results.json: parameters, FLOPs per image, and eager (and ONNX Runtime) timings."""
    device = torch.device(device)
    speed = {
        "parameters": count_parameters(student),
        "flops_per_image": count_flops(student, input_size, device),
        "input_size": list(input_size),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "eager": eager_timings(student, input_size, device, budget_s),
    }
    if onnx is not None:
        speed["onnx"] = onnx_timings(onnx, input_size, budget_s)
    return speed
