"""Summarize a sweep from its jobs' results.json files: ``python -m kd.summary multirun/DATE/TIME``.

Writes ``summary.csv`` (one row per job), ``summary.md`` (one row per variant: the overrides that differ
between jobs, other than ``seed``, with mean and standard deviation over seeds) and ``summary.png`` into
the sweep folder, and prints the markdown. A job that failed left ``failure.json`` instead of
``results.json``; a job with neither did not finish (the sweep was interrupted). Nothing is read from logs.
At the end of ``python run.py -m ...`` the ``SweepSummary`` Hydra callback does the same.

``--report`` (the callback's ``report``) picks which student is summarized: ``last`` (default: the metrics after
the last epoch), ``best`` (the validation with the best student top-1 during training, results.json's ``best``)
or ``ema`` (the moving average of the student's weights after the last epoch, ``student.ema=true``). Jobs of an
``experiment=cifar100_*`` recipe carry its ``published`` top-1; summary.md then shows it and the difference.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kd.errors import KdError
from kd.io import write_atomic
from kd.results.dashboards import publish_sweep
from kd.results.files import FAILURE_FILE, RESULTS_FILE

log = logging.getLogger("kd")

SEED_KEY = "seed"
BASELINE_LOSS = "ce"
TOP1 = "student/top1"
FP32_TOP1 = "student_fp32/top1"  # task=quantize: the fp32 ONNX student; its student/top1 is the INT8 file's
REPORTS = {
    "last": "metrics after the last epoch",
    "best": "metrics of the validation with the best student top-1 during training (its epoch in summary.csv)",
    "ema": "the student's weight average (student.ema=true) after the last epoch",
}


def check_report(report: str) -> str:
    if report not in REPORTS:
        raise KdError(f"report={report!r} is not one of {', '.join(REPORTS)}; pick which student the summary reports")
    return report


@dataclass
class Job:
    """One job folder of a sweep: ``status`` is ok (results.json), failed (failure.json) or unfinished."""

    name: str
    overrides: list[str]
    status: str
    results: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    report: str = "last"

    @property
    def metrics(self) -> dict[str, float]:
        """The reported metrics (see ``REPORTS``), keyed as the student's: ``student/top1``, ``teacher/top1``."""
        last = self.results.get("metrics", {})
        if self.report == "best":
            return {k: v for k, v in self.results.get("best", {}).items() if k not in ("epoch", "step")}
        if self.report == "ema":  # the average's accuracy under the student's keys; agreement is the student's own
            ema = {k.replace("student_ema/", "student/"): v for k, v in last.items() if k.startswith("student_ema/")}
            return {**{k: v for k, v in last.items() if k.startswith("teacher/")}, **ema} if ema else {}
        return last

    @property
    def published_top1(self) -> float | None:
        """The published top-1 (%) of the job's recipe (``published.top1`` of conf/experiment), if it has one."""
        return (self.results.get("published") or {}).get("top1")


@dataclass
class Variant:
    """The jobs that share every override but ``seed``."""

    label: str
    overrides: dict[str, str]
    jobs: list[Job]

    @property
    def finished(self) -> list[Job]:
        return [job for job in self.jobs if job.status == "ok"]

    def values(self, key: str) -> list[float]:
        return [job.metrics[key] for job in self.finished if key in job.metrics]

    def mean(self, key: str) -> float:
        values = self.values(key)
        return statistics.mean(values) if values else math.nan


# --- reading a sweep folder -----------------------------------------------------------------------------


def job_folders(sweep_dir: Path) -> list[Path]:
    """Folders Hydra started a job in (``.hydra/``) or that hold a job's outcome, in job-number order."""
    folders = [
        p
        for p in sweep_dir.iterdir()
        if p.is_dir() and any((p / name).exists() for name in (".hydra", RESULTS_FILE, FAILURE_FILE))
    ]
    return sorted(folders, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def load_job(folder: Path) -> Job:
    failure_path, results_path = folder / FAILURE_FILE, folder / RESULTS_FILE
    hydra_overrides = folder / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(hydra_overrides)] if hydra_overrides.is_file() else []
    if failure_path.is_file():  # a failure wins over a results.json left by an earlier attempt
        failure = json.loads(failure_path.read_text())
        return Job(folder.name, failure.get("overrides", overrides), "failed", error=failure.get("error", ""))
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        return Job(folder.name, results.get("overrides", overrides), "ok", results)
    return Job(folder.name, overrides, "unfinished", error="no results.json: the job was interrupted or is running")


