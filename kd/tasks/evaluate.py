"""``task=eval``: measure a student (and, unless ``~teacher``, its teacher) on the validation split.

Reports top-1, top-5 and expected calibration error for each, and the teacher-student agreement.
"""

from __future__ import annotations

import logging
import time

import lightning as L
from omegaconf import DictConfig

from kd.losses import LabelCrossEntropy
from kd.module import DistillationModule
from kd.results.report import EVAL_ROWS, print_summary
from kd.tasks.auto_weights import auto_weights
from kd.tasks.common import attach_loggers, build_data, build_trainer, output_dir, trained_student_of, validate
from kd.tasks.models import build_teacher, has_teacher
from kd.tasks.records import model_records, write_results

log = logging.getLogger("kd")


def evaluate(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    L.seed_everything(cfg.seed, verbose=False)  # models with weights=none start from this seed
    out = output_dir(cfg)
    data = build_data(cfg, cfg.student)
    # The teacher first, as in distillation (``kd.tasks.common.build_models``): models with weights=none then get
    # the same random initialization as in a distillation run of the same seed.
    teacher = build_teacher(cfg, data.num_classes, auto_weights(cfg, data)) if has_teacher(cfg) else None
    student, card = trained_student_of(cfg, data)
    extra = {}
    if teacher is not None:
        extra["teacher_fingerprint"] = teacher.start_fingerprint
        distilled_from = card.extra.get("teacher_fingerprint")
        if distilled_from and distilled_from != teacher.start_fingerprint:
            log.warning(
                "the student was distilled from another teacher (fingerprint %s) than this one (%s); "
                "agreement is measured against this one",
                distilled_from[:12],
                teacher.start_fingerprint[:12],
            )
    module = DistillationModule(
        student, LabelCrossEntropy(), optimizer=None, scheduler=None, num_classes=data.num_classes, teacher=teacher
    )
    trainer = build_trainer(cfg, out)
    attach_loggers(cfg, trainer, model_records(cfg, "eval"))
    metrics = validate(trainer, module, data)
    results = {
        "metrics": metrics,
        "weights": str(cfg.student.get("weights")),
        **extra,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "world_size": trainer.world_size,
        "output_dir": str(out),
    }
    if trainer.is_global_zero:
        write_results(out, cfg, "eval", **results)
        print_summary("eval", metrics, EVAL_ROWS)
    return results
