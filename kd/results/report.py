"""The short table a run ends with."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

ROWS = (
    ("teacher/top1", "teacher top-1 (student's view)"),
    ("teacher/top1_own_view", "teacher top-1 (its own view)"),
    ("student_init/top1", "student top-1 before"),
    ("student/top1", "student top-1 after"),
    ("agreement", "teacher-student agreement"),
)
EVAL_ROWS = (
    ("student/top1", "student top-1"),
    ("student/top5", "student top-5"),
    ("student/ece", "student calibration error (ECE)"),
    ("teacher/top1", "teacher top-1 (student's view)"),
    ("teacher/top5", "teacher top-5 (student's view)"),
    ("teacher/ece", "teacher calibration error (ECE)"),
    ("agreement", "teacher-student agreement"),
)


def print_summary(task: str, metrics: dict[str, float], rows: tuple[tuple[str, str], ...] = ROWS) -> None:
    table = Table(title=f"kd {task}: validation results", show_header=False)
    for key, label in rows:
        if key in metrics:
            table.add_row(label, f"{100 * metrics[key]:.2f}%")
    Console().print(table)
