"""Training throughput of kd, against a hand-written PyTorch loop doing the same work. Not a test.

On the same models, batch and data, measures images/s of

- ``kd_step``: a distillation step of kd (Lightning Trainer + DistillationModule, the default config:
  CSV and (offline) wandb loggers, per-step LR and loss logging, checkpoint callback); ``kd_step_no_loggers``: the same
  without loggers, LR monitor and checkpointing, to tell Lightning's own cost from our logging's;
- ``hand_loop``: a hand-written PyTorch loop doing the identical computation (same teacher and student in the
  same memory formats, same student initialization, loss object, optimizer and per-step LR schedule, same
  DataLoader), with nothing else: no logging, no checks;
- ``student_only``: a supervised step of the student alone (kd, ``loss=ce``, no teacher);
- ``teacher_inference``: kd's frozen teacher alone on batches already loaded (and
  ``teacher_inference_nchw``, the same without channels-last, which the default is measured against);
- ``kd_cached``: a kd distillation step that reads the teacher-output cache (filled before, untimed).

Each measurement runs ``--warmup`` steps, then times ``--steps`` steps (data loading included, the
per-run setup excluded). All modes run in one process, interleaved in rotating order, ``--rounds``
times after one untimed round (first-call costs: kernel selection, lazy imports); the medians are
reported. Peak memory of ``kd_step`` and ``hand_loop`` is measured in a fresh subprocess each (same
imports, models and data; only the loop differs, Lightning's Trainer setup included): the peak resident
set size up to the end of the last step (Linux's VmHWM, reset just before the run), its growth over
the RSS before the run, and the peak of the whole run (with kd's final checkpoint write); on a GPU also
``torch.cuda.max_memory_allocated`` at the last step.

Default: CRD's CIFAR pair, teacher ``resnet56`` (0.92 M parameters with a 1000-class head) and student
``resnet20`` (0.34 M), on random 32x32 images (``data=fake`` generated once and held in memory, 1000
classes, so the cache stores the top 10 logits), batch 64, random weights: a step costs about 0.3 s on a
2-core CPU, and the whole benchmark takes about 3 minutes there.
``--teacher digits_teacher --student digits_student --data digits`` is the embedded digits setup (8x8 images,
10 classes), whose steps take about 10 ms: there the fixed per-step cost of Lightning's loop shows. On a GPU:

    python benchmarks/throughput.py --teacher resnet152_vd --student resnet50_vd --image-size 224 \\
        --batch-size 64 --precision bf16-mixed

(``--data fake`` is random 1000-class images of ``--image-size``.)
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from kd.launch.configs import CONF_DIR, register_models  # noqa: E402
from kd.losses import LabelCrossEntropy  # noqa: E402
from kd.module import DistillationModule  # noqa: E402
from kd.students.fast import to_channels_last, wants_channels_last  # noqa: E402
from kd.tasks.common import attach_loggers, build_data, build_trainer, optimizer_factory  # noqa: E402
from kd.tasks.models import build_student, build_teacher, cache_settings  # noqa: E402
from kd.tasks.records import model_records  # noqa: E402
from kd.teachers import FrozenTeacher  # noqa: E402
from kd.teachers.cache import CachedTeacher  # noqa: E402
from kd.teachers.fill import open_teacher_cache  # noqa: E402

MODES = (
    "kd_step",
    "kd_step_no_loggers",
    "hand_loop",
    "student_only",
    "teacher_inference",
    "teacher_inference_nchw",
    "kd_cached",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="resnet56", help="a conf/model name")
    parser.add_argument("--student", default="resnet20", help="a conf/model name")
    parser.add_argument("--data", default="fake", choices=["fake", "digits"])
    parser.add_argument("--image-size", type=int, default=32, help="the fake images' size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--peak-of", choices=["kd_step", "hand_loop"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class InMemory(Dataset):
    """torchvision's FakeData draws each image on access through ``torch.manual_seed``, which records a
    Python stack trace per call for lazily seeded devices: a cost that grows with the caller's stack depth,
    so it would charge Lightning's deeper stack more than the hand-written loop. Generated once, up front."""

    def __init__(self, dataset: Dataset) -> None:
        samples = [dataset[index] for index in range(len(dataset))]
        self.images = torch.stack([image for image, _ in samples])
        self.labels = torch.tensor([int(label) for _, label in samples])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class Setup:
    """Models, data and config shared by every mode, built once."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.total_steps = args.warmup + args.steps
        data = ["data=digits"]
        if args.data == "fake":
            train_size = args.batch_size * (self.total_steps + 1)
            data = ["data=fake", f"data.image_size={args.image_size}", f"data.train_size={train_size}"]
        overrides = [
            f"teacher={args.teacher}",
            f"student={args.student}",
            "teacher.weights=none",
            "student.weights=none",
            *data,
            f"data.batch_size={args.batch_size}",
            f"+data.num_workers={args.num_workers}" if args.data == "fake" else f"data.num_workers={args.num_workers}",
            f"trainer.accelerator={args.accelerator}",
            f"trainer.precision={args.precision}",
            f"trainer.max_steps={self.total_steps}",
            "trainer.max_epochs=-1",
            "trainer.limit_val_batches=0",
            "sched.warmup_epochs=0.2",  # max_epochs=-1: Lightning counts the whole run as one epoch
            "trainer.enable_progress_bar=false",
            f"paths.output_dir={workdir / 'out'}",
            f"paths.cache_dir={workdir / 'weights'}",
            f"teacher.cache={workdir / 'teacher-outputs'}",
        ]
        register_models()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            self.cfg = compose("config", overrides=overrides, return_hydra_config=True)
        L.seed_everything(self.cfg.seed, verbose=False)  # as task=distill does: it decides the order and the views
        self.data = build_data(self.cfg, self.cfg.student)
        if args.data == "fake":
            self.data.train_set = InMemory(self.data.train_set)
        self.teacher = build_teacher(self.cfg, self.data.num_classes, None)
        self.student = build_student(self.cfg.student, self.data.num_classes, None)
        self.loss = instantiate(self.cfg.loss)
        self.device = torch.device(
            "cuda" if args.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"
        )
        self.batches_per_epoch = len(self.data.train_set) // args.batch_size
        self._cached: CachedTeacher | None = None
        self.measuring_memory = False
        self.peak_at_last_step: dict[str, float] = {}
        # The same run without loggers, LR monitor and checkpointing: what Lightning itself costs.
        self.cfg_no_loggers = self.cfg.copy()
        OmegaConf.set_struct(self.cfg_no_loggers, False)
        self.cfg_no_loggers.logger = None
        self.cfg_no_loggers.callbacks = None
        self.cfg_no_loggers.trainer.enable_checkpointing = False

    def fresh_student(self) -> torch.nn.Module:
        return copy.deepcopy(self.student)

    def cached_teacher(self) -> CachedTeacher:
        if self._cached is None:  # filled once, before any timing
            epochs = math.ceil(self.total_steps / self.batches_per_epoch)
            store, _ = open_teacher_cache(cache_settings(self.cfg), self.teacher, self.data, epochs)
            self._cached = CachedTeacher(self.teacher, store)
        return self._cached

    def loader(self):
        """The training batches of epoch 0 of a single process, exactly as kd's training loader gives them."""
        return self.data.training_loader(1, 0, int(self.cfg.seed))


