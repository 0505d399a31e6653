"""kd entry point: ``python run.py [task=distill|train|eval|predict|export] [group=option ...] [key=value ...]``."""

import hydra
from omegaconf import DictConfig

from kd.cli import run_task
from kd.config import register_models
from kd.preflight import refuse_bad_command_line

register_models()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_task(cfg)


if __name__ == "__main__":
    refuse_bad_command_line()
    main()
