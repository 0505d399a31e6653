"""kd: knowledge distillation for image classification (frozen teacher, pretrained student)."""

__version__ = "0.1.0"
