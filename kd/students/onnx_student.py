"""An exported ONNX student (fp32 ``student.onnx`` or INT8 ``student.int8.onnx``) run by ONNX Runtime on the CPU,
as a ``Classifier``: ``task=eval`` and ``task=predict`` measure and use the deployed file itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd.data import ClassificationData
from kd.errors import KdError
from kd.models import Classifier
from kd.students.card import StudentCard, read_card
from kd.students.trained import check_same_classes


class OnnxNet(nn.Module):
    """The file's forward pass through an ONNX Runtime session; it takes images in [0, 1] and normalizes them."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime

        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0]).to(images.device)

    def __deepcopy__(self, memo: dict) -> OnnxNet:  # a session cannot be copied; a new one reads the same file
        return OnnxNet(self.path)


class OnnxClassifier(Classifier):
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1 and self.preprocessing.in_chans == 3:
            images = images.expand(-1, 3, -1, -1)  # grayscale data into an RGB network
        return images  # the ONNX graph subtracts the mean and divides by the std itself


def onnx_student(weights: str | Path, data: ClassificationData | None = None) -> tuple[OnnxClassifier, StudentCard]:
    """The ONNX file ``weights`` and the card written beside it (``<stem>.json``), checked against ``data``."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise KdError(f"student.weights={weights} does not exist; pass an ONNX file written by task=export or quantize")
    card = read_card(path)
    if card is None:
        raise KdError(
            f"student.weights={weights} has no card beside it ({path.with_suffix('.json').name}), so its classes and "
            "preprocessing are unknown; keep the .json that kd wrote with the ONNX file"
        )
    if data is not None:
        check_same_classes(card, data, str(weights))
    return OnnxClassifier(OnnxNet(path), card.preprocessing), card
