"""kd against torchdistill on one identical distillation config, side by side. Not a test.

Both train timm's resnet18 from timm's resnet34 (random weights, 100 classes) on the same in-memory fake
64 px images (kd's ``data=fake`` images, drawn once up front and held as one tensor), batch 32, Hinton KD at
T=4 with no label term (alpha=0), SGD (lr 0.1, momentum 0.9, weight decay 1e-4), on this machine's device.

- ``kd``: what ``python run.py`` builds (kd's own task functions: data module, frozen teacher, student,
  DistillationModule, Lightning Trainer with the default loggers, callbacks and checkpointing), with the
  fake training set swapped for the in-memory one.
- ``torchdistill``: its public API, ``torchdistill.core.distillation.get_distillation_box`` and the train
  step of its examples (``forward_process`` then ``post_forward_process``), with its defaults except what
  its own KD sample configs set: the teacher frozen (``requires_grad: False``), KDLoss on the two models'
  outputs. Its defaults that differ from kd's: the teacher stays in train mode (BatchNorm on batch statistics,
  updating its running statistics), under ``torch.no_grad`` rather than ``inference_mode``, in NCHW; without
  a label term its KDLoss returns the plain KL, without the T^2 factor (the same gradient direction, a
  smaller step: it does not change the cost of a step); it has no LR schedule.

Three figures, each from ``--rounds`` paired rounds (the two sides back to back in fresh subprocesses
(``--side``), alternating which goes first; the ratio kd/torchdistill is taken per round, so a drift of the
machine's speed cancels, and the median of the rounds is reported):

- ``out_of_the_box``: both as they come. kd's defaults include its teacher in bf16 autocast where the hardware
  computes bf16 natively (``teacher.precision=auto``), the student's ``trainer.precision=auto`` and its CPU
  allocator setting (``kd.training.cpu_memory``); torchdistill's defaults have none of them.
- ``same_bf16``: both with the whole step (teacher and student forward, loss) under bf16 autocast: kd with
  ``trainer.precision=bf16-mixed teacher.precision=bf16``, torchdistill with ``torch.autocast`` around its
  ``forward_process``.
- ``same_allocator``: kd as it comes, torchdistill with kd's allocator setting (``keep_freed_cpu_memory``).

Each run is ``--steps`` training steps (35). Two images/s per run: ``cold`` counts every step, from the start of
the first epoch (the first batch fetched) to the end of the last step, what a short run costs; ``steady`` leaves
out the first ``--warmup`` steps. Prints one JSON object: per figure the median ratios (steady and cold), the
per-round ratios, every run, and the load average before and after. ``--kd-override teacher.compile=true`` adds
overrides to kd's run in every figure (speed settings; the distillation is the same).

    pip install -e ".[bench]"   # torchdistill
    python benchmarks/peers.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

SIDES = ("kd", "torchdistill")
#: What each figure changes on each side (see the module docstring).
FIGURES = {
    "out_of_the_box": {"kd": [], "torchdistill": "as it comes"},
    "same_bf16": {"kd": ["trainer.precision=bf16-mixed", "teacher.precision=bf16"], "torchdistill": "bf16 autocast"},
    "same_allocator": {"kd": [], "torchdistill": "kd's allocator setting"},
}
TEACHER, STUDENT = "resnet34", "resnet18"
LR, MOMENTUM, WEIGHT_DECAY, TEMPERATURE = 0.1, 0.9, 1e-4, 4.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per figure, alternating the order")
    parser.add_argument("--steps", type=int, default=35, help="training steps per run, every one counted cold")
    parser.add_argument("--warmup", type=int, default=3, help="first steps the steady figure leaves out")
    parser.add_argument("--figures", nargs="+", default=list(FIGURES), choices=list(FIGURES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument(
        "--kd-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra override of kd's run (repeatable), e.g. teacher.compile=true; the distillation stays the same",
    )
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one run, in this process
    parser.add_argument("--figure", choices=list(FIGURES), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class InMemory(Dataset):
    """kd's fake images, drawn once: both sides read the very same tensors, nothing is generated per step."""

    def __init__(self, size: int, image_size: int, classes: int) -> None:
        from kd.data.fake import FakeImageData

        data = FakeImageData(num_classes=classes, image_size=image_size, train_size=size, val_size=1)
        data.setup()
        samples = [data.train_set[index] for index in range(size)]
        self.images = torch.stack([image for image, _ in samples]).as_subclass(torch.Tensor)
        self.labels = torch.tensor([label for _, label in samples])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def images_per_s(start: float, ends: list[float], args: argparse.Namespace) -> dict[str, float]:
    """``cold``: every step from ``start`` (before the first batch is fetched); ``steady``: after ``--warmup``."""
    assert len(ends) == args.steps, len(ends)
    steady = (args.steps - args.warmup) * args.batch_size / (ends[-1] - ends[args.warmup - 1])
    return {"steady": steady, "cold": args.steps * args.batch_size / (ends[-1] - start)}


