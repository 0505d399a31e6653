"""The best validation of a run, read from its validation history (``results.json``'s ``best``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BEST_KEY = "student/top1"


def best_record(history: Sequence[dict[str, Any]], key: str = BEST_KEY) -> dict[str, Any] | None:
    """The validation during training with the highest ``key`` (the earliest on a tie), with its epoch and step.

    ``history`` is ``results.json``'s list: its epoch-0 record (before training) is not a candidate, since the
    best trained student is asked for. None when no validation during training measured ``key``."""
    candidates = [record for record in history if record.get("epoch", 0) > 0 and key in record]
    if not candidates:
        return None
    return dict(max(candidates, key=lambda record: (record[key], -record["epoch"])))
