"""kd: knowledge distillation for image classification (frozen teacher, pretrained student).

From Python (the README's "Using kd from Python")::

    import kd
    results = kd.distill(teacher, student, train_loader, val_loader, loss="kd", epochs=10)
    int8 = kd.quantize(student, teacher, train_loader, val_loader, output_dir="deploy")  # student.int8.onnx

or, in a Lightning project of one's own, ``kd.DistillationModule(student, kd.losses.HintonKD(), optimizer,
teacher=teacher)`` with any ``LightningDataModule`` yielding ``(images in [0, 1], labels)``.

Names are imported on first use, so ``import kd`` stays cheap (no Lightning, timm or Hydra until needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from kd import losses
    from kd.api import distill, quantize
    from kd.data.loaders import LoaderData
    from kd.errors import KdError
    from kd.models.classifier import Classifier, Preprocessing
    from kd.models.wrap import as_classifier
    from kd.module import DistillationModule
    from kd.teachers.frozen import FrozenTeacher

#: Public name -> the module that defines it (``losses`` is the package of loss modules itself).
_HOMES = {
    "Classifier": "kd.models.classifier",
    "DistillationModule": "kd.module",
    "FrozenTeacher": "kd.teachers.frozen",
    "KdError": "kd.errors",
    "LoaderData": "kd.data.loaders",
    "Preprocessing": "kd.models.classifier",
    "as_classifier": "kd.models.wrap",
    "distill": "kd.api",
    "quantize": "kd.api",
    "losses": "kd.losses",
}

__all__ = [
    "Classifier",
    "DistillationModule",
    "FrozenTeacher",
    "KdError",
    "LoaderData",
    "Preprocessing",
    "__version__",
    "as_classifier",
    "distill",
    "losses",
    "quantize",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kd' has no attribute {name!r}")
    module = importlib.import_module(home)
    value = module if name == "losses" else getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