def stamp(ends: list[tuple[float, float]], setup: Setup) -> None:
    """Appends the end of a step: wall-clock time and the process's CPU time. On a GPU, waits for the
    device at the two ends that are timed (only there: the host may run ahead as it normally does)."""
    if setup.device.type == "cuda" and len(ends) in (setup.args.warmup - 1, setup.total_steps - 1):
        torch.cuda.synchronize()
    ends.append((time.perf_counter(), time.process_time()))
    if setup.measuring_memory and len(ends) == setup.total_steps:
        setup.peak_at_last_step = {"rss": status_mb("VmHWM")}
        if setup.device.type == "cuda":
            setup.peak_at_last_step["cuda"] = torch.cuda.max_memory_allocated() / 2**20


class StepClock(L.Callback):
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.ends: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stamp(self.ends, self.setup)


def images_per_s(ends: list[tuple[float, float]], setup: Setup) -> tuple[float, float]:
    """Images per second of wall-clock time, and per second of the process's CPU time."""
    warmup, steps = setup.args.warmup, setup.args.steps
    assert len(ends) == warmup + steps, len(ends)
    images = steps * setup.args.batch_size
    return tuple(images / (last - first) for first, last in zip(ends[warmup - 1], ends[-1], strict=True))


def lightning_run(setup: Setup, teacher, loss, loggers: bool = True, **module_options) -> tuple[float, float]:
    """kd's step; ``module_options``: DistillationModule's ``channels_last`` and ``compile`` (benchmarks/gpu.py)."""
    module = DistillationModule(
        setup.fresh_student(),
        loss,
        optimizer_factory(setup.cfg),
        instantiate(setup.cfg.sched),
        setup.data.num_classes,
        teacher,
        **module_options,
    )
    clock = StepClock(setup)
    cfg = setup.cfg if loggers else setup.cfg_no_loggers
    trainer = build_trainer(cfg, Path(cfg.paths.output_dir), [clock])
    attach_loggers(cfg, trainer, model_records(cfg, "distill"))
    trainer.fit(module, datamodule=setup.data)
    return images_per_s(clock.ends, setup)