def load_jobs(sweep_dir: str | Path, report: str = "last") -> list[Job]:
    sweep_dir = Path(sweep_dir)
    check_report(report)
    folders = job_folders(sweep_dir) if sweep_dir.is_dir() else []
    if not folders:
        raise KdError(
            f"{sweep_dir} holds no job folders of a sweep; give the folder `python run.py -m ...` printed "
            "(multirun/DATE/TIME)"
        )
    jobs = [load_job(folder) for folder in folders]
    for job in jobs:
        job.report = report
    return jobs


def split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def group_variants(jobs: list[Job]) -> tuple[list[Variant], list[str]]:
    """Variants keyed by the overrides that differ between jobs (seed aside); and the overrides all share."""
    common = set.intersection(*(set(job.overrides) for job in jobs))
    variants: dict[tuple, Variant] = {}
    for job in jobs:
        own = dict(split_override(o) for o in job.overrides if o not in common)
        own.pop(SEED_KEY, None)
        key = tuple(sorted(own.items()))
        if key not in variants:
            label = " ".join(f"{k}={v}" for k, v in own.items()) or "(all jobs)"
            variants[key] = Variant(label, own, [])
        variants[key].jobs.append(job)
    return list(variants.values()), [o for o in jobs[0].overrides if o in common]


def baseline_of(variant: Variant, variants: list[Variant]) -> Variant | None:
    """The ``loss=ce`` variant with every other override equal, when the sweep has one."""
    if "loss" not in variant.overrides:
        return None
    wanted = {**variant.overrides, "loss": BASELINE_LOSS}
    return next((v for v in variants if v.overrides == wanted and v.finished), None)


def ranked(variants: list[Variant]) -> list[Variant]:
    """Variants with a finished job, best mean student top-1 first."""
    done = [v for v in variants if v.finished]
    return sorted(done, key=lambda v: -v.mean(TOP1) if not math.isnan(v.mean(TOP1)) else math.inf)


# --- summary.csv ----------------------------------------------------------------------------------------

CSV_LEAD = ["job", "status", "variant", "overrides", "seed", "task", "teacher", "student", "loss", "data"]
CSV_MODELS = ["teacher_model", "student_model"]  # the real architectures and weights (kd.weights.names)
CSV_TAIL = ["best_epoch", "wall_time_s", "train_images_per_s", "error"]


def csv_text(jobs: list[Job], variants: list[Variant]) -> str:
    label = {id(job): v.label for v in variants for job in v.jobs}
    metric_keys = list(dict.fromkeys(key for job in jobs for key in job.metrics))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_LEAD + CSV_MODELS + metric_keys + CSV_TAIL, lineterminator="\n")
    writer.writeheader()
    for job in jobs:
        seed = dict(split_override(o) for o in job.overrides).get(SEED_KEY, job.results.get("seed", ""))
        row = {
            "job": job.name,
            "status": job.status,
            "variant": label[id(job)],
            "overrides": " ".join(job.overrides),
            "seed": seed,
            **{key: job.results.get(key, "") for key in ("task", "teacher", "student", "loss", "data")},
            **{key: model_name(job.results, key) for key in CSV_MODELS},
            **job.metrics,  # written with repr(): the numbers read back equal results.json
            "best_epoch": job.results.get("best", {}).get("epoch", ""),
            **{key: job.results.get(key, "") for key in ("wall_time_s", "train_images_per_s")},
            "error": job.error,
        }
        writer.writerow(row)
    return buffer.getvalue()


def model_name(results: dict, key: str) -> str:
    """The real name of a job's teacher or student (``convnext_tiny.fb_in22k_ft_in1k``, not ``timm``)."""
    record = results.get(key)
    return record.get("name", "") if isinstance(record, dict) else ""


