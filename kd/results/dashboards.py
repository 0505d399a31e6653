"""Weights & Biases: the logger ``logger=wandb`` builds, and closing each job's run with its results.

Offline unless an API key is configured (``WANDB_API_KEY``, ``wandb login``): the run folder is written
under the job's output folder and ``wandb sync`` uploads it later. All jobs of a sweep share a group.
"""

from __future__ import annotations

import logging
import netrc
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger("kd")


def wandb_mode(offline: bool | None) -> str | None:
    """``offline: null`` means offline unless an API key is configured; WANDB_MODE, when set, decides."""
    if offline is not None:
        return "offline" if offline else "online"
    if os.environ.get("WANDB_MODE"):
        return None  # wandb reads it itself (offline, online, disabled)
    return "online" if api_key_configured() else "offline"


def api_key_configured() -> bool:
    """WANDB_API_KEY, or the netrc entry `wandb login` writes for the W&B host.

    Read directly: ``wandb.login`` would start wandb's background service just to answer this.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def sweep_group(sweep_dir: str | Path) -> str:
    """A sweep's wandb group: its folder's last two parts (multirun/2025-01-31/12-00-00 -> 2025-01-31/12-00-00)."""
    return "/".join(Path(sweep_dir).parts[-2:])


def wandb_logger(
    save_dir: str,
    project: str = "kd",
    group: str | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
    offline: bool | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """Lightning's WandbLogger with kd's defaults (see conf/logger/wandb.yaml); a task fills ``group``, ``name``
    and ``tags`` left null from the job (``kd.tasks.loggers``)."""
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(offline)
    if mode == "online":
        kwargs["mode"] = "online"
    if "settings" not in kwargs:  # wandb's banner and run summary would bury kd's own results table
        import wandb

        kwargs["settings"] = wandb.Settings(quiet=True)
    logger = WandbLogger(
        save_dir=save_dir, project=project, group=group, name=name, tags=tags, offline=mode == "offline", **kwargs
    )
    # Lightning always passes wandb's deprecated `anonymous` setting, which makes wandb print a warning.
    if logger._wandb_init.get("anonymous") is None:
        logger._wandb_init.pop("anonymous", None)
    return logger


def finish_dashboards(results: dict[str, Any] | None) -> None:
    """End this job's wandb run, with its final metrics as a table; ``results=None`` marks it failed.

    wandb keeps one current run per process: without this, the next job of a sweep run by the same
    process (Hydra's basic launcher) would log into this one.
    """
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return
    if results is not None:
        metrics = results.get("metrics", {})
        table = wandb.Table(columns=["metric", "value"], data=[[key, value] for key, value in metrics.items()])
        wandb.run.log({"results": table})
        wandb.run.summary.update({key: results[key] for key in ("wall_time_s", "train_images_per_s") if key in results})
    offline = wandb.run.settings.mode in ("offline", "dryrun")  # Lightning's offline=True asks for "dryrun"
    offline_dir = str(Path(wandb.run.dir).parent) if offline else None
    wandb.finish(exit_code=0 if results is not None else 1)
    if offline_dir is not None:
        log.info("wandb: offline run in %s; upload it with `wandb sync %s`", offline_dir, offline_dir)


def number(cell: str) -> float | str | None:
    """A summary.csv cell for a wandb Table: numbers as numbers, an empty cell (a failed job's metric) as None."""
    if cell == "":
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def publish_sweep(sweep_dir: Path, project: str = "kd", entity: str | None = None, offline: bool | None = None) -> None:
    """One more run in the sweep's group holding the sweep's summary.csv as a table and its summary.png."""
    import csv

    import wandb

    with open(sweep_dir / "summary.csv", newline="") as f:
        rows = list(csv.reader(f))
    mode = wandb_mode(offline)
    run = wandb.init(
        project=project,
        entity=entity,
        group=sweep_group(sweep_dir),
        name="summary",
        job_type="summary",
        dir=str(sweep_dir),
        **({"mode": mode} if mode else {}),
    )
    logged: dict[str, Any] = {"summary": wandb.Table(columns=rows[0], data=[[number(c) for c in r] for r in rows[1:]])}
    if (sweep_dir / "summary.png").is_file():
        logged["summary_chart"] = wandb.Image(str(sweep_dir / "summary.png"))
    run.log(logged)
    run.finish()


def add_model_tags(loggers: list, tags: list[str]) -> None:
    """Tag each wandb run with the real models too (``teacher_model:convnext_tiny.fb_in22k_ft_in1k``), since
    ``teacher:timm`` says little; called before the run starts (tags are fixed when it does)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            current = list(logger._wandb_init.get("tags") or [])
            logger._wandb_init["tags"] = current + [tag[:64] for tag in tags if tag[:64] not in current]
