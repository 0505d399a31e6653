"""Hydra wiring: every ``conf/model/<name>.yaml`` is offered both as ``teacher=<name>`` and ``student=<name>``.

One yaml per model, whichever role a user gives it; role-specific settings (``teacher.bn_train_mode``)
live in ``conf/config.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from kd.io import CONF_DIR

# Models by name rather than by a yaml each: timm, torchvision, custom (the user's nn.Module) and ensemble.
ANY_MODEL = "any_model"


def register_models(conf_dir: Path = CONF_DIR) -> list[str]:
    """The zoo (``conf/model/``) and the entries that take any model by name (``conf/any_model/``)."""
    store = ConfigStore.instance()
    names = []
    for path in sorted((conf_dir / "model").glob("*.yaml")) + sorted((conf_dir / ANY_MODEL).glob("*.yaml")):
        node = OmegaConf.load(path)
        node.name = path.stem
        for role in ("teacher", "student"):
            store.store(group=role, name=path.stem, node=node)
        names.append(path.stem)
    return names