# --- summary.md -----------------------------------------------------------------------------------------


def percent(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def markdown_table(jobs: list[Job], grouped: tuple[list[Variant], list[str]] | None = None) -> str:
    """One row per variant, best mean student top-1 first; failed and unfinished jobs listed below.
    ``grouped``: ``group_variants(jobs)``, when the caller has it already."""
    variants, common = grouped or group_variants(jobs)
    rows = ranked(variants)
    optional = [
        key for key in ("student/top5", "agreement", "teacher/top1", FP32_TOP1) if any(key in j.metrics for j in jobs)
    ]
    with_baseline = any(baseline_of(v, variants) for v in rows)
    header = ["variant", "seeds", "student top-1 %"] + ["Δ top-1 vs ce (points)"] * with_baseline
    header += [COLUMN_TITLES[key] for key in optional]
    with_published = any(job.published_top1 is not None for v in rows for job in v.finished)
    header += ["published top-1 %", "Δ top-1 vs published (points)"] * with_published
    header += ["time s"]
    with_speed = any(latency_ms(job) is not None for job in jobs)
    header += ["student ms/image", "student MFLOPs"] * with_speed
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in rows:
        cells = [variant.label, seeds_cell(variant), percent(variant.values(TOP1))]
        cells += [delta_cell(variant, baseline_of(variant, variants))] * with_baseline
        cells += [percent(variant.values(key)) for key in optional]
        if with_published:
            cells += published_cells(variant)
        times = [job.results["wall_time_s"] for job in variant.finished if "wall_time_s" in job.results]
        cells.append(f"{statistics.mean(times):.1f}" if times else "—")
        if with_speed:
            cells += speed_cells(variant)
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) if rows else "No job finished."
    return table + "\n\n" + "\n".join(notes(jobs, common)) + "\n"


def published_cells(variant: Variant) -> list[str]:
    """The recipe's published top-1 (%) and the measured mean minus it, in points."""
    published = next((job.published_top1 for job in variant.finished if job.published_top1 is not None), None)
    if published is None:
        return ["—", "—"]
    mean = variant.mean(TOP1)
    delta = "—" if math.isnan(mean) else f"{round(100 * mean - published, 2) + 0.0:+.2f}"
    return [f"{published:.2f}", delta]


def latency_ms(job: Job) -> float | None:
    """The final student's latency at batch 1 (kd.students.speed), when the job measured it: eager PyTorch, or
    for a ``task=quantize`` job its INT8 ONNX file in ONNX Runtime."""
    speed = job.results.get("student_speed") or {}
    return (speed.get("int8_onnx") or speed.get("eager") or {}).get("batch1_ms_per_image")


def fp32_point(job: Job) -> tuple[float, float] | None:
    """A ``task=quantize`` job's fp32 ONNX student: (latency ms at batch 1, top-1 %), beside its INT8 point."""
    fp32 = (job.results.get("student_speed") or {}).get("fp32_onnx", {}).get("batch1_ms_per_image")
    top1 = job.metrics.get(FP32_TOP1)
    return (fp32, 100 * top1) if fp32 is not None and top1 is not None else None


def speed_cells(variant: Variant) -> list[str]:
    """Mean latency at batch 1 and FLOPs per image of the variant's final students (the same net across seeds)."""
    latencies = [ms for ms in map(latency_ms, variant.finished) if ms is not None]
    flops = [job.results["student_speed"].get("flops_per_image") for job in variant.finished if latency_ms(job)]
    flops = [f for f in flops if f is not None]
    return [
        f"{statistics.mean(latencies):.2f}" if latencies else "—",
        f"{statistics.mean(flops) / 1e6:.1f}" if flops else "—",
    ]


COLUMN_TITLES = {
    "student/top5": "student top-5 %",
    "agreement": "agreement %",
    "teacher/top1": "teacher top-1 % (student's view)",
    FP32_TOP1: "fp32 ONNX top-1 % (quantize: student top-1 is INT8)",
}


def seeds_cell(variant: Variant) -> str:
    finished, started = len(variant.finished), len(variant.jobs)
    return f"{finished}" if finished == started else f"{finished} of {started}"