def run_kd(args: argparse.Namespace, dataset: InMemory, workdir: Path) -> dict[str, float]:
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from kd.launch.configs import CONF_DIR, register_models
    from kd.module import DistillationModule
    from kd.tasks.common import attach_loggers, build_data, build_models, build_trainer, optimizer_factory
    from kd.tasks.records import model_records

    total = args.steps
    overrides = [
        f"teacher={TEACHER}",
        f"student={STUDENT}",
        "teacher.weights=none",
        "student.weights=none",
        "data=fake",
        f"data.image_size={args.image_size}",
        f"data.num_classes={args.classes}",
        f"data.train_size={len(dataset)}",
        f"data.batch_size={args.batch_size}",
        "loss=kd",
        f"loss.temperature={TEMPERATURE}",
        "loss.alpha=0.0",
        "optim=sgd",
        f"optim.lr={LR}",
        f"optim.momentum={MOMENTUM}",
        f"optim.weight_decay={WEIGHT_DECAY}",
        f"trainer.max_steps={total}",
        "trainer.max_epochs=-1",
        "trainer.limit_val_batches=0",
        "sched.warmup_epochs=0.2",
        f"paths.output_dir={workdir / 'kd'}",
        f"paths.cache_dir={workdir / 'weights'}",
        *FIGURES[args.figure]["kd"],
        *args.kd_override,
    ]
    register_models()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    # As kd.tasks.train.fit builds a run (its validation passes and result files left out: not per-step costs).
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = build_data(cfg, cfg.student)
    data.train_set = dataset
    ends: list[float] = []
    starts: list[float] = []

    class Clock(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            ends.append(time.perf_counter())

    trainer = build_trainer(cfg, Path(cfg.paths.output_dir), [Clock()])
    attach_loggers(cfg, trainer, model_records(cfg, "distill"))  # the default loggers, as a run.py run has them
    teacher, student = build_models(cfg, data.num_classes, None, with_teacher=True)
    module = DistillationModule(
        student,
        instantiate(cfg.loss),
        optimizer_factory(cfg),
        instantiate(cfg.sched),
        data.num_classes,
        teacher,
        channels_last=cfg.student.channels_last,
        compile=cfg.student.compile,
    )
    trainer.fit(module, datamodule=data)
    return images_per_s(starts[0], ends, args)


def run_torchdistill(args: argparse.Namespace, dataset: InMemory) -> dict[str, float]:
    import timm

    torch.manual_seed(0)
    teacher = timm.create_model(TEACHER, num_classes=args.classes)
    student = timm.create_model(STUDENT, num_classes=args.classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.figure == "same_allocator" and device.type == "cpu":
        from kd.training.cpu_memory import keep_freed_cpu_memory

        keep_freed_cpu_memory(1024 * 2**20)  # kd's default (callbacks.cpu_memory.threshold_mb=1024)
    bf16 = args.figure == "same_bf16"
    start, ends = torchdistill_steps(teacher, student, dataset, args.batch_size, args.steps, device, bf16)
    return images_per_s(start, ends, args)


def torchdistill_steps(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    steps: int,
    device: torch.device,
    bf16: bool = False,
) -> tuple[float, list[float]]:
    """``steps`` training steps of torchdistill's KD box (see the module docstring), optionally under bf16
    autocast; the time before the first batch is fetched and the end of every step (on a GPU the device is
    waited for at each step's end, so each stamp is the step's real end)."""
    from torch.utils.data import RandomSampler
    from torchdistill.core.distillation import get_distillation_box

    kd_loss = {
        "key": "KDLoss",
        "kwargs": {
            "student_module_path": ".",
            "student_module_io": "output",
            "teacher_module_path": ".",
            "teacher_module_io": "output",
            "temperature": TEMPERATURE,
            "alpha": 0.0,
        },
    }
    train_config = {
        "num_epochs": 1,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
            "kwargs": {"batch_size": batch_size, "num_workers": 0, "drop_last": True},
        },
        # forward_batch_only: model(images), what a forward of its configs does when none is named.
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only"},
        "optimizer": {"key": "SGD", "kwargs": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": kd_loss, "weight": 1.0}}}},
    }
    box = get_distillation_box(teacher, student, {"train": dataset}, train_config, device, None, False, 1)
    ends: list[float] = []
    epoch = 0
    start = time.perf_counter()
    while len(ends) < steps:
        box.pre_epoch_process(epoch=epoch)
        for images, targets, supp_dict in box.train_data_loader:
            images, targets = images.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = box.forward_process(images, targets, supp_dict)
            box.post_forward_process(loss=loss)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            if len(ends) == steps:
                break
        epoch += 1
    return start, ends


def one_run(args: argparse.Namespace) -> dict[str, float]:
    quiet()
    dataset = InMemory(args.batch_size * (args.steps + 1), args.image_size, args.classes)
    if args.side == "kd":
        return run_kd(args, dataset, Path(args.workdir))
    return run_torchdistill(args, dataset)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.side:
        print(json.dumps(one_run(args)))
        return
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup={args.warmup} leaves no step of --steps={args.steps} for the steady figure")
    load_before = os.getloadavg()
    figures = {}
    with tempfile.TemporaryDirectory(prefix="kd-peers-") as tmp:
        for figure in args.figures:
            runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
            for round_index in range(args.rounds):
                order = SIDES if round_index % 2 == 0 else SIDES[::-1]
                for side in order:
                    runs[side].append(side_run(argv, side, figure, f"{tmp}/{figure}-{round_index}"))
                    print(f"{figure} round {round_index + 1}/{args.rounds} {side}: {runs[side][-1]}", file=sys.stderr)
            figures[figure] = summary(figure, runs)
    load_after = os.getloadavg()
    import lightning
    import torchdistill

    result = {
        "setup": {
            "teacher": f"timm {TEACHER}",
            "student": f"timm {STUDENT}",
            "weights": "random",
            "data": f"fake {args.image_size}px, {args.classes} classes, in memory",
            "batch_size": args.batch_size,
            "loss": f"KD T={TEMPERATURE:g} alpha=0",
            "optimizer": f"SGD lr={LR} momentum={MOMENTUM} weight_decay={WEIGHT_DECAY}",
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "steps": args.steps,
            "steady_leaves_out": args.warmup,
            "rounds": args.rounds,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "torchdistill": torchdistill.__version__,
            "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)],
            "kd_overrides": args.kd_override,
        },
        "kd_vs_torchdistill": {name: {k: f[k] for k in ("cold", "steady")} for name, f in figures.items()},
        "figures": figures,
    }
    print(json.dumps(result, indent=2))


def side_run(argv: list[str], side: str, figure: str, workdir: str) -> dict[str, float]:
    """One run of ``side`` for ``figure`` in a fresh process: its cold and steady images/s."""
    command = [sys.executable, __file__, *argv, "--side", side, "--figure", figure, "--workdir", workdir]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {side} run failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("{"))
    return {key: round(value, 2) for key, value in json.loads(line).items()}


def summary(figure: str, runs: dict[str, list[dict[str, float]]]) -> dict:
    """The median of the per-round ratios kd/torchdistill, cold and steady: the two runs of a round are adjacent
    in time, so a drift of this machine's speed (other processes) cancels within a pair."""
    result: dict = {"torchdistill": FIGURES[figure]["torchdistill"], "kd_overrides": FIGURES[figure]["kd"]}
    for kind in ("cold", "steady"):
        paired = [round(kd[kind] / peer[kind], 3) for kd, peer in zip(runs["kd"], runs["torchdistill"], strict=True)]
        result[kind] = round(statistics.median(paired), 3)
        result[f"{kind}_per_round"] = paired
        medians = {side: round(statistics.median(r[kind] for r in runs[side]), 2) for side in SIDES}
        result[f"{kind}_images_per_s"] = medians
    result["runs"] = runs
    return result


def quiet() -> None:
    """Lightning's, kd's and torchdistill's info lines would mix with the JSON on stdout; warnings only."""
    import logging
    import warnings

    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "kd", "kd.models.build", "torchdistill"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


if __name__ == "__main__":
    main()
