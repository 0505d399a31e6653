"""Teachers: weight sources, and the frozen wrapper every teacher runs in."""

from kd.teachers.frozen import FrozenTeacher, fingerprint

__all__ = ["FrozenTeacher", "fingerprint"]
