"""``task=quantize``: a distilled student as ``student.int8.onnx``, by quantization-aware distillation or PTQ.

``quantize.method=qad`` fine-tunes the fake-quantized student against the run's frozen fp32 teacher with the run's
loss for ``quantize.epochs``; ``ptq`` only calibrates. Both end in ONNX Runtime's static QDQ quantization
(``kd.students.quantize``). results.json gets fp32 and INT8 top-1 on the validation split, both run by ONNX
Runtime, their latency and throughput on this CPU, the file sizes and the settings.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kd.data import ClassificationData
from kd.data.batches import unpack_batch
from kd.errors import KdError
from kd.io import write_json_atomic
from kd.models.wrap import model_name
from kd.module import DistillationModule
from kd.results.files import RESULTS_FILE
from kd.students.card import StudentCard, card_for
from kd.students.export import export_student, write_onnx
from kd.students.quantize import (
    FakeQuantStudent,
    check_int8_cpu,
    check_packages,
    check_settings,
    fold_batchnorm,
    int8_nodes,
    onnx_logits,
    quantize_onnx,
)
from kd.students.speed import onnx_timings
from kd.tasks.auto_weights import auto_weights
from kd.tasks.common import (
    attach_loggers,
    build_data,
    build_trainer,
    optimizer_factory,
    output_dir,
    schedule_for,
    trained_student_of,
)
from kd.tasks.given import Given
from kd.tasks.models import build_teacher, cache_settings
from kd.tasks.records import model_records, write_results
from kd.teachers.ensemble import fingerprint_record
from kd.teachers.fill import teacher_for_run

log = logging.getLogger("kd")

#: What a run folder (``quantize.run``) hands on: the student it wrote, and the teacher, data and loss it used.
RUN_KEYS = ("teacher", "student", "data", "loss", "mixup", "optim", "sched", "seed")


def quantize(cfg: DictConfig) -> dict:
    return quantize_student(cfg)


def quantize_student(cfg: DictConfig, given: Given | None = None) -> dict:
    """The run of ``task=quantize``; ``given`` parts (``kd.quantize``) replace those of ``cfg``."""
    given = given or Given()
    start = time.perf_counter()
    settings = cfg.quantize
    method, epochs, batches = str(settings.method), settings.epochs, settings.calibration_batches
    check_settings(method, epochs, batches)
    if settings.lr_scale is None or settings.lr_scale <= 0:
        raise KdError(f"quantize.lr_scale={settings.lr_scale} must be positive: the fine-tuning LR is optim.lr times")
    check_packages()
    check_int8_cpu()
    cfg, chosen = with_run(cfg, settings.get("run"))
    if str(cfg.student.get("weights")).endswith(".onnx"):
        raise KdError(
            f"student.weights={cfg.student.weights} is an exported file, which kd cannot fine-tune or re-quantize; "
            "pass the student.safetensors its run wrote"
        )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = output_dir(cfg)
    data = given.data if given.data is not None else build_data(cfg, cfg.student)
    if given.student is not None:
        student, card = given.student, card_for(given.student, data, model=model_name(given.student))
    else:
        student, card = trained_student_of(cfg, data)
    folded = fold_batchnorm(student, card.model)  # refuses layers it cannot quantize, before any work
    calibration = calibration_images(data, batches, card.preprocessing.in_chans)

    extra: dict = {}
    trained = None
    if method == "qad":
        trained, extra = distill_quantized(cfg, data, folded, calibration, epochs, settings.lr_scale, out, given)
    written = export_student(student, card, out, ["onnx"])  # student.onnx + student.json: the fp32 baseline
    final = trained if trained is not None else FakeQuantStudent(folded)
    final.calibrate(calibration)  # ONNX Runtime's MinMax ranges, for the PyTorch twin of the INT8 file
    int8_path = out / "student.int8.onnx"
    with tempfile.TemporaryDirectory(dir=out, prefix=".quantize-") as tmp:
        folded_onnx = write_onnx(final.fp32(), card, Path(tmp) / "folded.onnx")
        quantize_onnx(folded_onnx, int8_path, calibration)
    quantization = {
        "method": method,
        "epochs": epochs if method == "qad" else 0,
        "lr": extra.pop("lr", None),
        "calibration_batches": len(calibration),
        "calibration_images": sum(len(images) for images in calibration),
        "format": "QDQ (ONNX Runtime quantize_static)",
        "weights": "int8, per output channel, symmetric",
        "activations": "uint8, per tensor, MinMax calibration",
        "nodes": int8_nodes(int8_path),
    }
    int8_extra = card.extra | {"quantization": quantization}
    int8_card = StudentCard(card.class_names, card.preprocessing, card.model, int8_extra)
    write_json_atomic(out / "student.int8.json", int8_card.to_dict())
    metrics = validation_metrics(data, card, written["onnx"], int8_path, final, extra.pop("metrics", {}))
    results = {
        "metrics": metrics,
        "weights": str(cfg.student.get("weights")),
        "quantize": quantization,
        **extra,
        "files": {
            "onnx": str(written["onnx"]),
            "int8_onnx": str(int8_path),
            "onnx_bytes": written["onnx"].stat().st_size,
            "int8_onnx_bytes": int8_path.stat().st_size,
        },
        "wall_time_s": round(time.perf_counter() - start, 3),
        "output_dir": str(out),
        **chosen,
    }
    if cfg.student.get("measure_speed", True):
        results["student_speed"] = int8_speed(written["onnx"], int8_path, card.preprocessing.input_size)
    write_results(out, cfg, "quantize", **results)
    top1 = {key: f"{100 * value:.2f}%" for key, value in metrics.items() if key.endswith("top1")}
    print(f"quantize ({method}): {top1}; INT8 model: {int8_path}")
    return results


def with_run(cfg: DictConfig, run: str | None) -> tuple[DictConfig, dict]:
    """``cfg`` with the teacher, student, data and loss of the run folder ``run`` (its student.safetensors as the
    student's weights), and that run's choices for results.json; ``cfg`` itself without ``run``."""
    if run in (None, ""):
        return cfg, {}
    folder = Path(str(run)).expanduser()
    config, weights = folder / ".hydra" / "config.yaml", folder / "student.safetensors"
    if not config.is_file() or not weights.is_file():
        raise KdError(
            f"quantize.run={run} holds no finished kd run (.hydra/config.yaml and student.safetensors); "
            "pass the output folder of a task=distill run"
        )
    ran = OmegaConf.load(config)
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in RUN_KEYS:
            if key in ran:
                cfg[key] = ran[key]
        cfg.student.weights = str(weights)
    chosen = {}
    results = folder / RESULTS_FILE
    if results.is_file():
        import json

        earlier = json.loads(results.read_text())
        chosen = {key: earlier[key] for key in ("teacher", "student", "loss", "data") if key in earlier}
    return cfg, chosen


def calibration_images(data: ClassificationData, count: int, in_chans: int) -> list[torch.Tensor]:
    """The first ``count`` training batches (fewer when an epoch is shorter), as the training views give them."""
    images = []
    for batch in data.train_dataloader():
        images.append(unpack_batch(batch, in_chans, data.num_classes)[0].float())
        if len(images) == count:
            break
    if len(images) < count:
        log.info("quantize.calibration_batches=%d: an epoch has %d batches, all are used", count, len(images))
    return images


def distill_quantized(
    cfg: DictConfig,
    data: ClassificationData,
    folded,
    calibration: list[torch.Tensor],
    epochs: int,
    lr_scale: float,
    out: Path,
    given: Given,
) -> tuple[FakeQuantStudent, dict]:
    """Quantization-aware distillation: the fake-quantized student, its ranges frozen after calibration, learns
    from the frozen fp32 teacher with the run's loss for ``epochs``, at ``lr_scale`` times the run's LR."""
    run_cfg = cfg.copy()
    with open_dict(run_cfg):
        run_cfg.optim.lr = float(cfg.optim.lr) * lr_scale
        run_cfg.trainer.max_epochs = epochs
        run_cfg.trainer.max_steps = -1
        run_cfg.trainer.enable_checkpointing = False
        run_cfg.callbacks.checkpoint = None
        if run_cfg.get("sched") and "warmup_epochs" in run_cfg.sched:
            run_cfg.sched.warmup_epochs = 0  # a short schedule: straight into the cosine decay
        if str(run_cfg.trainer.get("precision", "auto")) == "auto":  # INT8 ranges are simulated in float32
            run_cfg.trainer.precision = "32-true"
            log.info("quantization-aware distillation trains the fake-quantized student in float32 (32-true)")
    loss = given.loss if given.loss is not None else instantiate(run_cfg.loss)
    mixup = instantiate(run_cfg.mixup) if run_cfg.get("mixup") else None
    optimizer = optimizer_factory(run_cfg)
    scheduler = schedule_for(run_cfg)
    trainer = build_trainer(run_cfg, out)
    if given.teacher is not None:
        teacher = given.teacher
    else:
        teacher = build_teacher(run_cfg, data.num_classes, auto_weights(run_cfg, data))
        teacher = teacher_for_run(cache_settings(run_cfg), teacher, loss, data, mixup, trainer)
    student = FakeQuantStudent(folded)
    student.calibrate(calibration)  # observed once, then frozen while the weights learn
    module = DistillationModule(
        student, loss, optimizer, scheduler, data.num_classes, teacher, mixup, channels_last=False
    )
    records = model_records(run_cfg, "distill")  # the dashboards' tags: the run's teacher and student
    attach_loggers(run_cfg, trainer, records)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    [before] = trainer.validate(module, datamodule=data, verbose=False)
    if epochs:
        trainer.fit(module, datamodule=data)
    else:
        log.info("quantize.epochs=0: no fine-tuning, the fake-quantized student is calibrated only (as ptq)")
    metrics = {"student_fake_quant_start/top1": float(before["student/top1"])}
    if "teacher/top1" in before:
        metrics["teacher/top1"] = float(before["teacher/top1"])
    return student.eval(), {
        "lr": run_cfg.optim.lr,
        "metrics": metrics,
        "teacher": model_name(given.teacher.model)
        if given.teacher is not None
        else (records["teacher"] or {}).get("name"),
        "teacher_fingerprint": fingerprint_record(teacher),
    }


def validation_metrics(
    data: ClassificationData, card: StudentCard, fp32: Path, int8: Path, twin: FakeQuantStudent, extra: dict
) -> dict:
    """Top-1 on the validation split of the fp32 and INT8 files (ONNX Runtime), of their PyTorch twin, and how
    often the INT8 file and the twin agree."""
    images, labels = [], []
    for batch in data.val_dataloader():
        x, y, _ = unpack_batch(batch, card.preprocessing.in_chans, data.num_classes, soft=False)
        images.append(x.float())
        labels.append(y)
    labels = torch.cat(labels)
    int8_logits = onnx_logits(int8, images)
    with torch.inference_mode():
        twin_logits = torch.cat([twin.eval()(x) for x in images])
    top1 = lambda logits: float((logits.argmax(1) == labels).float().mean())  # noqa: E731
    return {
        "student/top1": top1(int8_logits),
        "student_fp32/top1": top1(onnx_logits(fp32, images)),
        "student_fake_quant/top1": top1(twin_logits),
        "int8_fake_quant_agreement": float((int8_logits.argmax(1) == twin_logits.argmax(1)).float().mean()),
        **extra,
    }


def int8_speed(fp32: Path, int8: Path, input_size: tuple[int, ...], budget_s: float = 1.0) -> dict:
    """Latency at batch 1 and images/s at batch 64 of both files through ONNX Runtime on this CPU, alternated."""
    rounds = [(onnx_timings(fp32, input_size, budget_s), onnx_timings(int8, input_size, budget_s)) for _ in range(2)]
    best = lambda runs, key, pick: pick(run[key] for run in runs)  # noqa: E731 - least disturbed of the rounds
    fp32_runs, int8_runs = [r[0] for r in rounds], [r[1] for r in rounds]
    speed = {
        "input_size": list(input_size),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fp32_onnx": {k: best(fp32_runs, k, min if k.endswith("ms_per_image") else max) for k in fp32_runs[0]
                      if k.startswith("batch")},
        "int8_onnx": {k: best(int8_runs, k, min if k.endswith("ms_per_image") else max) for k in int8_runs[0]
                      if k.startswith("batch")},
    }  # fmt: skip
    speed["int8_speedup_batch1"] = round(
        speed["fp32_onnx"]["batch1_ms_per_image"] / speed["int8_onnx"]["batch1_ms_per_image"], 2
    )
    return speed
