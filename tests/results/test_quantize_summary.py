"""A sweep of task=quantize jobs: the summary shows the INT8 students beside their fp32 files."""

import json
from pathlib import Path

import matplotlib.axes
import pytest

from kd.summary import load_jobs, markdown_table, write_summary


def quantize_job(folder: Path, method: str, seed: int, int8_top1: float, fp32_top1: float) -> None:
    """The results.json a task=quantize job writes (kd.tasks.quantize), with the keys the summary reads."""
    folder.mkdir(parents=True)
    results = {
        "task": "quantize",
        "seed": seed,
        "metrics": {"student/top1": int8_top1, "student_fp32/top1": fp32_top1},
        "quantize": {"method": method},
        "student_speed": {
            "fp32_onnx": {"batch1_ms_per_image": 0.30, "batch64_images_per_s": 9000.0},
            "int8_onnx": {"batch1_ms_per_image": 0.10, "batch64_images_per_s": 27000.0},
        },
        "wall_time_s": 10.0,
        "overrides": ["task=quantize", f"quantize.method={method}", f"seed={seed}"],
    }
    (folder / "results.json").write_text(json.dumps(results))


def test_the_summary_shows_int8_beside_fp32_in_the_table_and_the_picture(tmp_path, monkeypatch):
    for index, (method, seed, int8) in enumerate([("qad", 0, 0.97), ("qad", 1, 0.96), ("ptq", 0, 0.93)]):
        quantize_job(tmp_path / str(index), method, seed, int8, 0.97)
    table = markdown_table(load_jobs(tmp_path))
    header = table.splitlines()[0]
    assert "fp32 ONNX top-1 %" in header and "student ms/image" in header
    qad_row = next(line for line in table.splitlines() if line.startswith("| quantize.method=qad"))
    assert "96.50" in qad_row and "97.00" in qad_row and "0.10" in qad_row  # INT8 top-1 and latency, fp32 top-1

    drawn = []
    original = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(
        matplotlib.axes.Axes, "scatter", lambda self, *a, **k: drawn.append((a, k)) or original(self, *a, **k)
    )
    write_summary(tmp_path)
    assert (tmp_path / "summary.png").read_bytes().startswith(b"\x89PNG")
    hollow = [a for a, k in drawn if k.get("facecolors") == "none" and a and len(a[0])]
    assert sorted(x for xs, _ in hollow for x in xs) == pytest.approx([0.30, 0.30, 0.30])  # the fp32 files