def hand_loop(setup: Setup, channels_last: bool | str = "auto", compile: bool = False) -> tuple[float, float]:
    """What a careful user writes by hand: the same computation, nothing else. ``channels_last`` and
    ``compile`` as kd's switches do it (benchmarks/gpu.py); by default the formats of kd's defaults."""
    device, precision = setup.device, setup.args.precision
    teacher = setup.teacher.model.to(device)  # the same network, in the same memory format as kd's teacher
    student = setup.fresh_student().to(device).train()
    # The same student memory format as kd's default (student.channels_last=auto: NHWC for conv nets).
    channels_last = wants_channels_last(channels_last, student)
    if channels_last:
        student.to(memory_format=torch.channels_last)
    teacher_cl = setup.teacher.channels_last
    forward_teacher, forward_student = teacher, student
    if compile:
        forward_teacher, forward_student = torch.compile(teacher), torch.compile(student)
    optimizer = optimizer_factory(setup.cfg)(student)
    # As DistillationModule.configure_optimizers computes it (max_epochs=-1 counts as one epoch).
    steps_per_epoch = setup.total_steps
    scheduler = instantiate(setup.cfg.sched)(optimizer, total_steps=setup.total_steps, steps_per_epoch=steps_per_epoch)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)
        if precision != "32-true"
        else nullcontext()
    )
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    ends, step = [], 0
    while step < setup.total_steps:
        for images, target, _ in setup.loader():
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with autocast:
                # In kd's teacher's precision (teacher.precision: bf16 autocast where native), logits in float32.
                with torch.no_grad(), setup.teacher.autocast(device.type):
                    teacher_logits = forward_teacher(to_channels_last(images) if teacher_cl else images).float()
                student_images = to_channels_last(images) if channels_last else images
                loss = setup.loss(forward_student(student_images), teacher_logits, target)
            optimizer.zero_grad()
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            step += 1
            scheduler.step_update(num_updates=step)
            stamp(ends, setup)
            if step == setup.total_steps:
                break
    return images_per_s(ends, setup)


def teacher_inference(setup: Setup, channels_last: bool) -> tuple[float, float]:
    """kd's frozen teacher alone, on batches loaded beforehand."""
    model = setup.teacher.model
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    teacher = FrozenTeacher(model.to(memory_format=memory_format), channels_last=channels_last)
    batches = []
    for images, _, _ in setup.loader():
        batches.append(images.to(setup.device))
        if len(batches) == setup.total_steps:
            break
    batches = (batches * setup.total_steps)[: setup.total_steps]
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(setup.args.precision)
    ends: list[tuple[float, float]] = []
    try:
        with torch.autocast(setup.device.type, dtype=dtype) if dtype else nullcontext():
            for images in batches:
                teacher(images)
                stamp(ends, setup)
    finally:
        model.to(memory_format=torch.channels_last if setup.teacher.channels_last else torch.contiguous_format)
    return images_per_s(ends, setup)


def runners(setup: Setup) -> dict[str, Callable[[], tuple[float, float]]]:
    return {
        "kd_step": lambda: lightning_run(setup, setup.teacher, setup.loss),
        "kd_step_no_loggers": lambda: lightning_run(setup, setup.teacher, setup.loss, loggers=False),
        "hand_loop": lambda: hand_loop(setup),
        "student_only": lambda: lightning_run(setup, None, LabelCrossEntropy()),
        "teacher_inference": lambda: teacher_inference(setup, channels_last=True),
        "teacher_inference_nchw": lambda: teacher_inference(setup, channels_last=False),
        "kd_cached": lambda: lightning_run(setup, setup.cached_teacher(), setup.loss),
    }


def status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1)) / 1024


def peak_memory(setup: Setup, mode: str) -> dict[str, float]:
    """Run in a fresh process: the resident set size before the run, its peak up to the end of the
    last training step (the goal's figure) and its peak over the whole run (for kd this includes the
    checkpoint written when training ends, which the hand-written loop does not write).

    Linux keeps the process's peak RSS (VmHWM); writing 5 to /proc/self/clear_refs resets it to the
    current RSS, so the peaks read afterwards are those of the run alone, not of the setup.
    """
    run = runners(setup)[mode]
    setup.measuring_memory = True
    before = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run()
    steps = setup.peak_at_last_step
    result = {
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(steps["rss"], 1),
        "growth_mb": round(steps["rss"] - before, 1),
        "peak_rss_whole_run_mb": round(status_mb("VmHWM"), 1),
    }
    if setup.device.type == "cuda":
        result["cuda_peak_allocated_mb"] = round(steps["cuda"], 1)
    return result


