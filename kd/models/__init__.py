"""Model architectures and the preprocessing each one's weights were trained with."""

from kd.models.arch import Arch, ModuleArch, TimmArch, TorchvisionArch
from kd.models.classifier import Classifier, Preprocessing

__all__ = ["Arch", "Classifier", "ModuleArch", "Preprocessing", "TimmArch", "TorchvisionArch"]
