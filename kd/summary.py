"""Summarize a sweep from its jobs' results.json files: ``python -m kd.summary multirun/DATE/TIME``.

One row per variant (the job's overrides other than ``seed``): mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def load_jobs(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]


def variant(job: dict) -> str:
    return " ".join(o for o in job.get("overrides", []) if not o.startswith("seed=")) or "(default)"


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def markdown_table(jobs: list[dict]) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for job in jobs:
        groups[variant(job)].append(job)
    rows = sorted(groups.items(), key=lambda item: -statistics.mean(j["metrics"]["student/top1"] for j in item[1]))
    lines = ["| variant | seeds | student top-1 % | student top-1 before % | agreement % |", "|---|---|---|---|---|"]
    for name, members in rows:
        metrics = [j["metrics"] for j in members]
        cells = [
            mean_std([m[key] for m in metrics]) if all(key in m for m in metrics) else "-"
            for key in ("student/top1", "student_init/top1", "agreement")
        ]
        lines.append(f"| {name} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep_dir", type=Path)
    print(markdown_table(load_jobs(parser.parse_args().sweep_dir)))


if __name__ == "__main__":
    main()