def measure_memory(argv: list[str], workdir: Path) -> dict[str, dict[str, float]]:
    results = {}
    for mode in ("kd_step", "hand_loop"):
        command = [sys.executable, __file__, *argv, "--peak-of", mode, "--workdir", str(workdir / mode)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory run of {mode} failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_of:
        setup = Setup(args, Path(args.workdir))
        print(json.dumps(peak_memory(setup, args.peak_of)))
        return
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        workdir = Path(tmp)
        load_before = os.getloadavg()
        setup = Setup(args, workdir)
        setup.cached_teacher()
        run = runners(setup)
        for mode in MODES:  # untimed: first calls select kernels and import lazily
            run[mode]()
        wall: dict[str, list[float]] = {mode: [] for mode in MODES}
        cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
        for round_index in range(args.rounds):
            shift = round_index % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                per_wall_s, per_cpu_s = run[mode]()
                wall[mode].append(round(per_wall_s, 2))
                cpu[mode].append(round(per_cpu_s, 2))
        memory = {} if args.no_memory else measure_memory(argv, workdir)
        load_after = os.getloadavg()
    # CPU time is a fair clock only when every step runs in this process, on the CPU.
    cpu_clock = setup.device.type == "cpu" and args.num_workers == 0
    print(json.dumps(report(args, setup, wall, cpu if cpu_clock else None, memory, load_before, load_after), indent=2))


def medians(figures: dict[str, list[float]]) -> dict[str, float]:
    return {mode: round(statistics.median(values), 2) for mode, values in figures.items()}


def ratios_of(median: dict[str, float]) -> dict[str, float]:
    return {
        "kd_vs_hand": round(median["kd_step"] / median["hand_loop"], 3),
        "kd_no_loggers_vs_hand": round(median["kd_step_no_loggers"] / median["hand_loop"], 3),
        "cached_vs_student_only": round(median["kd_cached"] / median["student_only"], 3),
        "cached_vs_kd": round(median["kd_cached"] / median["kd_step"], 3),
        "channels_last_vs_nchw_teacher": round(median["teacher_inference"] / median["teacher_inference_nchw"], 3),
    }


def report(args, setup: Setup, wall, cpu, memory, load_before, load_after) -> dict:
    median = medians(wall)
    ratios = ratios_of(median)
    result = {
        "setup": {
            "teacher": args.teacher,
            "student": args.student,
            "data": f"fake {args.image_size}px" if args.data == "fake" else "digits 8px",
            "classes": setup.data.num_classes,
            "batch_size": args.batch_size,
            "loss": setup.cfg.loss._target_.rsplit(".", 1)[-1],
            "precision": args.precision,
            "device": torch.cuda.get_device_name() if setup.device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        },
        "images_per_s": median,
        "ratios": ratios,
        "goals_met": {
            "kd_vs_hand >= 0.95": ratios["kd_vs_hand"] >= 0.95,
            "cached_vs_student_only >= 0.90": ratios["cached_vs_student_only"] >= 0.90,
        },
    }
    if cpu is not None:
        # Images per second of this process's CPU time: on a machine shared with other jobs, time spent
        # waiting for a core is not counted, so these ratios move far less than the wall-clock ones.
        result["images_per_cpu_s"] = medians(cpu)
        result["ratios_cpu_time"] = ratios_of(result["images_per_cpu_s"])
    if memory:
        kd_peak, hand_peak = memory["kd_step"]["peak_rss_mb"], memory["hand_loop"]["peak_rss_mb"]
        result["memory"] = {**memory, "kd_vs_hand_peak_rss": round(kd_peak / hand_peak, 3)}
        result["goals_met"]["peak memory within 10% of hand"] = kd_peak <= 1.10 * hand_peak
    result["runs"] = {"wall": wall, **({"cpu": cpu} if cpu is not None else {})}
    return result


def quiet() -> None:
    """Lightning's and kd's info lines would mix with the JSON on stdout; keep warnings only."""
    import logging
    import warnings

    os.environ.setdefault("WANDB_SILENT", "true")  # the default loggers include an offline wandb run
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "kd", "kd.models.build"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


if __name__ == "__main__":
    main()
