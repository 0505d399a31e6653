"""The one writer of a run's outcome: ``results.json`` when it finished, ``failure.json`` when a sweep job failed.

Both are written atomically (temporary file, then rename). Sweep summaries read these files and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd.io import write_json_atomic

log = logging.getLogger("kd")

RESULTS_FILE = "results.json"
FAILURE_FILE = "failure.json"


def write_results(out: Path, results: dict[str, Any]) -> Path:
    """``results.json`` in ``out``: ``results`` as the task assembled them (``kd.tasks.records``)."""
    path = write_json_atomic(out / RESULTS_FILE, results, "results file")
    log.info("results written to %s", path)
    return path


def write_failure(out: Path, error: str, overrides: Sequence[str]) -> Path:
    """Record a failed job, never as a results.json: the summary lists it as failed with ``error``."""
    failure = {"status": "failed", "error": error, "overrides": list(overrides)}
    return write_json_atomic(Path(out) / FAILURE_FILE, failure, "failure record")
