"""kd entry point: ``python run.py [task=distill|train|eval|predict|export] [group=option ...] [key=value ...]``."""

import hydra
from omegaconf import DictConfig

from kd.launch.configs import register_models
from kd.launch.preflight import refuse_bad_command_line
from kd.launch.run import run_task

register_models()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_task(cfg)


if __name__ == "__main__":
    refuse_bad_command_line()
    main()
