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
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "out")
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
