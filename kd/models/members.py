"""The names of ``teacher=ensemble``'s members: zoo entries (``conf/model/<name>.yaml``) and any timm or
torchvision model (``timm:NAME``, ``torchvision:NAME``). ``kd.tasks.models`` reads the entries they name."""

from __future__ import annotations

from kd.io import CONF_DIR

BACKENDS = ("timm", "torchvision")  # timm:NAME, torchvision:NAME
COMBINE = ("probs", "logits")


def zoo_names() -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))
