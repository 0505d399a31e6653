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

Each side runs in a fresh subprocess (``--side``), alternating which goes first, ``--rounds`` times; each
run times ``--steps`` training steps after ``--warmup`` untimed ones. Prints one JSON object: the median
images/s of each side, the median of the per-round ratios kd/torchdistill (the two runs of a round are
adjacent in time, so a drift of the machine's speed cancels), every run and the load average.
``--kd-override teacher.compile=true`` adds overrides to kd's run (speed settings; the distillation is the same).

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
TEACHER, STUDENT = "resnet34", "resnet18"
LR, MOMENTUM, WEIGHT_DECAY, TEMPERATURE = 0.1, 0.9, 1e-4, 4.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each side, alternating")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
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


def images_per_s(ends: list[float], args: argparse.Namespace) -> float:
    assert len(ends) == args.warmup + args.steps, len(ends)
    return args.steps * args.batch_size / (ends[-1] - ends[args.warmup - 1])


def run_kd(args: argparse.Namespace, dataset: InMemory, workdir: Path) -> float:
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from kd.launch.configs import CONF_DIR, register_models
    from kd.module import DistillationModule
    from kd.tasks.common import attach_loggers, build_data, build_models, build_trainer, optimizer_factory
    from kd.tasks.records import model_records

    total = args.warmup + args.steps
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

    class Clock(L.Callback):
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
    return images_per_s(ends, args)


def run_torchdistill(args: argparse.Namespace, dataset: InMemory) -> float:
    import timm
    from torch.utils.data import RandomSampler
    from torchdistill.core.distillation import get_distillation_box

    torch.manual_seed(0)
    teacher = timm.create_model(TEACHER, num_classes=args.classes)
    student = timm.create_model(STUDENT, num_classes=args.classes)
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
            "kwargs": {"batch_size": args.batch_size, "num_workers": 0, "drop_last": True},
        },
        # forward_batch_only: model(images), what a forward of its configs does when none is named.
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only"},
        "optimizer": {"key": "SGD", "kwargs": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": kd_loss, "weight": 1.0}}}},
    }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    box = get_distillation_box(teacher, student, {"train": dataset}, train_config, device, None, False, 1)
    ends: list[float] = []
    total = args.warmup + args.steps
    epoch = 0
    while len(ends) < total:
        box.pre_epoch_process(epoch=epoch)
        for images, targets, supp_dict in box.train_data_loader:
            images, targets = images.to(device), targets.to(device)
            loss = box.forward_process(images, targets, supp_dict)
            box.post_forward_process(loss=loss)
            if device.type == "cuda" and len(ends) in (args.warmup - 1, total - 1):
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            if len(ends) == total:
                break
        epoch += 1
    return images_per_s(ends, args)


def one_run(args: argparse.Namespace) -> float:
    quiet()
    dataset = InMemory(args.batch_size * (args.warmup + args.steps + 1), args.image_size, args.classes)
    if args.side == "kd":
        return run_kd(args, dataset, Path(args.workdir))
    return run_torchdistill(args, dataset)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.side:
        print(json.dumps({"images_per_s": one_run(args)}))
        return
    runs: dict[str, list[float]] = {side: [] for side in SIDES}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kd-peers-") as tmp:
        for round_index in range(args.rounds):
            order = SIDES if round_index % 2 == 0 else SIDES[::-1]
            for side in order:
                command = [sys.executable, __file__, *argv, "--side", side, "--workdir", f"{tmp}/{round_index}"]
                env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true"}
                done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"the {side} run failed:\n{done.stderr[-3000:]}")
                line = next(line for line in done.stdout.splitlines() if line.startswith("{"))
                runs[side].append(round(json.loads(line)["images_per_s"], 2))
                print(f"round {round_index + 1}/{args.rounds} {side}: {runs[side][-1]} images/s", file=sys.stderr)
    load_after = os.getloadavg()
    median = {side: round(statistics.median(values), 2) for side, values in runs.items()}
    # Each round's two runs are minutes apart at most; this machine's speed drifts by more over a session, so
    # the ratio is taken per round (paired) and its median reported.
    paired = [round(kd / peer, 3) for kd, peer in zip(runs["kd"], runs["torchdistill"], strict=True)]
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
            "warmup": args.warmup,
            "rounds": args.rounds,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "torchdistill": torchdistill.__version__,
            "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)],
            "kd_overrides": args.kd_override,
        },
        "images_per_s": median,
        "kd_vs_torchdistill": round(statistics.median(paired), 3),
        "kd_vs_torchdistill_per_round": paired,
        "runs": runs,
    }
    print(json.dumps(result, indent=2))


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
