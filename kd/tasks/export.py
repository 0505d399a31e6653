"""``task=export``: write ``student.weights`` alone in ``export.formats``, with its card as JSON."""

from __future__ import annotations

import time

from omegaconf import DictConfig, ListConfig

from kd.errors import KdError
from kd.students.export import check_formats, export_student
from kd.students.speed import student_speed
from kd.tasks.common import output_dir, trained_student_of
from kd.tasks.records import write_results


def export(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    settings = cfg.export
    formats = settings.formats
    if isinstance(formats, str):  # export.formats=onnx
        formats = [formats]
    if not isinstance(formats, list | ListConfig):
        raise KdError(f"export.formats={formats} must be a list such as export.formats=[safetensors,onnx]")
    formats = check_formats(formats)  # before any work
    out = output_dir(cfg)
    student, card = trained_student_of(cfg)
    written = export_student(student, card, settings.dir, formats, settings.name)
    results = {
        "metrics": {},
        "weights": str(cfg.student.get("weights")),
        "files": {fmt: str(path) for fmt, path in written.items()},
        "wall_time_s": round(time.perf_counter() - start, 3),
        "output_dir": str(out),
    }
    if cfg.student.get("measure_speed", True):  # on the CPU, and through ONNX Runtime when exported to ONNX
        results["student_speed"] = student_speed(student, card.preprocessing.input_size, onnx=written.get("onnx"))
    write_results(out, cfg, "export", **results)
    for fmt, path in written.items():
        print(f"{fmt}: {path}")
    return results
