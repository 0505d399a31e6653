"""Distillation throughput on a GPU: kd against the hand-written loop, over precision, memory format and compile.

ResNet152_vd teaches ResNet50_vd (random weights, 1000 classes) on random 224 px images held in memory,
batch 64, the default KD loss and SGD, as ``benchmarks/throughput.py`` sets them up. For each precision
(``32-true``, ``bf16-mixed``) it runs, in this order, NHWC eager, NCHW eager, NHWC compiled and NCHW compiled
(``torch.compile`` of the teacher's and the student's forward pass: kd's ``teacher.compile`` and
``student.compile``), each as kd's step (DistillationModule + Lightning Trainer with the default loggers), as
the hand-written loop and, eager only, as torchdistill's KD box (``benchmarks/peers.py``; where installed:
``pip install ".[bench]"``). The teacher computes in the run's precision (``teacher.precision`` 32 or bf16); per
run ``--warmup`` untimed and ``--steps`` timed steps. It prints one JSON: images/s and peak GPU memory
(``torch.cuda.max_memory_allocated``) per run, kd/hand and kd/torchdistill ratios. Runs that would start after
``--time-budget`` seconds are listed as skipped, so the whole script stays under 8 minutes on one GPU.

    python benchmarks/gpu.py                       # on a CUDA machine
    python benchmarks/gpu.py --device cpu --teacher resnet8 --student resnet8 --image-size 16 --steps 2 \\
        --warmup 1 --batch-size 4 --no-compile     # the same code path on a CPU, in seconds (tests use it)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402  (benchmarks/peers.py: torchdistill's step)
import throughput  # noqa: E402  (benchmarks/throughput.py: the shared setup, kd's step and the hand loop)
import torch  # noqa: E402

from kd.teachers import FrozenTeacher  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed")
#: (channels-last, compiled), most telling first: a time-capped run keeps the eager comparisons.
FORMATS = ((True, False), (False, False), (True, True), (False, True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--teacher", default="resnet152_vd")
    parser.add_argument("--student", default="resnet50_vd")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (compilation included)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--no-compile", action="store_true", help="eager runs only (no torch.compile)")
    parser.add_argument("--time-budget", type=float, default=400.0, help="start no run after this many seconds")
    return parser.parse_args(argv)


def throughput_args(args: argparse.Namespace, precision: str) -> argparse.Namespace:
    return throughput.parse_args(
        [
            f"--teacher={args.teacher}",
            f"--student={args.student}",
            "--data=fake",
            f"--image-size={args.image_size}",
            f"--batch-size={args.batch_size}",
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
            f"--accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
            f"--precision={precision}",
        ]
    )


def one_run(setup: throughput.Setup, runner: str, channels_last: bool, compiled: bool) -> dict:
    model = setup.teacher.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # The teacher in the run's precision: float32 in the 32-true runs, bf16 autocast in the bf16-mixed ones.
    teacher_precision = "bf16" if setup.args.precision == "bf16-mixed" else "32"
    setup.teacher = FrozenTeacher(model, channels_last=channels_last, compile=compiled, precision=teacher_precision)
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if runner == "kd":
        wall, _ = throughput.lightning_run(
            setup, setup.teacher, setup.loss, channels_last=channels_last, compile=compiled
        )
    elif runner == "torchdistill":
        wall = torchdistill_run(setup, channels_last)
    else:
        wall, _ = throughput.hand_loop(setup, channels_last=channels_last, compile=compiled)
    result = {"images_per_s": round(wall, 2), "run_s": round(time.perf_counter() - start, 1)}
    if setup.device.type == "cuda":
        result["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU and torch sees none here; run it on a GPU or pass --device cpu")
        return 2
    throughput.quiet()
    start = time.perf_counter()
    runs, skipped = [], []

    with tempfile.TemporaryDirectory(prefix="kd-gpu-bench-") as tmp:
        for precision in args.precisions:
            setup = throughput.Setup(throughput_args(args, precision), Path(tmp) / precision)
            for channels_last, compiled in FORMATS[:2] if args.no_compile else FORMATS:
                for runner in RUNNERS if not compiled and PEER_INSTALLED else ("kd", "hand"):
                    name = {"runner": runner, "precision": precision, "channels_last": channels_last}
                    name["compile"] = compiled
                    if time.perf_counter() - start > args.time_budget:
                        skipped.append(name)
                        continue
                    runs.append({**name, **one_run(setup, runner, channels_last, compiled)})
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    setup_info = {k: v for k, v in vars(args).items() if k != "precisions"}
    result = {
        "setup": {**setup_info, "device_name": device, "torch": torch.__version__},
        "runs": runs,
        "kd_vs_hand": ratios_to(runs, "hand"),
        "kd_vs_torchdistill": ratios_to(runs, "torchdistill"),
        "skipped": skipped,
        "torchdistill": "eager runs" if PEER_INSTALLED else 'not installed (pip install ".[bench]"): no runs',
        "total_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result, indent=2))
    return 0


def ratios_to(runs: list[dict], other: str) -> dict[str, float]:
    """kd's images/s over ``other``'s, per precision, memory format and compile setting both ran."""
    ratios = {}
    for run in runs:
        if run["runner"] == "kd":
            peer = next((r for r in runs if r["runner"] == other and all(r[k] == run[k] for k in FORMAT_KEYS)), None)
            if peer:
                ratios["{precision} cl={channels_last} compile={compile}".format(**run)] = round(
                    run["images_per_s"] / peer["images_per_s"], 3
                )
    return ratios


def torchdistill_run(setup: throughput.Setup, channels_last: bool) -> float:
    """torchdistill's KD box (``benchmarks/peers.py``) on the same networks and images, eager (its hooks on the
    root modules are not meant for compiled ones), under bf16 autocast in the bf16-mixed runs; channels-last by
    converting both networks (the images stay NCHW, as its loader gives them)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    teacher = copy.deepcopy(setup.teacher.model).to(memory_format=memory_format)
    student = setup.fresh_student().to(memory_format=memory_format)
    total = setup.args.warmup + setup.args.steps
    bf16 = setup.args.precision == "bf16-mixed"
    _, ends = peers.torchdistill_steps(
        teacher, student, setup.data.train_set, setup.args.batch_size, total, setup.device, bf16
    )
    return setup.args.steps * setup.args.batch_size / (ends[-1] - ends[setup.args.warmup - 1])


FORMAT_KEYS = ("precision", "channels_last", "compile")
RUNNERS = ("kd", "hand", "torchdistill")
PEER_INSTALLED = importlib.util.find_spec("torchdistill") is not None

if __name__ == "__main__":
    sys.exit(main())