def delta_cell(variant: Variant, baseline: Variant | None) -> str:
    if baseline is None:
        return "—"
    if baseline is variant:
        return "baseline"
    points = round(100 * (variant.mean(TOP1) - baseline.mean(TOP1)), 2) + 0.0  # + 0.0: no "-0.00"
    return f"{points:+.2f}"


def notes(jobs: list[Job], common: list[str]) -> list[str]:
    finished = sum(job.status == "ok" for job in jobs)
    lines = [f"{len(jobs)} jobs: {finished} finished, {len(jobs) - finished} failed or unfinished."]
    if common:
        lines.append("Overrides shared by every job: " + " ".join(f"`{o}`" for o in common) + ".")
    for key in CSV_MODELS:
        names = sorted({model_name(job.results, key) for job in jobs if job.status == "ok"} - {""})
        if names:
            lines.append(f"{key.split('_')[0].capitalize()}: " + ", ".join(f"`{name}`" for name in names) + ".")
    report = jobs[0].report if jobs else "last"
    lines.append(f"Mean ± standard deviation over seeds; {REPORTS[report]} (report={report}).")
    failed = [job for job in jobs if job.status != "ok"]
    if failed:
        lines.append("\nFailed or unfinished jobs:\n")
        for job in failed:
            overrides = " ".join(job.overrides) or "no overrides"
            lines.append(f"- job {job.name} (`{overrides}`): {job.status}: {one_line(job.error)}")
    return lines


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- summary.png ----------------------------------------------------------------------------------------


def plot(variants: list[Variant], path: Path) -> Path:
    """Bar chart of mean student top-1 per variant with standard deviations, and every job's val top-1 curve."""
    from matplotlib.figure import Figure  # the Agg canvas, no GUI backend and no global pyplot state

    rows = ranked(variants)
    with_speed = any(latency_ms(job) is not None for v in rows for job in v.finished)
    width = 17 if with_speed else 12
    figure = Figure(figsize=(width, max(3.5, 0.45 * len(rows) + 2)), layout="constrained")
    panels = figure.subplots(1, 3 if with_speed else 2, width_ratios=[1, 1.2, 1] if with_speed else [1, 1.2])
    bars, curves = panels[0], panels[1]
    colors = {v.label: f"C{i % 10}" for i, v in enumerate(rows)}
    names = [v.label for v in rows][::-1]
    means = [100 * v.mean(TOP1) for v in rows][::-1]
    spreads = [100 * statistics.stdev(v.values(TOP1)) if len(v.values(TOP1)) > 1 else 0.0 for v in rows][::-1]
    bars.barh(names, means, xerr=spreads, color=[colors[n] for n in names], capsize=4)
    for y, variant in enumerate(rows[::-1]):
        bars.scatter([100 * x for x in variant.values(TOP1)], [y] * len(variant.values(TOP1)), color="k", s=8, zorder=3)
    low = min((100 * x for v in rows for x in v.values(TOP1)), default=0.0)
    bars.set_xlim(max(0.0, low - 3), 100)
    bars.set_xlabel("student top-1 % (mean ± std over seeds, dots: jobs)")
    report = rows[0].finished[0].report if rows else "last"
    bars.set_title(f"validation top-1 per variant (report={report})")
    for variant in rows:
        for job in variant.finished:
            history = [h for h in job.results.get("history", []) if TOP1 in h]
            if history:
                xs, ys = [h["epoch"] for h in history], [100 * h[TOP1] for h in history]
                curves.plot(xs, ys, color=colors[variant.label], alpha=0.8, lw=1.2, label=variant.label)
    handles, labels = curves.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        curves.legend(unique.values(), unique.keys(), fontsize="small", loc="lower right")
    curves.set_xlabel("epoch (0: before training)")
    curves.set_ylabel("student top-1 %")
    curves.set_title("validation top-1 of every job")
    curves.grid(alpha=0.3)
    if with_speed:
        tradeoff(panels[2], rows, colors)
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80))


