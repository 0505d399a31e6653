"""Data modules. Every one yields (images in [0, 1], class index); models normalize for themselves."""

from kd.data.base import ClassificationData

__all__ = ["ClassificationData"]
