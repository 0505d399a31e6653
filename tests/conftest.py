from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from kd.launch.configs import CONF_DIR, register_models

ROOT = Path(__file__).resolve().parents[1]
# Short digits recipes: enough to exercise every code path in seconds, not to reach good accuracy.
# Short runs; the deployed student's speed (seconds per run) is measured in tests/students/test_student_speed.py.
FAST = ["teacher.pretrain.epochs=3", "student.pretrain.epochs=2", "trainer.max_epochs=2", "student.measure_speed=false"]

register_models()

# Runs inside the test process get a no-op wandb run: they are not finished one by one like a job of
# run.py is, and wandb's service would outlive them. Runs through run.py (run_cli) use real offline runs.
os.environ["WANDB_MODE"] = "disabled"


# What Hydra itself writes into a run's folder; a refused run must leave nothing else.
HYDRA_FILES = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "run.log"}


def files_under(folder: Path, leave_out: Path | None = None) -> set[str]:
    """Every file below ``folder`` (relative paths), except those under ``leave_out``."""
    return {
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if not path.is_dir() and (leave_out is None or leave_out not in path.parents)
    }


def assert_only_hydra_files(out: Path, cache: Path | None = None) -> None:
    """A refused run left its output folder as Hydra made it (in process: empty), and ``cache`` empty."""
    left = files_under(out, leave_out=cache)
    assert left <= HYDRA_FILES, f"a refused run wrote {sorted(left - HYDRA_FILES)}"
    if cache is not None:
        assert not files_under(cache), f"a refused run wrote into the cache: {sorted(files_under(cache))}"


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N processes share the cores, each computing on one thread; runs through run.py inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One weights=auto cache for the whole session, so the digits models are trained once: under pytest-xdist
    one for all workers (kd's cache takes a file lock while it trains a model)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    path = root / "kd-cache"
    path.mkdir(exist_ok=True)
    return path


@functools.cache
def composed(overrides: tuple[str, ...]) -> DictConfig:
    """kd's config with ``overrides``, composed once per pytest session for each set of overrides."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.fixture
def make_cfg(tmp_path, cache_dir) -> Callable[..., DictConfig]:
    """A fresh copy of the composed config, writing under this test's ``tmp_path``. The deployed student's speed
    (seconds of timing per run) is off: tests/students/test_student_speed.py asks for it; a later override wins."""

    def _make(*overrides: str) -> DictConfig:
        cfg = copy.deepcopy(composed(("student.measure_speed=false", *overrides)))
        given = {override.split("=", 1)[0] for override in overrides}
        with open_dict(cfg):  # the test's own paths.* override wins
            if "paths.output_dir" not in given:
                cfg.paths.output_dir = str(tmp_path / "out")
            if "paths.cache_dir" not in given:
                cfg.paths.cache_dir = str(cache_dir)
        return cfg

    return _make


def run_cli(
    *args: str, cwd: Path, cache_dir: Path, timeout: float = 600, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python run.py ARGS`` the way a user does, in its own process."""
    env = {**os.environ, "KD_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline", **(extra_env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={cwd}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