def tradeoff(axes, rows: list[Variant], colors: dict[str, str]) -> None:
    """Accuracy against deployment latency: every finished job that measured its student's speed."""
    for variant in rows:
        points = [(latency_ms(job), 100 * job.metrics[TOP1]) for job in variant.finished if TOP1 in job.metrics]
        points = [(ms, top1) for ms, top1 in points if ms is not None]
        if points:
            axes.scatter(*zip(*points, strict=True), color=colors[variant.label], label=variant.label, s=30)
        fp32 = [point for job in variant.finished if (point := fp32_point(job))]
        if fp32:  # task=quantize: the fp32 file as a hollow marker, an arrow to its INT8 file
            axes.scatter(*zip(*fp32, strict=True), facecolors="none", edgecolors=colors[variant.label], s=30)
            for job in variant.finished:
                if (start := fp32_point(job)) and latency_ms(job) is not None and TOP1 in job.metrics:
                    end = (latency_ms(job), 100 * job.metrics[TOP1])
                    axes.annotate("", end, start, arrowprops={"arrowstyle": "->", "color": colors[variant.label]})
    if any(fp32_point(job) for variant in rows for job in variant.finished):
        axes.scatter([], [], facecolors="none", edgecolors="k", s=30, label="fp32 ONNX (hollow) -> INT8 ONNX (filled)")
        axes.legend(fontsize="small")
    axes.set_xlabel("student latency, ms per image at batch 1 (eager, run's device; quantize: ONNX Runtime)")
    axes.set_ylabel("student top-1 %")
    axes.set_title("accuracy vs latency")
    axes.grid(alpha=0.3)


# --- all three files ------------------------------------------------------------------------------------


@dataclass
class Summary:
    jobs: list[Job]
    markdown: str
    folder: Path

    @property
    def failed(self) -> list[Job]:
        return [job for job in self.jobs if job.status != "ok"]


def write_summary(sweep_dir: str | Path, report: str = "last") -> Summary:
    """summary.csv, summary.md and summary.png of the sweep; ``report``: last, best or ema (see ``REPORTS``)."""
    sweep_dir = Path(sweep_dir)
    jobs = load_jobs(sweep_dir, report)
    grouped = group_variants(jobs)
    variants = grouped[0]
    markdown = markdown_table(jobs, grouped)
    write_atomic(sweep_dir / "summary.csv", lambda tmp: tmp.write_text(csv_text(jobs, variants)))
    write_atomic(sweep_dir / "summary.md", lambda tmp: tmp.write_text(f"# Sweep {sweep_dir}\n\n{markdown}"))
    if any(job.status == "ok" for job in jobs):
        plot(variants, sweep_dir / "summary.png")
    else:  # nothing to draw: no picture from an earlier summary either
        (sweep_dir / "summary.png").unlink(missing_ok=True)
    return Summary(jobs, markdown, sweep_dir)


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): summarize the sweep when it ends.
    ``report`` (``hydra.callbacks.sweep_summary.report=best``): last, best or ema, as ``--report``."""

    def __init__(self, report: str = "last") -> None:
        self.report = check_report(report)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = write_summary(config.hydra.sweep.dir, self.report)
        print(f"\nSweep summary ({summary.folder}/summary.md, summary.csv, summary.png):\n\n{summary.markdown}")
        wandb_cfg = OmegaConf.select(config, "logger.wandb")
        if wandb_cfg is not None:
            settings = {key: wandb_cfg.get(key) for key in ("project", "entity", "offline") if key in wandb_cfg}
            publish_sweep(summary.folder, **settings)
        if summary.failed:
            failed, total = len(summary.failed), len(summary.jobs)
            log.error("%d of %d jobs failed or did not finish; see %s/summary.md", failed, total, summary.folder)
            sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder, multirun/DATE/TIME")
    parser.add_argument(
        "--report",
        choices=list(REPORTS),
        default="last",
        help="which student: " + "; ".join(f"{k}: {v}" for k, v in REPORTS.items()),
    )
    args = parser.parse_args(argv)
    try:
        summary = write_summary(args.sweep_dir, args.report)
    except KdError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary.markdown)


if __name__ == "__main__":
    main()
