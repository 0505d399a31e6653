from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from kd.launch.configs import CONF_DIR, register_models

ROOT = Path(__file__).resolve().parents[1]
# Short digits recipes: enough to exercise every code path in seconds, not to reach good accuracy.
# Short runs; the deployed student's speed (seconds of timing per run) is measured in tests/students/test_student_speed.py.
FAST = ["teacher.pretrain.epochs=3", "student.pretrain.epochs=2", "trainer.max_epochs=2", "student.measure_speed=false"]

register_models()

# Runs inside the test process get a no-op wandb run: they are not finished one by one like a job of
# run.py is, and wandb's service would outlive them. Runs through run.py (run_cli) use real offline runs.
os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One weights=auto cache for the whole session, so the digits models are trained once."""
    return tmp_path_factory.mktemp("kd-cache")


@pytest.fixture
def make_cfg(tmp_path, cache_dir) -> Callable[..., DictConfig]:
    def _make(*overrides: str) -> DictConfig:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose(
                "config",
                # student.measure_speed: seconds of timing per run, tested on its own (tests/students/test_student_speed.py);
                # a later override wins.
                overrides=[
                    f"paths.output_dir={tmp_path / 'out'}",
                    f"paths.cache_dir={cache_dir}",
                    "student.measure_speed=false",
                    *overrides,
                ],
                return_hydra_config=True,
            )

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
