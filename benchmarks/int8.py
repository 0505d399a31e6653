"""INT8 against fp32 in ONNX Runtime on this CPU: the speed a ``task=quantize`` student gains. Not a test.

Builds a timm ``resnet18`` student (random weights, 10 classes) at ``--image-size`` (224), writes its fp32 ONNX the
way ``task=export`` does (``student.onnx``, BatchNorm left to ONNX Runtime's own fusion) and its INT8 QDQ file the
way ``task=quantize`` does (BatchNorm folded, ONNX Runtime's ``quantize_static`` on ``--calibration-batches``
random batches), then times both through ONNX Runtime on the CPU: milliseconds per image at batch 1 and images/s at
batch 64. The two files alternate in paired rounds (fp32, INT8, fp32, INT8, ...), each timing ``--seconds`` long
after one warm-up call, so a load change on a shared machine hits both alike; the per-round ratio fp32 / INT8 and
its median are reported with the load average. Prints one JSON object.

    python benchmarks/int8.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
import timm
import torch

from kd.models import Classifier, Preprocessing
from kd.students.card import StudentCard
from kd.students.export import write_onnx
from kd.students.quantize import FakeQuantStudent, check_int8_cpu, fold_batchnorm, int8_nodes, quantize_onnx


def timed(session: onnxruntime.InferenceSession, images, seconds: float) -> float:
    """Seconds per call, over as many calls as fit in ``seconds`` (at least one), after one warm-up call."""
    feed = {session.get_inputs()[0].name: images}
    session.run(None, feed)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls == 0:
        session.run(None, feed)
        calls += 1
    return elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing length of each measurement")
    parser.add_argument("--calibration-batches", type=int, default=4)
    args = parser.parse_args()
    check_int8_cpu()
    torch.manual_seed(0)
    size = args.image_size
    net = timm.create_model(args.model, num_classes=10, zero_init_last=False).eval()
    student = Classifier(net, Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (3, size, size)))
    card = StudentCard([str(i) for i in range(10)], student.preprocessing, args.model)
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.rand(8, 3, size, size, generator=generator) for _ in range(args.calibration_batches)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fp32 = write_onnx(student, card, folder / "student.onnx")
        twin = FakeQuantStudent(fold_batchnorm(student, args.model))
        twin.calibrate(calibration)
        folded = write_onnx(twin.fp32(), card, folder / "folded.onnx")
        int8 = quantize_onnx(folded, folder / "student.int8.onnx", calibration)
        sessions = {
            name: onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for name, path in (("fp32", fp32), ("int8", int8))
        }
        sizes = {"fp32_bytes": fp32.stat().st_size, "int8_bytes": int8.stat().st_size}
        nodes = int8_nodes(int8)
        load_before = os.getloadavg()
        rounds = []
        for _ in range(args.rounds):
            record = {}
            for batch, key in ((1, "batch1_ms_per_image"), (64, "batch64_images_per_s")):
                images = torch.rand(batch, 3, size, size, generator=generator).numpy()
                for name, session in sessions.items():
                    seconds = timed(session, images, args.seconds)
                    record[f"{name}_{key}"] = round(seconds * 1e3, 3) if batch == 1 else round(batch / seconds, 1)
            ms, per_s = record["fp32_batch1_ms_per_image"], record["int8_batch64_images_per_s"]
            record["speedup_batch1"] = round(ms / record["int8_batch1_ms_per_image"], 3)
            record["speedup_batch64"] = round(per_s / record["fp32_batch64_images_per_s"], 3)
            rounds.append(record)
    median = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    print(
        json.dumps(
            {
                "model": args.model,
                "image_size": size,
                "onnxruntime": onnxruntime.__version__,
                "torch_threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "cpu_count": os.cpu_count(),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                **sizes,
                "int8_nodes": nodes,
                "median": {key: median(key) for key in rounds[0]},
                "rounds": rounds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
