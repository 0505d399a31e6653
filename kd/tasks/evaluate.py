"""``task=eval``: measure a student (and, when one is configured, its teacher) on the validation split."""

from __future__ import annotations

import time

import lightning as L
from omegaconf import DictConfig

from kd.losses import LabelCrossEntropy
from kd.module import DistillationModule
from kd.report import print_summary
from kd.tasks.common import build_data, build_models, build_trainer, output_dir, validate, write_results
from kd.tasks.pretrain import PretrainedCache


def evaluate(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    L.seed_everything(cfg.seed, verbose=False)  # models with weights=none start from this seed
    out = output_dir(cfg)
    data = build_data(cfg, cfg.student)
    obtain_auto = PretrainedCache(cfg.paths.cache_dir, cfg.data, data, cfg.trainer.get("accelerator", "auto"))
    teacher, student = build_models(cfg, data.num_classes, obtain_auto, with_teacher=bool(cfg.get("teacher")))
    module = DistillationModule(
        student, LabelCrossEntropy(), optimizer=None, scheduler=None, num_classes=data.num_classes, teacher=teacher
    )
    trainer = build_trainer(cfg, out)
    metrics = validate(trainer, module, data)
    results = {
        "metrics": metrics,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "world_size": trainer.world_size,
        "output_dir": str(out),
    }
    if trainer.is_global_zero:
        write_results(out, cfg, "eval", **results)
        print_summary("eval", metrics)
    return results
